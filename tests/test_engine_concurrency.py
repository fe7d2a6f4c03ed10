"""The engine core under concurrency (issue: serving): one scheduler thread, continuous batching, per-request
sampling streams, cancellation, the vision cache, admission before the vision tower, queue limits and close.

The reference for every request is the same request run alone through `Engine.generate` on an idle engine."""

import asyncio
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl_fast.engine import Engine
from qwen2vl_fast.errors import EngineClosedError, PromptError, QueueFullError

FAMILIES = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]


def picture(h, w, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def chat(i: int):
    """A varied request: every third one without an image, sizes and texts differ."""
    text = f"Request {i}: describe {'the picture' if i % 3 else 'a cat'} in {i % 5 + 1} words."
    content = [{"type": "text", "text": text}]
    if i % 3:
        content.insert(0, {"type": "image", "image": picture(28 * (2 + i % 4), 28 * (2 + (i * 7) % 5), i)})
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module", params=FAMILIES)
def engine(request, tiny_checkpoints):
    return Engine.from_pretrained(tiny_checkpoints[request.param], dtype=torch.float32, max_batch=8, max_len=512)


@pytest.fixture(scope="module")
def alone(engine):
    """Each request's tokens when it runs alone (memoised per engine)."""
    memo = {}

    def run(i, max_new_tokens, **kw):
        key = (i, max_new_tokens, tuple(sorted(kw.items())))
        if key not in memo:
            [c] = engine.generate(chat(i), max_new_tokens=max_new_tokens, **kw)
            memo[key] = c.token_ids
        return memo[key]

    return run


def test_32_concurrent_greedy_requests_each_get_their_alone_tokens(engine, alone):
    n = 32
    lengths = [3 + (i * 5) % 11 for i in range(n)]
    expected = [alone(i, lengths[i], ignore_eos=True) for i in range(n)]
    got = [None] * n

    def client(i):
        got[i] = engine.submit(chat(i), max_new_tokens=lengths[i], ignore_eos=True).result(timeout=120).token_ids

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected
    m = engine.metrics()
    assert m["running"] == 0 and m["queue_depth"] == 0 and m["kv_slots_in_use"] == 0


def test_four_threads_sharing_generate_get_the_sequential_tokens(engine, alone):
    expected = {i: alone(i, 8) for i in range(4)}
    got = {}

    def worker(i):
        got[i] = engine.generate(chat(i), max_new_tokens=8)[0].token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def test_interleaved_streams_each_give_their_own_tokens_and_text(engine, alone):
    a = engine.stream(chat(1), max_new_tokens=6, ignore_eos=True)
    b = engine.stream(chat(2), max_new_tokens=9, ignore_eos=True)
    tokens = {"a": [], "b": []}
    texts = {"a": "", "b": ""}
    live = {"a": a, "b": b}
    while live:
        for name in list(live):
            event = next(live[name], None)
            if event is None:
                del live[name]
                continue
            tokens[name].append(event.token_id)
            texts[name] += event.text
    assert tokens["a"] == alone(1, 6, ignore_eos=True)
    assert tokens["b"] == alone(2, 9, ignore_eos=True)
    [ref] = engine.generate(chat(2), max_new_tokens=9, ignore_eos=True)
    assert texts["b"] == ref.text


def test_seeded_sampling_gives_the_same_tokens_alone_and_in_a_busy_batch(engine):
    kw = dict(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    [solo] = engine.generate(chat(4), **kw)
    noise = [engine.submit(chat(i), max_new_tokens=12, temperature=1.0, ignore_eos=True) for i in (5, 6, 7)]
    busy = engine.submit(chat(4), **kw)
    noise += [engine.submit(chat(i), max_new_tokens=12, temperature=0.7, seed=i, ignore_eos=True) for i in (8, 9)]
    assert busy.result(timeout=60).token_ids == solo.token_ids
    for h in noise:
        h.result(timeout=60)
    # and a batch of the same prompt: every row samples from its own seeded stream
    rows = engine.generate([chat(4), chat(4)], **kw)
    assert [r.token_ids for r in rows] == [solo.token_ids, solo.token_ids]


def test_cancelling_mid_stream_frees_the_slot_for_a_full_batch(tiny_checkpoints):
    engine = Engine.from_pretrained(tiny_checkpoints["tiny-qwen2-vl"], dtype=torch.float32, max_batch=2,
                                    max_len=512)
    first = engine.submit(chat(1), max_new_tokens=400, ignore_eos=True)
    second = engine.stream(chat(2), max_new_tokens=400, ignore_eos=True)
    for _ in range(3):
        next(second)
    got = 0
    for event in first:
        got += 1
        if got == 3:
            first.cancel()
        if event.finished:
            assert event.finish_reason == "cancelled"
    assert 3 <= got < 400
    second.close()  # abandoning a stream cancels it
    deadline = time.monotonic() + 30
    while engine.metrics()["kv_slots_in_use"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.metrics()["kv_slots_in_use"] == 0
    full = engine.generate([chat(3), chat(4)], max_new_tokens=4, ignore_eos=True)
    assert [len(c.token_ids) for c in full] == [4, 4]
    assert engine.metrics()["requests"]["cancelled"] == 2


def test_async_iteration(engine, alone):
    async def main():
        handles = [engine.submit(chat(i), max_new_tokens=5, ignore_eos=True) for i in (10, 11)]
        out = []
        for h in handles:
            out.append([e.token_id async for e in h])
        return out

    assert asyncio.run(main()) == [alone(10, 5, ignore_eos=True), alone(11, 5, ignore_eos=True)]


def test_identical_images_reuse_the_vision_tower_output(engine, monkeypatch):
    calls = []
    real = engine.model.encode_media

    def spy(kind, pixels, grid):
        calls.append(torch.as_tensor(grid).tolist())
        return real(kind, pixels, grid)

    monkeypatch.setattr(engine.model, "encode_media", spy)
    before = engine.metrics()["vision_cache"]
    img = picture(84, 112, 99)
    prompt = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Hi"}]}]
    [a] = engine.generate(prompt, max_new_tokens=5, ignore_eos=True)
    [b] = engine.generate(prompt, max_new_tokens=5, ignore_eos=True)
    # the same picture next to a new one: only the new one goes through the tower
    two = [{"role": "user", "content": [{"type": "image", "image": picture(56, 56, 5)},
                                        {"type": "image", "image": img}, {"type": "text", "text": "Hi"}]}]
    engine.generate(two, max_new_tokens=2)
    after = engine.metrics()["vision_cache"]
    assert a.token_ids == b.token_ids
    assert len(calls) == 2 and len(calls[1]) == 1  # first request, then the new picture alone
    assert after["hits"] - before["hits"] == 2 and after["misses"] - before["misses"] == 2
    assert 0 < after["bytes"] <= after["capacity_bytes"]


def test_vision_cache_is_bounded_in_bytes(tiny_checkpoints):
    engine = Engine.from_pretrained(tiny_checkpoints["tiny-qwen2-vl"], dtype=torch.float32, max_batch=2,
                                    max_len=512, vision_cache_mb=0.01)
    for i in range(6):
        engine.generate([{"role": "user", "content": [{"type": "image", "image": picture(112, 112, i)},
                                                      {"type": "text", "text": "x"}]}], max_new_tokens=1)
    stats = engine.metrics()["vision_cache"]
    assert stats["bytes"] <= stats["capacity_bytes"] == int(0.01 * 2**20)
    assert stats["evictions"] > 0
    off = Engine.from_pretrained(tiny_checkpoints["tiny-qwen2-vl"], dtype=torch.float32, max_batch=1,
                                 max_len=256, vision_cache_mb=0)
    off.generate(chat(1), max_new_tokens=1)
    assert off.metrics()["vision_cache"]["entries"] == 0


def test_a_prompt_too_long_is_refused_in_submit_before_the_vision_tower(engine, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the vision tower ran")

    monkeypatch.setattr(engine.model, "encode_media", boom)
    big = [{"role": "user", "content": [{"type": "image", "image": picture(1000, 1000, 1), "max_pixels": 800 * 800},
                                        {"type": "text", "text": "Describe."}]}]
    t0 = time.perf_counter()
    with pytest.raises(PromptError, match="exceeds the KV cache length 512"):
        engine.submit(big, max_new_tokens=8)
    assert time.perf_counter() - t0 < 2
    assert engine.metrics()["requests"]["rejected"] >= 1


def letters(ids, skip_special_tokens=True):
    """A stand-in detokenizer: the tiny checkpoints' tokenizer knows few of the ids a random model emits."""
    return "".join(chr(97 + int(i) % 26) + ("\u00e9" if int(i) % 7 == 0 else "") for i in ids)


def test_stop_strings_end_the_text_before_them(engine, monkeypatch):
    monkeypatch.setattr(engine.processor, "decode", letters)
    [free] = engine.generate(chat(3), max_new_tokens=24, ignore_eos=True)
    text = free.text
    assert text == letters(free.token_ids)
    stop = text[5:8]
    [c] = engine.generate(chat(3), max_new_tokens=24, ignore_eos=True, stop=["\x00never", stop])
    assert c.finish_reason == "stop"
    assert c.text == text[:text.find(stop)]
    assert c.token_ids == free.token_ids[:len(c.token_ids)] and len(c.token_ids) < len(free.token_ids)
    events = list(engine.stream(chat(3), max_new_tokens=24, ignore_eos=True, stop=stop))
    assert "".join(e.text for e in events) == c.text
    assert events[-1].finished and events[-1].finish_reason == "stop"
    assert [e.token_id for e in events] == c.token_ids
    # a stop string that never comes: the whole text, held-back tails released at the end
    [d] = engine.generate(chat(3), max_new_tokens=24, ignore_eos=True, stop=text[-2:] + "#")
    assert d.text == text and d.finish_reason == "length"


def test_queue_limit_and_close(tiny_checkpoints):
    engine = Engine.from_pretrained(tiny_checkpoints["tiny-qwen2-vl"], dtype=torch.float32, max_batch=1,
                                    max_len=512, max_queue=2)
    running = engine.submit(chat(1), max_new_tokens=300, ignore_eos=True)
    next(iter(running))  # it holds the only slot now
    waiting = [engine.submit(chat(i), max_new_tokens=4) for i in (2, 3)]
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.submit(chat(4), max_new_tokens=4)
    engine.close(cancel=True)
    assert running.result(timeout=30).finish_reason == "cancelled"
    assert all(h.completion().finish_reason == "cancelled" for h in waiting if list(h) is not None)
    with pytest.raises(EngineClosedError):
        engine.submit(chat(5), max_new_tokens=4)


def test_close_without_cancel_lets_requests_finish(tiny_checkpoints):
    engine = Engine.from_pretrained(tiny_checkpoints["tiny-qwen2-vl"], dtype=torch.float32, max_batch=2,
                                    max_len=512)
    handles = [engine.submit(chat(i), max_new_tokens=6, ignore_eos=True) for i in (1, 2, 3)]
    engine.close(cancel=False)
    assert [len(h.result(timeout=30).token_ids) for h in handles] == [6, 6, 6]


def test_metrics_snapshot(engine):
    engine.generate(chat(1), max_new_tokens=3, ignore_eos=True)
    m = engine.metrics()
    for key in ("requests", "queue_depth", "running", "kv_slots_in_use", "kv_slots_total", "prompt_tokens_total",
                "generated_tokens_total", "vision_cache", "ttft_seconds", "inter_token_seconds"):
        assert key in m
    assert m["kv_slots_total"] == 8 and m["requests"]["finished"] > 0
    ttft = m["ttft_seconds"]
    assert ttft["count"] > 0 and ttft["buckets"][-1] == (float("inf"), ttft["count"])
    assert m["inter_token_seconds"]["count"] > 0


def test_an_idle_engine_holds_no_thread(tiny_checkpoints):
    engine = Engine.from_pretrained(tiny_checkpoints["tiny-qwen2-vl"], dtype=torch.float32, max_batch=1,
                                    max_len=256)
    engine.generate(chat(1), max_new_tokens=2)
    deadline = time.monotonic() + 10
    while engine.scheduler.thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.scheduler.thread is None


def test_text_stream_holds_back_incomplete_characters_and_stop_prefixes():
    from qwen2vl_fast.engine.request import TextStream

    table = {1: b"ab", 2: b"\xe2\x82", 3: b"\xac!", 4: b"ST", 5: b"OP", 6: b"z"}

    def decode(ids):
        return b"".join(table[i] for i in ids).decode("utf-8", errors="replace")

    plain = TextStream(decode)
    assert [plain.feed(t, False) for t in (1, 2, 3)] == ["ab", "", "\u20ac!"]
    stream = TextStream(decode, stop=("STOP",))
    out = [stream.feed(t, False) for t in (1, 4)]
    assert out == ["ab", ""] and not stream.stopped  # "ST" may begin "STOP": held back
    assert stream.feed(5, False) == "" and stream.stopped and stream.text == "ab"
    other = TextStream(decode, stop=("STOP",))
    assert [other.feed(t, t == 6) for t in (1, 4, 6)] == ["ab", "", "STz"]


def test_soak_of_1000_requests_with_mixed_image_sizes_keeps_memory_bounded(tiny_checkpoints):
    """1,000 requests, random image sizes (new grids nearly every time), four client threads. Bound: resident
    memory grows by at most 160 MiB from request 200 to request 1,000 (the table cache's 64 MiB, the vision
    cache's 16 MiB here, allocator slack); unbounded per-size caches grew ~5 MiB per new size before."""
    import os
    import random

    def rss_mib():
        with open(f"/proc/{os.getpid()}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    engine = Engine.from_pretrained(tiny_checkpoints["tiny-qwen2-vl"], dtype=torch.float32, max_batch=8,
                                    max_len=512, vision_cache_mb=16)
    rng = random.Random(0)
    sizes = [(rng.randint(28, 300), rng.randint(28, 300)) for _ in range(1000)]
    errors, marks = [], {}
    lock = threading.Lock()
    counter = iter(range(1000))

    def client():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            h, w = sizes[i]
            prompt = [{"role": "user", "content": [{"type": "image", "image": picture(h, w, i)},
                                                   {"type": "text", "text": f"soak {i}"}]}]
            try:
                c = engine.submit(prompt, max_new_tokens=1 + i % 3, ignore_eos=True).result(timeout=120)
                assert len(c.token_ids) == 1 + i % 3
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(repr(e))
            if i in (200, 999):
                marks[i] = rss_mib()

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    m = engine.metrics()
    assert m["requests"]["finished"] == 1000 and m["kv_slots_in_use"] == 0
    assert m["vision_cache"]["bytes"] <= 16 * 2**20
    growth = marks[999] - marks[200]
    print(f"RSS at request 200: {marks[200]:.0f} MiB, at 1000: {marks[999]:.0f} MiB (growth {growth:.0f} MiB)")
    assert growth < 160


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graph_continuous_batching_gives_each_request_its_alone_tokens(tiny_checkpoints, family):
    """Requests joining and leaving a graph-replayed batch (buckets padded with free slots) on the GPU: each
    gets the tokens the eager engine gives it alone."""
    path = tiny_checkpoints[family]
    graphs = Engine.from_pretrained(path, device="cuda", dtype=torch.float32, max_batch=8, max_len=512)
    eager = Engine.from_pretrained(path, device="cuda", dtype=torch.float32, max_batch=8, max_len=512,
                                   cuda_graphs=False, warmup=False)
    lengths = [3 + (i * 5) % 11 for i in range(20)]
    expected = [eager.generate(chat(i), max_new_tokens=lengths[i], ignore_eos=True)[0].token_ids for i in range(20)]
    handles = [graphs.submit(chat(i), max_new_tokens=lengths[i], ignore_eos=True) for i in range(20)]
    assert [h.result(timeout=120).token_ids for h in handles] == expected
    assert graphs.graphs is not None and graphs.graphs.graphs


def test_close_cancels_a_request_caught_in_its_prefill(tiny_checkpoints, monkeypatch):
    """close(cancel=True) while a request is between the queue and the running batch (in prefill)."""
    engine = Engine.from_pretrained(tiny_checkpoints["tiny-qwen2-vl"], dtype=torch.float32, max_batch=2,
                                    max_len=1024)
    entered, release = threading.Event(), threading.Event()
    real = engine.scheduler._prefill_rows

    def slow(group, slots):
        entered.set()
        release.wait(10)
        return real(group, slots)

    monkeypatch.setattr(engine.scheduler, "_prefill_rows", slow)
    handle = engine.submit(chat(1), max_new_tokens=900, ignore_eos=True)
    assert entered.wait(10)
    closer = threading.Thread(target=engine.close)
    closer.start()
    time.sleep(0.05)
    release.set()
    closer.join(10)
    assert not closer.is_alive()
    c = handle.result(timeout=10)
    assert c.finish_reason == "cancelled" and len(c.token_ids) < 900


def test_graph_buckets_pad_with_free_slots_only():
    """The scheduler's launch with a stub state and stub steps (no model): a batch of 3 holding slots 0, 4, 6 runs
    in the bucket of 4, and the padding row points at a free slot, never at one a running sequence holds; the
    rows are uploaded once for as long as the batch stays the same."""
    import types

    from qwen2vl_fast.engine.scheduler import Scheduler

    uploads = []
    state = types.SimpleNamespace(device=torch.device("cpu"), stop_ids=torch.tensor([7]),
                                  set_rows=lambda rows, active: uploads.append((list(rows), active)))
    steps = types.SimpleNamespace(buckets=[1, 2, 4, 8], replay=lambda bs, sampling: torch.arange(bs))
    sched = Scheduler(None, types.SimpleNamespace(max_batch=8), state, steps)
    sched.free_slots = [1, 2, 3, 5, 7]
    sched.running = [types.SimpleNamespace(slot=s, sampling=False, cache_len=5, in_flight=0) for s in (0, 4, 6)]
    first, second = sched._launch(sched.running), sched._launch(sched.running)
    assert uploads == [([0, 4, 6, 1], 3)]
    assert first.tokens.tolist() == [0, 1, 2, 3] and second.tokens.tolist() == [0, 1, 2, 3]
    assert first.tokens.data_ptr() != second.tokens.data_ptr()  # double-buffered: step n+1 never overwrites n
    assert [s.cache_len for s in sched.running] == [7, 7, 7]
