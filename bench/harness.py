"""Timing helpers: warm up, time many calls, report the median and the 20th / 80th percentiles.

What is measured: the time of one call of `fn`, on the device where its work runs. On CUDA that is device time
between two CUDA events recorded around each call (host-side launch gaps between calls are not counted; a call
that launches many small kernels still pays its launch latency inside the call). On the CPU it is wall time
from `time.perf_counter`. The median is reported because a few slow calls (clock ramp, a page fault, another
process) skew the mean; p20/p80 show the spread: a difference between two versions smaller than that spread is
noise (METHOD.md "Time properly").

Why rotating inputs: a kernel whose inputs fit in L2 (50 MB on H100) would read them from the cache on every
call after the first, and measure the cache, not device memory. `make_rotating_inputs` builds enough copies of
the arguments that together they exceed the L2 size twice over, and `time_fn` cycles through them, so each call
reads data that the previous calls evicted. Model-sized work (gigabytes of weights) needs no rotation.

Nothing here calls `torch.cuda` at import time (STYLE.md R16).
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any, Callable, Optional, Sequence

import torch

DEFAULT_L2_BYTES = 50 * 2**20  # H100's L2; used where the device does not report one (the CPU)
QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80: the same quantiles R14 asks of do_bench


def default_device() -> torch.device:
    """CUDA when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _tensors(obj) -> list:
    """All tensors in a nest of tuples / lists / dicts."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for x in obj for t in _tensors(x)]
    return []


def tree_nbytes(obj) -> int:
    """Bytes held by the tensors in `obj` (tuples, lists and dicts are searched)."""
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def infer_device(obj=None) -> torch.device:
    """The device of the first tensor in `obj`, else `default_device()`."""
    found = _tensors(obj)
    return found[0].device if found else default_device()


def l2_cache_bytes(device=None) -> int:
    """The L2 size of a CUDA device (`L2_cache_size` of its properties); DEFAULT_L2_BYTES elsewhere."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        if size:
            return int(size)
    return DEFAULT_L2_BYTES


def make_rotating_inputs(make_fn: Callable[[], Any], min_total_bytes: Optional[int] = None, *,
                         max_copies: int = 256) -> list[tuple]:
    """Call `make_fn()` until the argument tuples it returns hold at least `min_total_bytes` together.

    `make_fn` returns one argument tuple (a bare tensor is wrapped into a 1-tuple); it should draw fresh random
    data each call, never zeros (METHOD.md: zeros hide bugs and can run faster). `min_total_bytes` defaults to
    twice the L2 size of the device the first tuple lives on. At least one copy, at most `max_copies`.
    """
    first = make_fn()
    first = first if isinstance(first, tuple) else (first,)
    per_copy = tree_nbytes(first)
    if min_total_bytes is None:
        min_total_bytes = 2 * l2_cache_bytes(infer_device(first))
    copies = 1 if per_copy == 0 else min(max_copies, max(1, math.ceil(min_total_bytes / per_copy)))
    out = [first]
    for _ in range(copies - 1):
        args = make_fn()
        out.append(args if isinstance(args, tuple) else (args,))
    return out


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already-sorted values (numpy's default method)."""
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float], method: str = "") -> dict:
    """{median_ms, p20_ms, p80_ms, n, min_ms, method} of a list of per-call times in milliseconds."""
    if not times_ms:
        raise ValueError("no timings to summarize")
    s = sorted(float(t) for t in times_ms)
    med, p20, p80 = (_quantile(s, q) for q in QUANTILES)
    return dict(median_ms=med, p20_ms=p20, p80_ms=p80, n=len(s), min_ms=s[0], method=method)


