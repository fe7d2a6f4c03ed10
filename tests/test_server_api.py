"""The OpenAI-compatible server in-process (fastapi's TestClient), over a scripted engine (exact texts, the
request -> Engine.submit mapping, failures on demand) and over the real engine on a tiny random checkpoint:
response and stream shapes, the bad-input catalog (each a 4xx in OpenAI's error shape, the server serving
normally afterwards), auth, 429 / 503, engine failures, images and videos, /metrics in the Prometheus format."""

import base64
import json
import os

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

import torch  # noqa: E402

from helpers_server import (FakeEngine, QueueFullError, mp4_bytes, parse_prometheus, png_data_uri,  # noqa: E402
                            sample, write_png)
from qwen2vl_fast.engine import Engine  # noqa: E402
from qwen2vl_fast.errors import EngineError, InputError  # noqa: E402
from qwen2vl_fast.server import create_app  # noqa: E402

MODEL = "tiny-vl"


def client_for(engine, **kwargs):
    return TestClient(create_app(engine, served_model_name=MODEL, **kwargs), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    write_png(root / "cat.png")
    outside = tmp_path_factory.mktemp("outside")
    write_png(outside / "secret.png")
    os.symlink(outside / "secret.png", root / "link.png")
    return root


@pytest.fixture(scope="module")
def engine():
    e = FakeEngine(max_len=256)
    yield e
    e.close()


@pytest.fixture(scope="module")
def client(engine, media_dir):
    return client_for(engine, allowed_local_media_path=str(media_dir))


@pytest.fixture(scope="module")
def real_engine(tiny_checkpoints):
    e = Engine.from_pretrained(tiny_checkpoints["tiny-qwen2-vl"], dtype=torch.float32, max_batch=2, max_len=256)
    yield e
    e.close()


@pytest.fixture(scope="module", params=["scripted", "real"])
def any_client(request, engine, media_dir):
    """A client over the scripted engine, then over the real one (max_len 256 both)."""
    e = engine if request.param == "scripted" else request.getfixturevalue("real_engine")
    return client_for(e, allowed_local_media_path=str(media_dir))


def chat(text="Describe it.", image=None, **extra):
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 5,
            **extra}


def sse_events(response):
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def assert_serving(client):
    r = client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200, r.text


# -- responses ------------------------------------------------------------------------------------------------

def test_completion_has_the_openai_shape(client, engine):
    r = client.post("/v1/chat/completions", json=chat(image=png_data_uri()))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["message"] == {"role": "assistant", "content": engine.expected_text(5)}
    prompt = engine.handles[-1].prompt_tokens
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": 5, "total_tokens": prompt + 5}
    submitted_chat, kwargs = engine.submitted[-1]
    assert submitted_chat == [{"role": "user", "content": [{"type": "image", "image": png_data_uri()},
                                                           {"type": "text", "text": "Describe it."}]}]
    assert kwargs["max_new_tokens"] == 5 and kwargs["temperature"] == 0


def test_request_fields_map_to_submit(client, engine):
    body = chat(temperature=0.7, top_p=0.9, top_k=-1, seed=7, stop=["house", "sky"], repetition_penalty=1.1,
                max_tokens=None, max_completion_tokens=6, mm_processor_kwargs={"min_pixels": 3136, "max_pixels": 50176},
                n=1, user="u1", frequency_penalty=0, presence_penalty=0.0, logprobs=False, ignore_eos=True)
    body["messages"].insert(0, {"role": "system", "content": "Be brief."})
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    chat_sent, kwargs = engine.submitted[-1]
    assert chat_sent[0] == {"role": "system", "content": "Be brief."}
    assert kwargs == dict(max_new_tokens=6, temperature=0.7, top_k=0, top_p=0.9, repetition_penalty=1.1, seed=7,
                          ignore_eos=True, stop=("house", "sky"), min_pixels=3136, max_pixels=50176)


