"""How the runtime times one implementation of an op on the real arguments of a call, to choose between them.

Both sides of every race are timed the same way (the rule "benchmarks that cannot flatter us" applies to the
dispatch too):

- CUDA: each repetition first overwrites a buffer of twice the device's L2 (so no candidate reads weights or
  activations the previous repetition left in L2: a decode GEMV would otherwise be timed at L2 bandwidth, and
  a kernel whose working set happens to fit would beat one whose does not), then keeps the GPU busy in a spin
  kernel for ~100 us, then records an event, runs the call, records an event. While the flush and the spin run,
  the host enqueues the call behind them, so host launch latency (Python, custom-op dispatch, Triton's launcher)
  is not inside the timed span: what is compared is device time, which is what a CUDA-graph replay pays. The
  median over repetitions is kept.
- CPU: wall time of each call, the median.

Arguments an implementation writes in place (e.g. the rotary kernels rotate q and k inside qkv) are cloned before
every repetition, outside the timed span, so every repetition sees the same input.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

_FLUSH: dict = {}  # device -> uint8 buffer of 2x L2, allocated on first use
_DEFAULT_L2 = 50 * 2**20
_HEAD_START_CYCLES = 200_000  # ~100 us at Hopper's ~2 GHz: the host's head start to enqueue the timed call


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    buf = _FLUSH.get(device)
    if buf is None:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or _DEFAULT_L2
        buf = torch.empty(2 * l2, dtype=torch.uint8, device=device)
        _FLUSH[device] = buf
    return buf


def _fresh_args(args: tuple, mutated: Sequence[int]) -> tuple:
    if not mutated:
        return args
    return tuple(a.clone() if i in mutated else a for i, a in enumerate(args))


def time_call(fn: Callable, args: tuple, device: torch.device, mutated: Sequence[int] = (),
              warmup: int = 2, reps: int = 15, budget_s: float = 0.05) -> float:
    """Median seconds of one `fn(*args)` on `device`, after `warmup` calls (Triton compiles, cuBLAS heuristics).
    At most `reps` timed repetitions, fewer when one call is long enough that `reps` would exceed `budget_s`."""
    for _ in range(warmup):
        fn(*_fresh_args(args, mutated))
    if device.type == "cuda":
        return _time_cuda(fn, args, device, mutated, reps, budget_s)
    times = []
    for _ in range(reps):
        call_args = _fresh_args(args, mutated)
        t0 = time.perf_counter()
        fn(*call_args)
        times.append(time.perf_counter() - t0)
        if sum(times) > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def _time_cuda(fn, args, device, mutated, reps, budget_s) -> float:
    flush = _l2_flush_buffer(device)
    stream = torch.cuda.current_stream(device)
    pairs = []
    for i in range(reps):
        call_args = _fresh_args(args, mutated)
        flush.zero_()
        torch.cuda._sleep(_HEAD_START_CYCLES)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn(*call_args)
        end.record(stream)
        pairs.append((start, end))
        if i == 2:  # after three, check whether the budget allows the rest
            end.synchronize()
            per_call = start.elapsed_time(end) / 1e3
            if per_call * reps > budget_s:
                break
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) / 1e3 for s, e in pairs)
