"""The server under load, over real HTTP (uvicorn on loopback) with the `openai` async client:
- 32 concurrent clients with different images, prompts and max_tokens, half streamed, greedy: each completion's
  token ids (vLLM's `return_token_ids` extension) equal that request run alone through `Engine.generate`;
- seeded sampling gives the same tokens alone and inside the busy batch;
- a soak of 1,000 requests with mixed image sizes: no error, and resident memory stays bounded."""

import asyncio
import os
import random

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import httpx  # noqa: E402
import torch  # noqa: E402

from helpers_server import ThreadedServer, png_data_uri  # noqa: E402
from qwen2vl_fast.engine import Engine  # noqa: E402
from qwen2vl_fast.server import create_app  # noqa: E402

MODEL = "tiny-vl"


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    e = Engine.from_pretrained(tiny_checkpoints["tiny-qwen2-vl"], dtype=torch.float32, max_batch=8, max_len=1024,
                               vision_cache_mb=8)
    yield e
    e.close()


@pytest.fixture(scope="module")
def server(engine):
    with ThreadedServer(create_app(engine, served_model_name=MODEL)) as s:
        yield s


def request(i: int):
    """(OpenAI messages, the engine's chat for the same request, max_tokens): varied sizes, texts, lengths."""
    text = f"Client {i}: what is in picture {i}?" + " Please be brief." * (i % 3)
    uri = png_data_uri(28 * (1 + i % 5), 28 * (2 + (i * 3) % 4), seed=i) if i % 4 else None
    messages = [{"role": "user", "content": ([{"type": "image_url", "image_url": {"url": uri}}] if uri else [])
                 + [{"type": "text", "text": text}]}]
    chat = [{"role": "user", "content": ([{"type": "image", "image": uri}] if uri else [])
             + [{"type": "text", "text": text}]}]
    return messages, chat, 3 + (i * 7) % 11


async def ask(client, messages, max_tokens, stream, **extra):
    body = {"return_token_ids": True, "ignore_eos": True, **extra}
    if not stream:
        r = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                                 temperature=extra.pop("temperature", 0), extra_body=body)
        return r.choices[0].model_extra["token_ids"], r.usage.completion_tokens
    ids, usage = [], None
    events = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                                  temperature=extra.pop("temperature", 0), stream=True,
                                                  stream_options={"include_usage": True}, extra_body=body)
    async for chunk in events:
        if chunk.choices:
            ids += chunk.choices[0].model_extra.get("token_ids") or []
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return ids, usage


def test_32_concurrent_clients_each_get_their_alone_tokens(engine, server):
    n = 32
    reqs = [request(i) for i in range(n)]
    expected = [engine.generate(chat, max_new_tokens=m, ignore_eos=True)[0].token_ids for _, chat, m in reqs]

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(ask(client, msgs, m, stream=i % 2 == 1)
                                          for i, (msgs, _, m) in enumerate(reqs)))
        finally:
            await client.close()

    got = asyncio.run(main())
    assert [ids for ids, _ in got] == expected
    assert [usage for _, usage in got] == [len(e) for e in expected]
    assert engine.metrics()["kv_slots_in_use"] == 0


def test_seeded_sampling_same_alone_and_in_a_busy_batch(engine, server):
    msgs, _, _ = request(5)
    seeded = dict(temperature=0.8, seed=77, top_p=0.9)

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        try:
            alone = await ask(client, msgs, 12, stream=False, **seeded)
            noise = [ask(client, request(i)[0], 16, stream=True, temperature=1.0) for i in range(6, 14)]
            busy = await asyncio.gather(ask(client, msgs, 12, stream=True, **seeded), *noise)
            return alone, busy[0]
        finally:
            await client.close()

    alone, busy = asyncio.run(main())
    assert alone[0] == busy[0] and len(alone[0]) == 12


def test_soak_1000_requests_mixed_image_sizes_bounded_memory(engine, server):
    """Bound: resident memory grows by at most 160 MiB between request 200 and request 1,000 (the positions
    table cache's 64 MiB, this engine's 8 MiB vision cache, allocator and HTTP slack); every request succeeds."""

    def rss_mib():
        with open(f"/proc/{os.getpid()}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    rng = random.Random(1)
    sizes = [(rng.randint(28, 280), rng.randint(28, 280)) for _ in range(1000)]
    marks, statuses = {}, []

    async def main():
        limits = httpx.Limits(max_connections=8)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
            queue = asyncio.Queue()
            for i in range(1000):
                queue.put_nowait(i)

            async def worker():
                while not queue.empty():
                    i = queue.get_nowait()
                    h, w = sizes[i]
                    body = {"model": MODEL, "max_tokens": 1 + i % 3, "temperature": 0, "ignore_eos": True,
                            "messages": [{"role": "user", "content": [
                                {"type": "image_url", "image_url": {"url": png_data_uri(h, w, seed=i)}},
                                {"type": "text", "text": f"soak {i}"}]}]}
                    r = await http.post("/v1/chat/completions", json=body)
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        assert r.json()["usage"]["completion_tokens"] == 1 + i % 3
                    if i in (200, 999):
                        marks[i] = rss_mib()

            await asyncio.gather(*(worker() for _ in range(8)))

    asyncio.run(main())
    assert statuses.count(200) == 1000, {s: statuses.count(s) for s in set(statuses)}
    m = engine.metrics()
    assert m["kv_slots_in_use"] == 0 and m["vision_cache"]["bytes"] <= 8 * 2**20
    growth = marks[999] - marks[200]
    print(f"RSS at request 200: {marks[200]:.0f} MiB, at 1000: {marks[999]:.0f} MiB (growth {growth:.0f} MiB)")
    assert growth < 160