def test_default_max_tokens_is_what_fits_at_most_512(engine, client):
    body = chat(max_tokens=None)
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    prompt = engine.handles[-1].prompt_tokens
    assert engine.submitted[-1][1]["max_new_tokens"] == min(512, engine.max_len - prompt)
    big = FakeEngine(max_len=100_000)
    try:
        assert client_for(big).post("/v1/chat/completions", json=body).status_code == 200
        assert big.submitted[-1][1]["max_new_tokens"] == 512
    finally:
        big.close()


def test_defaults_are_openai_s_temperature_1(client, engine):
    body = chat()
    del body["temperature"]
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert engine.submitted[-1][1]["temperature"] == 1.0 and engine.submitted[-1][1]["top_p"] == 1.0


def test_stop_string_ends_with_finish_reason_stop(client):
    r = client.post("/v1/chat/completions", json=chat(stop="red", max_tokens=20))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == "The picture shows a small "


def test_eos_gives_finish_reason_stop():
    e = FakeEngine(eos_after=3)
    try:
        body = client_for(e).post("/v1/chat/completions", json=chat(max_tokens=20)).json()
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["choices"][0]["message"]["content"] == e.expected_text(3)
        assert body["usage"]["completion_tokens"] == 4  # the EOS token counts
    finally:
        e.close()


def test_stream_chunks_have_the_openai_shape(client, engine):
    r = client.post("/v1/chat/completions", json=chat(stream=True, max_tokens=4))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert len({e["id"] for e in events}) == 1 and all(e["object"] == "chat.completion.chunk" for e in events)
    assert all(e["model"] == MODEL and "usage" not in e for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == engine.expected_text(4)
    assert events[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])


def test_stream_include_usage_adds_a_last_usage_chunk(client, engine):
    r = client.post("/v1/chat/completions",
                    json=chat(stream=True, max_tokens=3, stream_options={"include_usage": True}))
    events = sse_events(r)
    assert all(e["usage"] is None for e in events[:-1])
    last = events[-1]
    prompt = engine.handles[-1].prompt_tokens
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": prompt, "completion_tokens": 3,
                                                       "total_tokens": prompt + 3}
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_local_media_inside_the_allowed_folder(client, engine, media_dir):
    for url in ("cat.png", str(media_dir / "cat.png"), f"file://{media_dir / 'cat.png'}",
                f"file://{str(media_dir / 'cat.png').replace('/', '/./')}"):
        r = client.post("/v1/chat/completions", json=chat(image=url))
        assert r.status_code == 200, (url, r.text)
        assert engine.submitted[-1][0][0]["content"][0] == {"type": "image", "image": str(media_dir / "cat.png")}


def test_video_data_uri_becomes_a_temporary_file(client, engine):
    uri = "data:video/mp4;base64," + base64.b64encode(b"not really an mp4").decode()
    body = chat()
    body["messages"][0]["content"].insert(0, {"type": "video_url", "video_url": {"url": uri}})
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    path = engine.submitted[-1][0][0]["content"][0]["video"]
    assert path.endswith(".mp4") and not os.path.exists(path)  # removed once submit preprocessed it


def test_models_and_health(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    [card] = r.json()["data"]
    assert r.json()["object"] == "list" and card["id"] == MODEL and card["object"] == "model"
    assert card["max_model_len"] == 256
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert client.get("/health").json() == {"status": "ok"}


# -- the bad-input catalog ---------------------------------------------------------------------------------------

def _corrupt_png():
    return "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20).decode()


def _with_images(n, h=40, w=56):
    body = chat()
    body["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": png_data_uri(h, w)}}] * n
    return body


def _long_prompt():
    return chat(text="word " * 300)


def _set(**fields):
    return lambda: chat(**fields)


def _message(**fields):
    body = chat()
    body["messages"][0].update(fields)
    return body


