"""Serving load: request throughput, output tokens/s, TTFT, inter-token and end-to-end latency under a stream of
requests (in the manner of vLLM's benchmarks/benchmark_serving.py), against static `Engine.generate` batches.

The load: `--num-prompts` chat prompts, seeded (`--seed`): each an image of a size drawn from `--image-sizes`
(a distinct synthetic picture per prompt, sent as a PNG data URI; "none" in the list: a text-only prompt) and
`--prompt-words` random words, and an output length drawn uniformly from [output_len * (1 - range_ratio),
output_len * (1 + range_ratio)]. Greedy (temperature 0), EOS ignored, so every request decodes exactly its
length. Arrivals: a Poisson process at `--request-rate` requests/s (gamma inter-arrival times with shape
`--burstiness`, 1 = Poisson, as vLLM), or all at once with `inf`; several rates run one after another on the
same engine / server. `--max-concurrency` caps the requests in flight (the others wait for a slot).

Targets:
- engine: in-process, `Engine.submit(chat, max_new_tokens=L, ignore_eos=True, temperature=0)` from a thread
  (submit tokenizes and preprocesses, as the server does), then `async for event in handle`: one asyncio task
  per request, each token timed as it reaches the caller.
- http: an OpenAI-compatible server, streamed `POST /v1/chat/completions` (`stream: true`, `stream_options:
  {"include_usage": true}`, `image_url` parts, `max_tokens`, `temperature: 0`, `ignore_eos: true`, an extension
  that this package's server and vLLM's take; `--no-ignore-eos` for servers that refuse it) through httpx,
  one asyncio task per request. Output tokens: the usage's completion_tokens (else the number of content
  deltas). With `--base-url` the server is already running; without, `qwen2vl-fast serve` is started on the
  checkpoint (`--model` / `--preset`) on a free loopback port, as a separate process, and stopped afterwards.

Metrics per rate (vLLM's definitions): duration = first arrival to last completion; request throughput =
completed / duration; output throughput = output tokens / duration; TTFT = issue to first token (engine) / first
non-empty content delta (http); ITL = every gap between successive tokens (engine) / content deltas (http),
pooled over requests; TPOT = (latency - TTFT) / (tokens - 1) per request; E2EL = issue to the last token. Mean,
p50 and p99 (linear interpolation, numpy's default), in ms. Failures: requests that raised, got an HTTP error, an
error event or no token; the first few messages are kept.

Baseline: the same prompts through `Engine.generate` in static batches of `--max-batch` (in prompt order, back to
back): each batch runs until its longest output (generate takes one max_new_tokens per call), so tokens/s counts
the tokens the prompts asked for (`useful`, the served run's count) over the total time; every row's tokens are
in `generated_tokens_per_s`. Its engine is the served one (target engine), or one loaded in this process after
the spawned server has stopped (target http; skipped with `--base-url` unless `--model` / `--preset` is given).
Both the served run and the baseline are warmed up first with one prompt per image size (other pictures), and
the engine runs with `--vision-cache-mb 0` by default: every picture is distinct, so a cache would only help
whichever phase ran second.

Written through bench/results.py as serve-<gpu>-<stamp>.json; a table is printed.

    python bench/bench_serve.py --preset qwen2-vl-2b --target engine --num-prompts 200 --request-rate inf 8
    python bench/bench_serve.py --target http --base-url http://127.0.0.1:8000 --num-prompts 200 --skip-baseline
CPU smoke: --preset tiny-qwen2-vl --device cpu --num-prompts 12 --output-len 6 --image-sizes 56x56 84x56
    112x84 --max-batch 4
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable without keeping the root on the path
    _ROOT = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, _ROOT)
    import bench  # noqa: F401
    import qwen2vl_fast  # noqa: F401
    sys.path.remove(_ROOT)

from bench import results

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
WORDS = ("the a small large red blue green house tree river cloud street car window light shadow person dog "
         "cat table chair mountain sky water road sign door wall roof field flower stone").split()
INSTRUCTION = "Describe this image in detail."
HTTP_TIMEOUT_S = 6 * 3600  # as vLLM's client: a long run under load is not a failure
BUDGET_ENV = "QWEN2VL_FAST_BENCH_BUDGET_S"  # set by bench/gpu_check.sh: no new rate starts past ~its half


# -- the load ------------------------------------------------------------------------------------------------------

@dataclass
class RequestSpec:
    index: int
    image_size: Optional[tuple]  # (width, height) or None (text only)
    text: str
    output_len: int
    image_uri: Optional[str] = None  # data:image/png;base64,...

    def engine_chat(self) -> list:
        content = [{"type": "image", "image": self.image_uri}] if self.image_uri else []
        return [{"role": "user", "content": content + [{"type": "text", "text": self.text}]}]

    def openai_messages(self) -> list:
        content = [{"type": "image_url", "image_url": {"url": self.image_uri}}] if self.image_uri else []
        return [{"role": "user", "content": content + [{"type": "text", "text": self.text}]}]


def _image_size(text: str) -> Optional[tuple]:
    if text.lower() in ("none", "0", "text"):
        return None
    try:
        width, height = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT or 'none', got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"image size {text!r} must be positive")
    return width, height


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"request rate must be > 0 (or inf), got {text!r}")
    return value


def synthetic_image(width: int, height: int, seed: int) -> np.ndarray:
    """A (H, W, 3) uint8 picture: a seeded colour gradient and a few flat rectangles (compresses well as a PNG,
    unlike noise, so 200 prompts of 1344x896 stay a few tens of MB)."""
    rng = np.random.default_rng(seed)
    base, dx, dy = rng.uniform(0, 255, 3), rng.uniform(-200, 200, 3), rng.uniform(-200, 200, 3)
    gx = (np.arange(width, dtype=np.float32) / width)[None, :, None] * dx
    gy = (np.arange(height, dtype=np.float32) / height)[:, None, None] * dy
    img = np.clip(base + gx + gy, 0, 255).astype(np.uint8)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1 = x0 + int(rng.integers(width // 10 + 1, width // 2 + 2))
        y1 = y0 + int(rng.integers(height // 10 + 1, height // 2 + 2))
        img[y0:y1, x0:x1] = rng.integers(0, 256, 3)
    return img


def png_data_uri(width: int, height: int, seed: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(synthetic_image(width, height, seed)).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def output_len_range(output_len: int, range_ratio: float) -> tuple:
    lo = max(1, int(output_len * (1 - range_ratio)))
    return lo, max(lo, int(output_len * (1 + range_ratio)))


def make_prompts(n: int, image_sizes: list, prompt_words: int, output_len: int, range_ratio: float, seed: int,
                 images: bool = True) -> list:
    """n seeded RequestSpecs (images=False: sizes drawn but no PNG made, for tests of the draw alone)."""
    rng = np.random.default_rng(seed)
    lo, hi = output_len_range(output_len, range_ratio)
    specs = []
    for i in range(n):
        size = image_sizes[int(rng.integers(0, len(image_sizes)))] if image_sizes else None
        words = " ".join(WORDS[int(k)] for k in rng.integers(0, len(WORDS), prompt_words))
        text = f"{INSTRUCTION} {words}".strip() if size else f"Write about: {words}".strip()
        spec = RequestSpec(i, size, text, int(rng.integers(lo, hi + 1)))
        if images and size is not None:
            spec.image_uri = png_data_uri(*size, seed=seed * 1_000_003 + i)
        specs.append(spec)
    return specs


def warmup_prompts(specs: list, seed: int, count: int) -> list:
    """One prompt per distinct image size of `specs` (other pictures: no cache hit on the timed ones), 2 tokens
    each, up to `count` prompts (a batch)."""
    sizes = list(dict.fromkeys(s.image_size for s in specs))[:count]
    out = []
    for i, size in enumerate(sizes):
        spec = RequestSpec(-1 - i, size, INSTRUCTION if size else "Write about: a tree", 2)
        if size is not None:
            spec.image_uri = png_data_uri(*size, seed=-(seed * 1_000_003 + i + 1) % 2**32)
        out.append(spec)
    return out


def arrival_offsets(n: int, rate: float, seed: int, burstiness: float = 1.0) -> list:
    """Seconds after the start at which each of n requests is sent: the first at 0, then gamma-distributed gaps of
    mean 1 / rate (shape `burstiness`: 1 is a Poisson process, < 1 burstier, > 1 more regular; vLLM's). rate inf:
    all at 0."""
    if math.isinf(rate):
        return [0.0] * n
    if not rate > 0 or not burstiness > 0:
        raise ValueError(f"rate ({rate}) and burstiness ({burstiness}) must be > 0")
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(n - 1, 0))
    return [0.0] + np.cumsum(gaps).tolist()


# -- one request's outcome, and the arithmetic ---------------------------------------------------------------------

@dataclass
class RequestResult:
    index: int
    expected_tokens: int
    ok: bool = False
    error: Optional[str] = None
    start: float = 0.0  # perf_counter when issued
    end: float = 0.0
    ttft: float = 0.0  # seconds
    latency: float = 0.0
    itl: list = field(default_factory=list)  # seconds between successive tokens / deltas
    output_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: Optional[str] = None

    def record_token(self, now: float, last: Optional[float]) -> float:
        if last is None:
            self.ttft = now - self.start
        else:
            self.itl.append(now - last)
        return now


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between the closest ranks (numpy's default)."""
    if len(values) == 0:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _stats_ms(values) -> dict:
    if len(values) == 0:
        return dict(mean=float("nan"), p50=float("nan"), p99=float("nan"))
    return dict(mean=1e3 * float(np.mean(values)), p50=1e3 * percentile(values, 50),
                p99=1e3 * percentile(values, 99))


def summarize(outcomes: list, duration_s: float) -> dict:
    """The run's metrics from its per-request outcomes and its duration (first arrival to last completion)."""
    done = [r for r in outcomes if r.ok]
    failed = [r for r in outcomes if not r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    itl = [g for r in done for g in r.itl]
    return dict(
        num_requests=len(outcomes), completed=len(done), failed=len(failed),
        errors=[f"request {r.index}: {r.error}" for r in failed][:5],
        duration_s=duration_s,
        total_input_tokens=sum(r.prompt_tokens for r in done), total_output_tokens=out_tokens,
        expected_output_tokens=sum(r.expected_tokens for r in outcomes),
        output_len_mismatches=sum(r.output_tokens != r.expected_tokens for r in done),
        request_throughput=len(done) / duration_s if duration_s > 0 else float("nan"),
        output_throughput=out_tokens / duration_s if duration_s > 0 else float("nan"),
        ttft_ms=_stats_ms([r.ttft for r in done]), tpot_ms=_stats_ms(tpot), itl_ms=_stats_ms(itl),
        e2el_ms=_stats_ms([r.latency for r in done]),
    )


# -- the load generator ------------------------------------------------------------------------------------------

async def run_load(specs: list, send, rate: float, seed: int, burstiness: float = 1.0,
                   max_concurrency: Optional[int] = None) -> tuple:
    """Issue each spec at its arrival offset through `send(spec) -> RequestResult` (a coroutine function), one task
    per request; returns (outcomes in spec order, duration_s, the offsets)."""
    offsets = arrival_offsets(len(specs), rate, seed, burstiness)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    t0 = time.perf_counter()

    async def one(spec, offset):
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if gate is None:
            return await send(spec)
        async with gate:
            return await send(spec)

    outcomes = await asyncio.gather(*(one(s, o) for s, o in zip(specs, offsets)))
    return list(outcomes), time.perf_counter() - t0, offsets


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


async def engine_request(engine, spec: RequestSpec, ignore_eos: bool = True) -> RequestResult:
    """One request through `Engine.submit` (in a worker thread: it preprocesses) and `async for event in handle`."""
    r = RequestResult(spec.index, spec.output_len, start=time.perf_counter())
    loop = asyncio.get_running_loop()
    try:
        submit = functools.partial(engine.submit, spec.engine_chat(), max_new_tokens=spec.output_len,
                                   ignore_eos=ignore_eos, temperature=0.0)
        handle = await loop.run_in_executor(None, submit)
        last = None
        async for event in handle:
            if event.token_id is not None:
                last = r.record_token(time.perf_counter(), last)
                r.output_tokens += 1
            if event.finished:
                r.finish_reason = event.finish_reason
        r.end = last if last is not None else time.perf_counter()
        r.prompt_tokens = int(getattr(handle, "prompt_tokens", 0) or 0)
        r.latency = r.end - r.start
        r.ok = r.output_tokens > 0 and r.finish_reason != "cancelled"
        if not r.ok:
            r.error = f"finished {r.finish_reason!r} after {r.output_tokens} tokens"
    except Exception as e:  # a typed engine error: a failure of this request, not of the run
        r.end, r.error = time.perf_counter(), _describe(e)
    return r


def chat_payload(spec: RequestSpec, model: str, ignore_eos: bool = True) -> dict:
    body = dict(model=model, messages=spec.openai_messages(), max_tokens=spec.output_len, temperature=0.0,
                stream=True, stream_options={"include_usage": True})
    if ignore_eos:
        body["ignore_eos"] = True
    return body


async def http_request(client, url: str, model: str, spec: RequestSpec, ignore_eos: bool = True,
                       headers: Optional[dict] = None) -> RequestResult:
    """One streamed chat completion; TTFT at the first non-empty content delta, ITL between content deltas."""
    r = RequestResult(spec.index, spec.output_len, start=time.perf_counter())
    deltas, usage, last = 0, None, None
    try:
        async with client.stream("POST", url, json=chat_payload(spec, model, ignore_eos), headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {body[:300]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    raise RuntimeError(f"error event: {json.dumps(obj['error'])[:300]}")
                if obj.get("usage"):
                    usage = obj["usage"]
                for choice in obj.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        last = r.record_token(time.perf_counter(), last)
                        deltas += 1
                    if choice.get("finish_reason"):
                        r.finish_reason = choice["finish_reason"]
        r.end = last if last is not None else time.perf_counter()
        r.latency = r.end - r.start
        r.output_tokens = int(usage["completion_tokens"]) if usage and "completion_tokens" in usage else deltas
        r.prompt_tokens = int(usage.get("prompt_tokens", 0)) if usage else 0
        r.ok = deltas > 0
        if not r.ok:
            r.error = f"no content (finish_reason {r.finish_reason!r}, {r.output_tokens} tokens)"
    except Exception as e:
        r.end, r.error = time.perf_counter(), _describe(e)
    return r


# -- the static baseline -----------------------------------------------------------------------------------------

def static_baseline(engine, specs: list, max_batch: int) -> dict:
    """The prompts through `Engine.generate` in batches of max_batch, in order, back to back (see the docstring)."""
    batches, useful, generated, mismatched = [], 0, 0, 0
    t0 = time.perf_counter()
    for i in range(0, len(specs), max_batch):
        chunk = specs[i:i + max_batch]
        n = max(s.output_len for s in chunk)
        tb = time.perf_counter()
        out = engine.generate([s.engine_chat() for s in chunk], max_new_tokens=n, ignore_eos=True, temperature=0.0)
        batches.append(dict(size=len(chunk), max_new_tokens=n, s=time.perf_counter() - tb))
        useful += sum(min(len(c.token_ids), s.output_len) for c, s in zip(out, chunk))
        generated += sum(len(c.token_ids) for c in out)
        mismatched += sum(len(c.token_ids) != n for c in out)
    total = time.perf_counter() - t0
    return dict(max_batch=max_batch, num_batches=len(batches), total_s=total, useful_tokens=useful,
                generated_tokens=generated, rows_short=mismatched, tokens_per_s=useful / total,
                generated_tokens_per_s=generated / total, request_throughput=len(specs) / total, batches=batches)


# -- targets --------------------------------------------------------------------------------------------------

def _run(coro):
    return asyncio.run(coro)


def run_engine_target(engine, specs, args, budget) -> list:
    return _run(_load_runs(specs, functools.partial(engine_request, engine), args, budget))


async def _load_runs(specs, send, args, budget) -> list:
    """Both targets: a warm-up (one prompt per image size, other pictures), then each request rate in turn."""
    warm = warmup_prompts(specs, args.seed, args.max_batch)
    t0 = time.perf_counter()
    warm_out, _, _ = await run_load(warm, send, math.inf, args.seed)
    warm_s = time.perf_counter() - t0
    _warn_warmup(warm_out)
    runs = []
    for rate in args.request_rate:
        if budget.exhausted():
            runs.append(dict(request_rate=rate, skipped="time budget"))
            continue
        outcomes, duration, _ = await run_load(specs, send, rate, args.seed, args.burstiness, args.max_concurrency)
        runs.append(dict(request_rate=rate, warmup_s=warm_s, **summarize(outcomes, duration),
                         requests=[_request_row(r, s) for r, s in zip(outcomes, specs)]))
    return runs


async def _http_runs(specs, args, base_url, budget) -> tuple:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(HTTP_TIMEOUT_S, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        model = args.served_model_name
        if model is None:
            resp = await client.get(base_url + "/v1/models", headers=headers)
            resp.raise_for_status()
            model = resp.json()["data"][0]["id"]
        url = base_url + "/v1/chat/completions"
        send = functools.partial(http_request, client, url, model, ignore_eos=args.ignore_eos, headers=headers)
        return await _load_runs(specs, send, args, budget), model


def _warn_warmup(outcomes: list) -> None:
    bad = [r.error for r in outcomes if not r.ok]
    if bad:
        print(f"warning: {len(bad)} of {len(outcomes)} warm-up requests failed, e.g. {bad[0]}", file=sys.stderr)


def _request_row(r: RequestResult, s: RequestSpec) -> dict:
    row = dict(index=r.index, image=None if s.image_size is None else "%dx%d" % s.image_size,
               expected_tokens=r.expected_tokens, output_tokens=r.output_tokens, prompt_tokens=r.prompt_tokens,
               ttft_ms=1e3 * r.ttft, e2el_ms=1e3 * r.latency, ok=r.ok)
    if r.error:
        row["error"] = r.error
    return row


class ServerProcess:
    """`python -m qwen2vl_fast.cli serve` on a free loopback port, as a child process; stopped on exit."""

    def __init__(self, checkpoint: str, args):
        cmd = [sys.executable, "-m", "qwen2vl_fast.cli", "serve", "--model", checkpoint, "--port", "0",
               "--host", "127.0.0.1", "--served-model-name", "bench", "--max-batch", str(args.max_batch),
               "--device", args.device, "--vision-cache-mb", str(int(args.vision_cache_mb)), "--log-level",
               "warning"]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        if args.max_len:
            cmd += ["--max-len", str(args.max_len)]
        self.cmd, self.proc, self.url, self._log_path, self._tail = cmd, None, None, None, ""

    def log_tail(self, chars: int = 3000) -> str:
        """The end of what the server printed (to a temporary file, removed once the server has stopped)."""
        if self._log_path is None:
            return self._tail[-chars:]
        return self._log_path.read_text(encoding="utf-8", errors="replace")[-chars:]

    def __enter__(self):
        fd, name = tempfile.mkstemp(prefix="bench_serve_server_", suffix=".log")
        os.close(fd)
        self._log_path = Path(name)
        env = dict(os.environ)
        env.pop(BUDGET_ENV, None)
        with open(self._log_path, "ab") as log:  # O_APPEND: reading it here never moves the child's writes
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + float(os.environ.get("QWEN2VL_FAST_SERVE_START_S", 600))
        while self.url is None:
            text = self.log_tail(100_000)
            m = re.search(r"on (http://[^\s/]+:\d+)/v1", text)
            if m:
                self.url = m.group(1)
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the server did not start (rc {self.proc.returncode}): {text[-2000:]}")
            time.sleep(0.1)
        try:
            self._wait_healthy(deadline)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_healthy(self, deadline):
        import httpx

        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server never answered /health")
            time.sleep(0.1)

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_path is not None:
            self._tail = self.log_tail(100_000)
            self._log_path.unlink(missing_ok=True)
            self._log_path = None


class Budget:
    """A wall-clock budget from $QWEN2VL_FAST_BENCH_BUDGET_S (bench/gpu_check.sh): no new rate or baseline starts
    once half of it is gone (each takes about as long as the one before)."""

    def __init__(self):
        value = os.environ.get(BUDGET_ENV)
        self.limit = float(value) if value else None
        self.t0 = time.perf_counter()

    def exhausted(self) -> bool:
        return self.limit is not None and time.perf_counter() - self.t0 > self.limit / 2


# -- main -----------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=["engine", "http"], default="engine")
    p.add_argument("--model", help="checkpoint directory (default: a random one of --preset)")
    p.add_argument("--preset", default=None, help="random-weight checkpoint of this preset (default qwen2-vl-2b "
                   "where a model is needed and --model is not given)")
    p.add_argument("--base-url", default=None, help="http: a running server (else one is started)")
    p.add_argument("--served-model-name", default=None, help="http: the model id (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--request-rate", type=_rate, nargs="+", default=[math.inf], help="requests/s; inf: all at once")
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--image-sizes", type=_image_size, nargs="+", default=["448x448", "896x672", "1344x896"],
                   help="WIDTHxHEIGHT per prompt, drawn uniformly; 'none': text only")
    p.add_argument("--prompt-words", type=int, default=16)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.5, help="output lengths uniform in len * (1 -+ ratio)")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="http: do not send ignore_eos (count what comes back)")
    p.add_argument("--max-batch", type=int, default=16, help="engine KV slots, and the baseline's batch size")
    p.add_argument("--max-len", type=int, default=None, help="KV cache tokens per sequence (engine default)")
    p.add_argument("--vision-cache-mb", type=float, default=0.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bfloat16 on CUDA, else float32")
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    args.image_sizes = [s if not isinstance(s, str) else _image_size(s) for s in args.image_sizes]
    if args.dtype is None:
        args.dtype = "bfloat16" if torch.device(args.device).type == "cuda" else "float32"
    if args.num_prompts < 1 or args.output_len < 1 or not 0 <= args.range_ratio < 1 or args.max_batch < 1:
        p.error("--num-prompts, --output-len and --max-batch must be >= 1, --range-ratio in [0, 1)")
    return args


def _checkpoint(args) -> Optional[str]:
    if args.model:
        return args.model
    if args.target == "http" and args.base_url and not args.preset:
        return None  # nothing to load: an external server, no baseline
    from bench.bench_model_forward import ensure_checkpoint

    args.preset = args.preset or "qwen2-vl-2b"
    return ensure_checkpoint(args.preset, DTYPES[args.dtype])


def _load_engine(ckpt, args):
    from qwen2vl_fast.engine.engine import Engine

    t0 = time.perf_counter()
    engine = Engine.from_pretrained(ckpt, device=args.device, dtype=DTYPES[args.dtype], backend=args.backend,
                                    max_batch=args.max_batch, max_len=args.max_len,
                                    vision_cache_mb=args.vision_cache_mb)
    return engine, time.perf_counter() - t0


def _baseline(engine, specs, args) -> dict:
    warm = warmup_prompts(specs, args.seed, args.max_batch)
    t0 = time.perf_counter()
    engine.generate([s.engine_chat() for s in warm], max_new_tokens=2, ignore_eos=True)
    return dict(warmup_s=time.perf_counter() - t0, **static_baseline(engine, specs, args.max_batch))


def compare(runs: list, baseline: Optional[dict]) -> dict:
    """Per rate: output tokens/s over the baseline's (useful) tokens/s, and the baseline's time over the run's."""
    if not baseline or "error" in baseline:
        return {}
    out = {}
    for r in runs:
        if "output_throughput" in r:
            out[_rate_name(r["request_rate"])] = dict(
                output_throughput_vs_static=r["output_throughput"] / baseline["tokens_per_s"],
                static_time_over_duration=baseline["total_s"] / r["duration_s"])
    return out


def _rate_name(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def format_table(runs: list, baseline: Optional[dict]) -> str:
    cols = [(f"rate={_rate_name(r['request_rate'])}", r) for r in runs if "output_throughput" in r]
    rows = [("completed / failed", lambda r: f"{r['completed']} / {r['failed']}"),
            ("duration s", lambda r: f"{r['duration_s']:.3f}"),
            ("request throughput req/s", lambda r: f"{r['request_throughput']:.2f}"),
            ("output throughput tok/s", lambda r: f"{r['output_throughput']:.1f}"),
            ("output tokens", lambda r: str(r["total_output_tokens"]))]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency")):
        for stat in ("mean", "p50", "p99"):
            rows.append((f"{name} {stat} ms", lambda r, k=key, s=stat: f"{r[k][s]:.2f}"))
    widths = [26] + [max(14, len(c[0]) + 2) for c in cols]
    base_col = baseline is not None and "error" not in baseline
    lines = ["".join(h.ljust(w) for h, w in zip(["metric"] + [c[0] for c in cols], widths))
             + ("static baseline" if base_col else "")]
    base = {"completed / failed": lambda b: f"{b['num_batches']} batches",
            "duration s": lambda b: f"{b['total_s']:.3f}",
            "request throughput req/s": lambda b: f"{b['request_throughput']:.2f}",
            "output throughput tok/s": lambda b: f"{b['tokens_per_s']:.1f}",
            "output tokens": lambda b: f"{b['useful_tokens']} ({b['generated_tokens']} generated)"}
    for name, fn in rows:
        line = name.ljust(widths[0]) + "".join(fn(r).ljust(w) for (_, r), w in zip(cols, widths[1:]))
        if base_col and name in base:
            line += base[name](baseline)
        lines.append(line)
    for r in runs:
        if "skipped" in r:
            lines.append(f"rate={_rate_name(r['request_rate'])}: skipped ({r['skipped']})")
        for e in r.get("errors", []):
            lines.append(f"  failure: {e}")
    if baseline and "error" in baseline:
        lines.append(f"static baseline failed: {baseline['error']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    specs = make_prompts(args.num_prompts, args.image_sizes, args.prompt_words, args.output_len, args.range_ratio,
                         args.seed)
    prompts_s = time.perf_counter() - t0
    ckpt = _checkpoint(args)
    payload = dict(target=args.target, checkpoint=ckpt, preset=args.preset, device=args.device, dtype=args.dtype,
                   backend=args.backend, num_prompts=args.num_prompts,
                   request_rates=[_rate_name(r) for r in args.request_rate], burstiness=args.burstiness,
                   max_concurrency=args.max_concurrency, max_batch=args.max_batch, max_len=args.max_len,
                   vision_cache_mb=args.vision_cache_mb, seed=args.seed, ignore_eos=args.ignore_eos,
                   image_sizes=[None if s is None else "%dx%d" % s for s in args.image_sizes],
                   prompt_words=args.prompt_words, output_len=args.output_len, range_ratio=args.range_ratio,
                   output_len_range=list(output_len_range(args.output_len, args.range_ratio)),
                   expected_output_tokens=sum(s.output_len for s in specs), prompts_build_s=prompts_s)
    out = results.ResultFile("serve", args.out_dir)
    engine, baseline, runs, rc = None, None, [], 0
    try:
        if args.target == "engine":
            engine, payload["load_s"] = _load_engine(ckpt, args)
            runs = run_engine_target(engine, specs, args, budget)
        else:
            if args.base_url:
                payload["base_url"] = args.base_url.rstrip("/")
                runs, payload["served_model_name"] = _run(_http_runs(specs, args, payload["base_url"], budget))
            else:
                server = ServerProcess(ckpt, args)
                payload["server_cmd"] = server.cmd
                try:
                    with server:
                        payload["base_url"] = server.url
                        runs, payload["served_model_name"] = _run(_http_runs(specs, args, server.url, budget))
                finally:
                    payload["server_log_tail"] = server.log_tail()
        payload["runs"] = runs
        out.update(payload)
        if not args.skip_baseline and ckpt is not None:
            if budget.exhausted():
                baseline = dict(error="skipped: time budget")
            else:
                try:
                    if engine is None:
                        engine, payload["baseline_load_s"] = _load_engine(ckpt, args)
                    baseline = _baseline(engine, specs, args)
                except Exception as e:
                    traceback.print_exc()
                    baseline = dict(error=_describe(e))
            payload["static_baseline"] = baseline
            payload["vs_static"] = compare(runs, baseline)
    except Exception as e:
        traceback.print_exc()
        payload["error"] = _describe(e)
        rc = 1
    finally:
        if engine is not None:
            engine.close()
    payload["runs"] = runs
    path = out.finish(payload)
    print(format_table(runs, baseline))
    for rate, c in payload.get("vs_static", {}).items():
        print(f"rate={rate}: output tok/s {c['output_throughput_vs_static']:.2f}x the static batches'")
    print(f"wrote {path}")
    if any(r.get("failed") for r in runs):
        rc = rc or 1
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
