"""The server on a real uvicorn (loopback, a free port, in a thread) over the real engine on a tiny random
checkpoint, driven by the `openai` client: chat with a base64 image, streamed and not, usage, models.list,
errors as the client's exception classes; a client that disconnects frees its KV slot; shutdown cancels the
requests in flight."""

import json
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import httpx  # noqa: E402
import torch  # noqa: E402

from helpers_server import FakeEngine, ThreadedServer, parse_prometheus, png_data_uri, sample  # noqa: E402
from qwen2vl_fast.engine import Engine  # noqa: E402
from qwen2vl_fast.server import create_app  # noqa: E402

MODEL = "tiny-vl"
KEY = "test-key"


def new_engine(tiny_checkpoints, **kwargs):
    return Engine.from_pretrained(tiny_checkpoints["tiny-qwen2-vl"], dtype=torch.float32,
                                  **{"max_batch": 4, "max_len": 4096, **kwargs})


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    e = new_engine(tiny_checkpoints)
    yield e
    e.close()


@pytest.fixture(scope="module")
def server(engine):
    with ThreadedServer(create_app(engine, served_model_name=MODEL, api_key=KEY)) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def image_messages(text="What is in the picture?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_uri(56, 84)}},
                                         {"type": "text", "text": text}]}]


def metrics(server) -> dict:
    return parse_prometheus(httpx.get(server.url + "/metrics", timeout=10).text)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_chat_with_an_image_streamed_and_not(client, engine):
    done = client.chat.completions.create(model=MODEL, messages=image_messages(), max_tokens=8, temperature=0)
    assert done.object == "chat.completion" and done.model == MODEL
    [choice] = done.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    text_only = client.chat.completions.create(model=MODEL, max_tokens=1, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is in the picture?"}]}])
    # the 56x84 image is 2x3 merged patches: 6 tokens between <|vision_start|> and <|vision_end|>
    assert done.usage.prompt_tokens == text_only.usage.prompt_tokens + 6 + 2
    assert 1 <= done.usage.completion_tokens <= 8
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens

    stream = client.chat.completions.create(model=MODEL, messages=image_messages(), max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the same answer
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == done.usage.model_dump()


def test_stream_without_usage_and_seeded_sampling(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Say something."}], max_tokens=6,
                  temperature=0.8, top_p=0.9, seed=1234, extra_body={"top_k": 20, "ignore_eos": True})
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert a.usage.completion_tokens == 6 and a.choices[0].finish_reason == "length"
    assert a.choices[0].message.content == b.choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_errors_reach_the_client_as_its_exception_classes(client, server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=image_messages(), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.chat.completions.create(model=MODEL, messages=image_messages(), max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="not fetched"):
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]}])
    with pytest.raises(openai.BadRequestError, match="exceeds the KV cache"):
        client.chat.completions.create(model=MODEL, messages=image_messages(), max_tokens=5000)
    assert client.chat.completions.create(model=MODEL, messages=image_messages(), max_tokens=2).choices


def _long_request(stream: bool) -> dict:
    """Seconds of decoding on any CPU (4000 tokens): a disconnect or shutdown always comes mid-request."""
    return {"model": MODEL, "messages": [{"role": "user", "content": "Count."}], "max_tokens": 4000,
            "temperature": 0, "ignore_eos": True, "stream": stream}


def test_a_stream_whose_client_disconnects_frees_its_slot(server):
    before = sample(metrics(server), "qwen2vl_fast_requests_total", outcome="cancelled")
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=_long_request(True), headers=headers) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
            assert wait_for(lambda: sample(metrics(server), "qwen2vl_fast_kv_slots_in_use") == 1)
    # the connection is closed mid-stream
    assert wait_for(lambda: sample(metrics(server), "qwen2vl_fast_kv_slots_in_use") == 0), "slot still held"
    assert sample(metrics(server), "qwen2vl_fast_requests_total", outcome="cancelled") == before + 1


def test_a_plain_request_whose_client_disconnects_is_cancelled(server):
    before = sample(metrics(server), "qwen2vl_fast_requests_total", outcome="cancelled")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=_long_request(False),
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=httpx.Timeout(30, read=0.3))
    assert wait_for(lambda: sample(metrics(server), "qwen2vl_fast_kv_slots_in_use") == 0), "slot still held"
    assert sample(metrics(server), "qwen2vl_fast_requests_total", outcome="cancelled") == before + 1


def test_shutdown_cancels_requests_in_flight(tiny_checkpoints):
    engine = new_engine(tiny_checkpoints)
    app = create_app(engine, served_model_name=MODEL, close_engine_on_shutdown=True)
    with ThreadedServer(app) as s:
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", s.url + "/v1/chat/completions", json=_long_request(True)) as r:
                lines = (line for line in r.iter_lines() if line)
                next(lines)
                assert wait_for(lambda: engine.metrics()["generated_tokens_total"] > 0)  # decoding
                t0 = time.monotonic()
                app.state.server.begin_shutdown()
                rest = list(lines)
            assert time.monotonic() - t0 < 10
            assert rest[-1] == "data: [DONE]" and '"error"' in rest[-2], rest[-3:]
            assert json.loads(rest[-2][6:])["error"]["code"] == "cancelled"
            r = http.post(s.url + "/v1/chat/completions", json=_long_request(False))
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            assert http.get(s.url + "/health").status_code == 503
    with pytest.raises(Exception, match="closed"):
        engine.submit([{"role": "user", "content": "hi"}], max_new_tokens=1)


def test_a_queued_request_is_cancelled_when_its_client_disconnects():
    """The scripted engine with one slot: the second stream waits in the queue; its client leaves; the queue
    empties without the slot ever being taken by it."""
    engine = FakeEngine(max_batch=1, token_delay=0.02)
    app = create_app(engine, served_model_name=MODEL)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 100, "stream": True}
    try:
        with ThreadedServer(app) as s, httpx.Client(timeout=30) as http:
            with http.stream("POST", s.url + "/v1/chat/completions", json=body) as first:
                first_lines = first.iter_lines()  # held: a dropped iterator would close the connection
                assert next(first_lines).startswith("data: ")
                with http.stream("POST", s.url + "/v1/chat/completions", json=body) as second:
                    second_lines = second.iter_lines()
                    assert next(second_lines).startswith("data: ")
                    assert engine.metrics()["queue_depth"] == 1
                assert wait_for(lambda: engine.metrics()["queue_depth"] == 0)
                assert engine.handles[1].finish_reason == "cancelled", engine.handles[1].finish_reason
                assert engine.metrics()["running"] == 1, (engine.handles[0].finish_reason, engine.metrics())
    finally:
        engine.close()