CATALOG = [
    # (name, body or callable, status, words the message holds, param)
    ("corrupt image", lambda: chat(image=_corrupt_png()), 400, "cannot read", None),
    ("bad base64", lambda: chat(image="data:image/png;base64,@@@"), 400, "base64", None),
    ("not an image data URI", lambda: chat(image="data:text/plain;base64,aGk="), 400, "data:image/", None),
    ("remote URL", lambda: chat(image="https://example.com/cat.png"), 400, "not fetched",
     "messages[0].content[0].image_url.url"),
    ("other scheme", lambda: chat(image="ftp://example.com/cat.png"), 400, "unsupported URL scheme", None),
    ("path outside the folder", lambda: chat(image="/etc/passwd"), 400, "outside the allowed", None),
    ("dot-dot escape", lambda: chat(image="../outside0/secret.png"), 400, "outside the allowed", None),
    ("symlink escape", lambda: chat(image="link.png"), 400, "outside the allowed", None),
    ("missing local file", lambda: chat(image="nope.png"), 400, "no such image file", None),
    ("too many images", lambda: _with_images(17), 400, "at most 16", "messages"),
    ("images overflow the cache", lambda: _with_images(5, 224, 224), 400, "exceeds the KV cache", None),
    ("over-long prompt", _long_prompt, 400, "exceeds the KV cache", None),
    ("negative max_tokens", _set(max_tokens=-1), 400, "max_tokens", "max_tokens"),
    ("zero max_completion_tokens", _set(max_completion_tokens=0), 400, "max_completion_tokens",
     "max_completion_tokens"),
    ("float max_tokens", _set(max_tokens=2.5), 400, "integer", "max_tokens"),
    ("n=2", _set(n=2), 400, "n=1", "n"),
    ("unknown field", _set(foo_bar=1), 400, "foo_bar", "foo_bar"),
    ("presence_penalty", _set(presence_penalty=0.5), 400, "presence_penalty", "presence_penalty"),
    ("logprobs", _set(logprobs=True), 400, "logprobs", "logprobs"),
    ("temperature string", _set(temperature="hot"), 400, "temperature", "temperature"),
    ("negative temperature", _set(temperature=-1), 400, "temperature", "temperature"),
    ("top_p 0", _set(top_p=0), 400, "top_p", "top_p"),
    ("stop of numbers", _set(stop=[1, 2]), 400, "stop", "stop"),
    ("empty stop", _set(stop=""), 400, "stop", "stop"),
    ("bool seed", _set(seed=True), 400, "seed", "seed"),
    ("stream_options without stream", _set(stream_options={"include_usage": True}), 400, "stream", "stream_options"),
    ("unknown mm kwarg", _set(mm_processor_kwargs={"fps": 2}), 400, "fps", "mm_processor_kwargs.fps"),
    ("min_pixels > max_pixels", _set(mm_processor_kwargs={"min_pixels": 10_000, "max_pixels": 1000}), 400,
     "min_pixels", None),
    ("no messages", _set(messages=[]), 400, "messages", "messages"),
    ("tool role", lambda: _message(role="tool"), 400, "tool", "messages[0].role"),
    ("message name", lambda: _message(name="bob"), 400, "name", "messages[0].name"),
    ("audio part", lambda: _message(content=[{"type": "input_audio", "input_audio": {}}]), 400, "input_audio",
     "messages[0].content[0].type"),
    ("detail high", lambda: _message(content=[{"type": "image_url",
                                               "image_url": {"url": png_data_uri(), "detail": "high"}}]), 400,
     "detail", "messages[0].content[0].image_url.detail"),
    ("image in a system message", lambda: {**chat(), "messages": [
        {"role": "system", "content": [{"type": "image_url", "image_url": {"url": png_data_uri()}}]},
        {"role": "user", "content": "hi"}]}, 400, "user messages", None),
    ("body not an object", lambda: [1, 2], 400, "JSON object", None),
    ("unknown model", _set(model="gpt-4o"), 404, "gpt-4o", "model"),
]


@pytest.mark.parametrize("name,body,status,words,param", CATALOG, ids=[c[0] for c in CATALOG])
def test_bad_input_is_a_4xx_naming_the_problem(any_client, name, body, status, words, param):
    client = any_client
    r = client.post("/v1/chat/completions", json=body())
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"], error
    assert error["type"] == ("invalid_request_error")
    if param is not None:
        assert error["param"] == param, error
    assert_serving(client)


