"""For the server tests: a scripted stand-in for the engine (its submit / handle / metrics / close contract, with
controllable speed and failures), PNG data URIs, an in-thread uvicorn, and a strict Prometheus text parser."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import os
import queue
import re
import socket
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import numpy as np
from PIL import Image

from qwen2vl_fast import errors
from qwen2vl_fast.engine.params import SamplingParams
from qwen2vl_fast.errors import EngineError, PromptError, VideoError
from qwen2vl_fast.processing.chat import check_messages, extract_media
from qwen2vl_fast.processing.image import load_image

# the engine's errors where errors.py has them, stand-ins (matched by name by the server) until then
QueueFullError = getattr(errors, "QueueFullError", None) or type("QueueFullError", (EngineError,), {})
EngineClosedError = getattr(errors, "EngineClosedError", None) or type("EngineClosedError", (EngineError,), {})

SCRIPT = "The picture shows a small red house under a blue sky with two trees .".split()
EOS = 151645
BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


def png_data_uri(h=40, w=56, seed=0) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def mp4_bytes(n=8, fps=4, w=56, h=56) -> bytes:
    """A small MPEG-4 video of n noise frames."""
    import av

    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for _ in range(n):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def write_png(path, h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format="PNG")
    return str(path)


@dataclass
class Event:
    index: int
    token_id: Optional[int]  # None on a closing event without a token (cancelled)
    text: str
    finished: bool
    finish_reason: Optional[str] = None


class _Histogram:
    def __init__(self):
        self.values: list = []

    def add(self, v: float):
        self.values.append(v)

    def export(self) -> dict:
        return {"buckets": [(le, sum(v <= le for v in self.values)) for le in BUCKETS] + [(math.inf, len(self.values))],
                "sum": float(sum(self.values)), "count": len(self.values)}


class FakeHandle:
    def __init__(self, engine: "FakeEngine", request_id: str, prompt_tokens: int, params: SamplingParams, stop):
        self.engine, self.request_id, self.prompt_tokens = engine, request_id, prompt_tokens
        self.params, self.stop = params, tuple(stop)
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.finish_reason: Optional[str] = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    # -- the contract ---------------------------------------------------------------------------------------
    def cancel(self):
        self.cancelled.set()

    def __iter__(self):
        while True:
            item = self.events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    async def __aiter__(self):
        while True:
            try:
                item = self.events.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.002)
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    # -- the scripted generation ------------------------------------------------------------------------------
    def _finish(self, reason, token_id=None, text=""):
        self.finish_reason = reason
        self.events.put(Event(0, token_id, text, True, reason))

    def _run(self):
        e = self.engine
        t0 = time.perf_counter()
        while not e.slots.acquire(timeout=0.005):  # queued
            if self.cancelled.is_set():
                with e.lock:
                    e.queued -= 1
                    e.counts["cancelled"] += 1
                self._finish("cancelled")
                self.done.set()
                return
        with e.lock:
            e.queued -= 1
            e.running += 1
        try:
            self._generate(t0)
        finally:
            with e.lock:
                e.running -= 1
                e.counts[{"cancelled": "cancelled", "failed": "failed"}.get(self.finish_reason, "finished")] += 1
            e.slots.release()
            self.done.set()

    def _generate(self, t0):
        e, p = self.engine, self.params
        offset = 0 if p.temperature == 0 else (p.seed if p.seed is not None else int(time.time_ns())) % len(SCRIPT)
        text, last = "", None
        for i in range(p.max_new_tokens):
            time.sleep(e.token_delay)
            now = time.perf_counter()
            if last is None:
                e.ttft.add(now - t0)
            else:
                e.itl.add(now - last)
            last = now
            if self.cancelled.is_set() or e.closed:
                self._finish("cancelled")
                return
            if e.fail_after is not None and i >= e.fail_after:
                self.finish_reason = "failed"
                self.events.put(e.fail_with(f"out of memory in the decode step of request {self.request_id}"))
                return
            with e.lock:
                e.generated += 1
            if i >= e.eos_after and not p.ignore_eos:
                self._finish("stop", EOS)
                return
            piece = ("" if i == 0 else " ") + SCRIPT[(i + offset) % len(SCRIPT)]
            cut = _first_stop(text + piece, self.stop)
            if cut is not None:
                self._finish("stop", 1000 + i, (text + piece)[len(text):cut])
                return
            text += piece
            final = i + 1 == p.max_new_tokens
            if final:
                self._finish("length", 1000 + i, piece)
            else:
                self.events.put(Event(0, 1000 + i, piece, False, None))


def _first_stop(text: str, stops) -> Optional[int]:
    cuts = [text.find(s) for s in stops if s in text]
    return min(cuts) if cuts else None


class FakeEngine:
    """Engine.submit's contract over a script: "The picture shows ..." (greedy from the first word; sampled
    runs start at seed % len), EOS after `eos_after` tokens, `token_delay` seconds per token, max_batch running
    requests and max_queue waiting ones. Prompt tokens: one per word and 3 per message, H*W/784 per image
    (decoded for real, so bad images raise ImageError; counted as 4 by the processor stand-in, before decoding),
    32 per video (a file that must exist). fail_after=k: the k-th
    token raises `fail_with` (EngineError) from the iterator."""

    def __init__(self, max_batch=4, max_len=256, max_queue=8, token_delay=0.0, eos_after=10_000, fail_after=None,
                 fail_with=EngineError):
        self.max_len, self.max_queue, self.token_delay = max_len, max_queue, token_delay
        self.eos_after, self.fail_after, self.fail_with = eos_after, fail_after, fail_with
        self.cache = SimpleNamespace(max_batch=max_batch)
        self.slots = threading.Semaphore(max_batch)
        self.lock = threading.Lock()
        self.queued = self.running = self.generated = self.prompt_total = 0
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self.ttft, self.itl = _Histogram(), _Histogram()
        self.closed = False
        self.submitted: list = []  # (chat, kwargs) of every accepted request
        self.handles: list = []
        self.processor = SimpleNamespace(count_tokens=lambda chats, **kw: [self._count(c, load=False) for c in chats])

    def _count(self, chat, load=True) -> int:
        check_messages(chat)
        n = 0
        for m in chat:
            n += 3
            parts = [m["content"]] if isinstance(m["content"], str) else \
                [p.get("text", "") for p in m["content"] if p.get("type") == "text"]
            n += sum(len(t.split()) for t in parts)
        images, videos = extract_media(chat)
        for item in images:
            if load:
                h, w = load_image(item["image"]).shape[1:]
                n += max(4, h * w // 784)  # about what the model's processor would give
            else:
                n += 4
        for item in videos:
            source = item["video"]
            if load and not (isinstance(source, str) and os.path.isfile(source)):
                raise VideoError(f"{source!r:.60}: no such video file")
            n += 32
        return n

    def submit(self, chat, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
               seed=None, ignore_eos=False, stop=(), min_pixels=None, max_pixels=None):
        if self.closed:
            raise EngineClosedError("the engine is closed")
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, ignore_eos)
        prompt = self._count(chat)
        if prompt + max_new_tokens > self.max_len:
            raise PromptError(f"prompt ({prompt} tokens) + max_new_tokens ({max_new_tokens}) = "
                              f"{prompt + max_new_tokens} exceeds the KV cache length {self.max_len}")
        with self.lock:
            if self.queued >= self.max_queue:
                self.counts["rejected"] += 1
                raise QueueFullError(f"{self.queued} requests are queued (max_queue {self.max_queue})")
            self.queued += 1
            self.prompt_total += prompt
        handle = FakeHandle(self, f"req-{len(self.handles)}", prompt, params, stop)
        self.submitted.append((chat, dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                          top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                                          ignore_eos=ignore_eos, stop=tuple(stop), min_pixels=min_pixels,
                                          max_pixels=max_pixels)))
        self.handles.append(handle)
        handle.thread.start()
        return handle

    def metrics(self) -> dict:
        with self.lock:
            return {"requests": dict(self.counts), "queue_depth": self.queued, "running": self.running,
                    "kv_slots_in_use": self.running, "kv_slots_total": self.cache.max_batch,
                    "prompt_tokens_total": self.prompt_total, "generated_tokens_total": self.generated,
                    "vision_cache": {"hits": 0, "misses": 0, "bytes": 0, "capacity_bytes": 0},
                    "ttft_seconds": self.ttft.export(), "inter_token_seconds": self.itl.export()}

    def close(self, cancel=True):
        self.closed = True
        for h in self.handles:
            if cancel:
                h.cancel()
        for h in self.handles:
            h.thread.join(timeout=10)

    def expected_text(self, n: int) -> str:
        return " ".join(SCRIPT[i % len(SCRIPT)] for i in range(n))


# -- uvicorn in a thread ---------------------------------------------------------------------------------------

class ThreadedServer:
    """uvicorn serving `app` on a free loopback port, in a thread (no signal handlers)."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