def time_fn(fn: Callable, *, warmup: int = 5, rep: int = 50, inputs=None, rotate_bytes: Optional[int] = None,
            device=None, method: str = "events") -> dict:
    """Time `fn`; return {median_ms, p20_ms, p80_ms, n, min_ms, method}.

    warmup, rep: numbers of calls (not milliseconds as in do_bench), so a 100 ms model forward and a 20 us kernel
        both get a predictable sample count. Warm-up keeps compilation, autotuning and handle creation out.
    inputs: None -> `fn()` each call; a list of argument tuples -> call i runs `fn(*inputs[i % len(inputs)])`
        (build it with `make_rotating_inputs`); a zero-argument callable -> it is `make_fn` and the list is built
        here with `make_rotating_inputs(inputs, rotate_bytes)` (rotate_bytes=None: twice the L2 size).
    device: where the work runs; default: the device of the first input tensor, else CUDA if present. Pass
        device="cpu" to time host-side work on a CUDA machine (CUDA events would see none of it).
    method: "events" (CUDA events around each call) or "do_bench" (`triton.testing.do_bench` with quantiles
        [0.5, 0.2, 0.8]; it also clears L2 before every call, outside the timed region; n is then approximate).
        Ignored on the CPU, which always uses `time.perf_counter`.
    """
    if callable(inputs):
        inputs = make_rotating_inputs(inputs, rotate_bytes)
    elif rotate_bytes is not None:
        raise ValueError("rotate_bytes applies only when inputs is a make_fn callable")
    if inputs is not None and len(inputs) == 0:
        raise ValueError("inputs is an empty list")
    if warmup < 0 or rep < 1:
        raise ValueError(f"need warmup >= 0 and rep >= 1, got warmup={warmup}, rep={rep}")
    device = torch.device(device) if device is not None else infer_device(inputs)

    def call(i: int):
        return fn() if inputs is None else fn(*inputs[i % len(inputs)])

    if device.type != "cuda":
        for i in range(warmup):
            call(i)
        times = []
        for i in range(warmup, warmup + rep):
            t0 = time.perf_counter()
            call(i)
            times.append((time.perf_counter() - t0) * 1e3)
        return summarize(times, "perf_counter")
    if method not in ("events", "do_bench"):
        raise ValueError(f"method must be 'events' or 'do_bench', got {method!r}")
    with torch.cuda.device(device):
        if method == "events":
            return summarize(_cuda_event_times(call, warmup, rep), "cuda-events")
        # The warm-up calls, timed, double as the per-call estimate that sizes do_bench's millisecond budgets.
        est = summarize(_cuda_event_times(call, 0, max(warmup, 1)))["median_ms"]
        return _do_bench(call, warmup, rep, per_call_ms=est, start=max(warmup, 1))


def _cuda_event_times(call: Callable[[int], Any], warmup: int, rep: int) -> list[float]:
    """Per-call device times from a pair of CUDA events around each call, after `warmup` untimed calls."""
    for i in range(warmup):
        call(i)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    for k in range(rep):
        starts[k].record()
        call(warmup + k)
        ends[k].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _do_bench(call: Callable[[int], Any], warmup: int, rep: int, per_call_ms: float, start: int) -> dict:
    """`triton.testing.do_bench`, its millisecond budgets derived from call counts and a measured call time."""
    from triton.testing import do_bench  # lazy: triton is optional and heavy to import

    counter = itertools.count(start)
    per_call_ms = max(per_call_ms, 1e-3)
    med, p20, p80 = do_bench(lambda: call(next(counter)), warmup=max(warmup, 1) * per_call_ms,
                             rep=rep * per_call_ms, quantiles=list(QUANTILES))
    return dict(median_ms=float(med), p20_ms=float(p20), p80_ms=float(p80), n=rep, min_ms=None, method="do_bench")


def fast_impls(op_name, device):
    """{"ours-<backend>": callable} for the fast implementations (Triton, CUDA C++) of an op that run on `device`:
    what every kernel benchmark times against the PyTorch alternatives."""
    out = {}
    for backend in ("triton", "cuda"):
        try:
            from qwen2vl_fast.ops import resolve

            table = resolve(backend, device)
        except Exception:
            continue
        if table.chosen[op_name] == backend:
            out[f"ours-{backend}"] = getattr(table, op_name)
    return out