def test_malformed_json_is_a_400(any_client):
    client = any_client
    r = client.post("/v1/chat/completions", content=b'{"model": "tiny-vl", "messages": [',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", content=b"\xff\xfe", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = client.post("/v1/chat/completions", content=b"[" * 100_000 + b"]" * 100_000)
    assert r.status_code == 400
    r = client.post("/v1/chat/completions", json={**chat(), "metadata": {"a": [[[[1]]]] * 1000}})
    assert r.status_code == 200, r.text
    assert_serving(client)


def test_a_body_over_the_size_limit_is_a_413(engine):
    c = client_for(engine, max_request_bytes=2000)
    r = c.post("/v1/chat/completions", json=chat(image=png_data_uri()))
    assert r.status_code == 413 and "2000 bytes" in r.json()["error"]["message"]
    assert_serving(c)


def test_local_paths_are_refused_without_the_allowed_folder(engine, media_dir):
    c = client_for(engine)
    r = c.post("/v1/chat/completions", json=chat(image=str(media_dir / "cat.png")))
    assert r.status_code == 400 and "--allowed-local-media-path" in r.json()["error"]["message"]
    r = c.post("/v1/chat/completions", json=chat(image="http://example.com/a.png"))
    assert r.status_code == 400 and "data: URI" in r.json()["error"]["message"]


def test_unknown_routes_and_methods_answer_openai_errors(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = client.get("/v1/models/other-model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# -- auth -------------------------------------------------------------------------------------------------------

def test_api_key(engine):
    c = client_for(engine, api_key="sekret")
    wrong = ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}, {"Authorization": "Basic sekret"})
    for headers in wrong:
        r = c.post("/v1/chat/completions", json=chat(), headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers=headers).status_code == 401
    ok = {"Authorization": "Bearer sekret"}
    assert c.post("/v1/chat/completions", json=chat(), headers=ok).status_code == 200
    assert c.get("/v1/models", headers=ok).status_code == 200
    assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
    # the key is checked before the body: a wrong key with a bad body is still a 401
    assert c.post("/v1/chat/completions", content=b"{", headers={"Authorization": "Bearer no"}).status_code == 401


# -- the engine's refusals and failures ----------------------------------------------------------------------------

def test_queue_full_is_a_429(engine, monkeypatch):
    c = client_for(engine)

    def full(*args, **kwargs):
        raise QueueFullError("256 requests are queued")

    monkeypatch.setattr(engine, "submit", full)
    r = c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert "256 requests are queued" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert_serving(c)


def test_closed_engine_and_shutdown_are_503():
    e = FakeEngine()
    c = client_for(e)
    e.close()
    r = c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    e2 = FakeEngine()
    c2 = client_for(e2)
    c2.app.state.server.begin_shutdown().join(5)
    assert e2.closed
    assert c2.post("/v1/chat/completions", json=chat()).status_code == 503
    assert c2.get("/health").status_code == 503


@pytest.mark.parametrize("error,status", [(EngineError, 500), (InputError, 400)])
def test_an_engine_failure_mid_request(error, status):
    e = FakeEngine(fail_after=2, fail_with=error)
    try:
        c = client_for(e)
        r = c.post("/v1/chat/completions", json=chat())
        assert r.status_code == status and "out of memory in the decode step" in r.json()["error"]["message"]
        events = sse_events(c.post("/v1/chat/completions", json=chat(stream=True)))
        assert "".join(ev["choices"][0]["delta"].get("content", "") for ev in events[:-1]) == e.expected_text(2)
        assert "out of memory" in events[-1]["error"]["message"]
    finally:
        e.close()


def test_a_bug_in_the_engine_is_a_500_in_the_openai_shape(engine, monkeypatch):
    c = client_for(engine)
    monkeypatch.setattr(engine, "submit", lambda *a, **k: 1 / 0)
    r = c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"


def test_a_model_without_tokenizer_is_refused_clearly(monkeypatch):
    e = FakeEngine()
    e.processor = None
    r = client_for(e).post("/v1/chat/completions", json=chat())
    assert r.status_code == 500 and "no tokenizer" in r.json()["error"]["message"]
    e.close()


# -- /metrics ---------------------------------------------------------------------------------------------------

def test_metrics_parse_as_prometheus_text():
    e = FakeEngine()
    try:
        c = client_for(e)
        assert c.post("/v1/chat/completions", json=chat(max_tokens=4)).status_code == 200
        assert c.post("/v1/chat/completions", json=chat(stream=True, max_tokens=3)).status_code == 200
        assert c.post("/v1/chat/completions", json=chat(n=3)).status_code == 400
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        fams = parse_prometheus(r.text)
        p = "qwen2vl_fast_"
        assert sample(fams, p + "requests_total", outcome="finished") == 2
        assert sample(fams, p + "requests_total", outcome="rejected") == 0
        assert sample(fams, p + "http_responses_total", route="/v1/chat/completions", code=200) == 2
        assert sample(fams, p + "http_responses_total", route="/v1/chat/completions", code=400) == 1
        assert sample(fams, p + "generated_tokens_total") == 7
        assert sample(fams, p + "prompt_tokens_total") == e.handles[0].prompt_tokens + e.handles[1].prompt_tokens
        assert sample(fams, p + "time_to_first_token_seconds_count") == 2
        assert sample(fams, p + "inter_token_latency_seconds_count") == 5
        for name, kind in [("queue_depth", "gauge"), ("running_requests", "gauge"), ("kv_slots_in_use", "gauge"),
                           ("kv_slots_total", "gauge"), ("vision_cache_hits_total", "counter"),
                           ("vision_cache_misses_total", "counter"), ("time_to_first_token_seconds", "histogram"),
                           ("inter_token_latency_seconds", "histogram")]:
            assert fams[p + name]["type"] == kind
        assert sample(fams, p + "kv_slots_total") == 4
    finally:
        e.close()


def test_the_prometheus_parser_catches_malformed_text():
    with pytest.raises(AssertionError):
        parse_prometheus("# TYPE a counter\na{x=1} 2\n")  # unquoted label
    with pytest.raises(AssertionError):
        parse_prometheus("b 1\n")  # no family
    with pytest.raises(AssertionError):
        parse_prometheus('# TYPE h histogram\nh_bucket{le="1"} 3\nh_bucket{le="+Inf"} 2\nh_sum 1\nh_count 2\n')


# -- the real engine: images, videos, both response kinds ------------------------------------------------------------

def video_chat(url, **extra):
    body = chat(**extra)
    body["messages"][0]["content"].insert(0, {"type": "video_url", "video_url": {"url": url}})
    return body


@pytest.fixture(scope="module")
def long_engine(tiny_checkpoints):
    """The real engine with room for a video (its frames get at least 128 * 784 pixels: 256+ tokens)."""
    e = Engine.from_pretrained(tiny_checkpoints["tiny-qwen2-vl"], dtype=torch.float32, max_batch=2, max_len=2048)
    yield e
    e.close()


def test_real_engine_image_and_video(long_engine, media_dir):
    c = client_for(long_engine, allowed_local_media_path=str(media_dir))
    text_only = c.post("/v1/chat/completions", json=chat(max_tokens=1)).json()["usage"]["prompt_tokens"]
    r = c.post("/v1/chat/completions", json=chat(image=png_data_uri(56, 84)))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == text_only + 2 + 6  # <|vision_start|> 2x3 tokens <|vision_end|>
    uri = "data:video/mp4;base64," + base64.b64encode(mp4_bytes()).decode()
    done = c.post("/v1/chat/completions", json=video_chat(uri))
    assert done.status_code == 200, done.text
    assert done.json()["usage"]["prompt_tokens"] > text_only + 2
    (media_dir / "clip.mp4").write_bytes(mp4_bytes())
    local = c.post("/v1/chat/completions", json=video_chat("clip.mp4")).json()
    assert local["usage"] == done.json()["usage"] and local["choices"] == done.json()["choices"]
    events = sse_events(c.post("/v1/chat/completions", json=video_chat(uri, stream=True)))
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == \
        done.json()["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == done.json()["choices"][0]["finish_reason"]


def test_real_engine_bad_video_is_a_400(real_engine):
    c = client_for(real_engine)
    uri = "data:video/mp4;base64," + base64.b64encode(b"definitely not a video" * 10).decode()
    r = c.post("/v1/chat/completions", json=video_chat(uri))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "VideoError"
    assert_serving(c)