# -- Prometheus text format 0.0.4 --------------------------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)(?: (-?\d+))?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def parse_prometheus(text: str) -> dict:
    """Strictly parse the text exposition format: {family: {"type", "help", "samples": [(name, labels, value)]}}.
    Raises AssertionError on anything malformed: a sample of no declared family, a bad line, a histogram whose
    buckets are not cumulative or lack +Inf == _count."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families: dict = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                assert re.fullmatch(_NAME, name), line
                fam = families.setdefault(name, {"type": None, "help": None, "samples": []})
                if parts[1] == "TYPE":
                    assert fam["type"] is None and not fam["samples"], f"TYPE after samples or twice: {line}"
                    assert parts[3] in ("counter", "gauge", "histogram", "summary", "untyped"), line
                    fam["type"] = parts[3]
                else:
                    fam["help"] = parts[3] if len(parts) > 3 else ""
            continue
        m = _SAMPLE.match(line)
        assert m, f"malformed sample line: {line!r}"
        name, labels_text, value = m.group(1), m.group(2), m.group(3)
        labels, pos = {}, 0
        while labels_text and pos < len(labels_text):
            lm = _LABEL.match(labels_text, pos)
            assert lm, f"malformed labels: {line!r}"
            labels[lm.group(1)] = lm.group(2)
            pos = lm.end()
        v = float(value)  # NaN, +Inf, -Inf parse too
        family = next((f for f in (name, re.sub(r"_(bucket|sum|count)$", "", name)) if f in families), None)
        assert family is not None, f"sample {name} belongs to no declared family"
        fam = families[family]
        if family != name:
            assert fam["type"] in ("histogram", "summary"), f"{name}: suffix on a {fam['type']}"
        if fam["type"] == "counter":
            assert v >= 0, line
        fam["samples"].append((name, labels, v))
    for name, fam in families.items():
        assert fam["type"] is not None, f"{name} has no TYPE"
        if fam["type"] == "histogram":
            buckets = [(lb["le"], v) for n, lb, v in fam["samples"] if n == name + "_bucket"]
            les = [float(le) for le, _ in buckets]
            assert les == sorted(les) and les and math.isinf(les[-1]), f"{name}: buckets {buckets}"
            counts = [v for _, v in buckets]
            assert counts == sorted(counts), f"{name}: buckets not cumulative {buckets}"
            (count,) = [v for n, _, v in fam["samples"] if n == name + "_count"]
            assert counts[-1] == count, f"{name}: +Inf bucket {counts[-1]} != count {count}"
            assert [v for n, _, v in fam["samples"] if n == name + "_sum"], f"{name}: no _sum"
    return families


def sample(families: dict, name: str, **labels) -> float:
    fam = families[re.sub(r"_(bucket|sum|count)$", "", name)] if name not in families else families[name]
    values = [v for n, lb, v in fam["samples"] if n == name and all(lb.get(k) == str(x) for k, x in labels.items())]
    assert len(values) == 1, (name, labels, fam["samples"])
    return values[0]
