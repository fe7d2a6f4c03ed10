"""Timing helpers: warm up, time many calls, report the median and the 20th / 80th percentiles.

What is measured depends on `method` (one method for every side of a comparison: bench/compare.py enforces it):

- "kernel" (the default on CUDA): "graph", else "queue" when the callable cannot be captured. For kernel figures.
- "graph": R calls are captured in one CUDA graph and the graph is replayed; a sample is one replay's device time
  / R. Host launch cost is gone (a replay is one launch) and the calls run back to back as a model runs them
  under the engine's CUDA graphs. R is sized so a replay lasts about `target_sample_ms`.
- "queue": each call between two CUDA events, but the stream is first given a spin kernel (`torch.cuda._sleep`)
  that outlasts the host's enqueueing of the whole batch, so when the device reaches the calls they are all
  queued: no call waits on the host. After enqueueing, the host checks that the spin was still running; if the
  device had already passed it (the queue drained), the batch is run again with a longer spin (the spin's rate
  estimate doubles, for later batches too, up to MAX_SPIN_RATE_FACTOR x the calibrated one, and no spin
  lasts more than MAX_SPIN_MS); a batch still drained after the retries is counted in `queue_drained`. A call
  that blocks the host (it synchronizes, or copies to pageable memory) drains every queue however long the spin:
  the host then waits for the spin itself, so its measured enqueue time grows with the spin. Such a call is
  detected (a retried batch whose host time covered its whole spin) and timed without further spins
  (`host_blocking`), instead of retried with ever longer spins: sized from host times that included the
  previous spin, they grew about 3x per attempt, for later batches too (on the simulated device of the tests,
  a 0.5 ms syncing call timed with rep=3 spun ~10 hours). Graph replays are queued the same way.
- "events": CUDA events around each call on an idle queue. The time then includes the host's launch cost of
  the call: right for end-to-end figures (a model forward, a generate: what a user waits for), wrong for a
  microsecond kernel, whose time it mostly is.
- "do_bench": `triton.testing.do_bench` (it flushes L2 before each call, outside the timed span).
On the CPU every method is wall time from `time.perf_counter` around each call.

The median is reported because a few slow samples (clock ramp, a page fault, another process) skew the mean; p20/p80
show the spread: a difference between two versions smaller than that spread is noise (METHOD.md "Time properly").
For "graph" a sample is already a mean over R calls, so its spread is that of replays.

Why rotating inputs: a kernel whose inputs fit in L2 (50 MB on H100, 60 MB on H200) would read them from the cache
on every call after the first, and measure the cache, not device memory. `make_rotating_inputs` builds enough
copies of the arguments that together they exceed twice the L2 size, and calls cycle through them, so each call
reads data that the previous calls evicted. Under "graph" a replay holds a whole number of cycles through the
copies (R is a multiple of their count), so consecutive replays never re-read a copy that is still in L2. Which
cases need it (the memory-bound ones) is decided in bench/compare.py from the roofline (bench/roofline.py).

The CUDA calls go through `_cuda_api()` and host time through `_host_ms()`, so the tests can run this logic on a
simulated device on the CPU. Nothing here calls `torch.cuda` at import time (STYLE.md R16).
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any, Callable, Optional, Sequence

import torch

DEFAULT_L2_BYTES = 50 * 2**20  # H100's L2; used where the device does not report one (the CPU)
QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80: the same quantiles R14 asks of do_bench
METHODS = ("kernel", "graph", "queue", "events", "do_bench")

TARGET_SAMPLE_MS = 1.0  # "graph": a replay of about 1 ms makes the one launch per replay negligible
MAX_CALLS_PER_GRAPH = 1024  # capture time and graph size stay small even for 1 us kernels
# "queue": the device's queue of pending launches is finite (about a thousand entries); when it is full the host
# blocks and the queue drains. A batch is sized by host time (~3 us per launch at least), at most this long:
QUEUE_BATCH_HOST_MS = 2.0
QUEUE_MAX_BATCH = 64
QUEUE_ATTEMPTS = 4  # a drained batch is run again with the spin rate doubled
MAX_SPIN_RATE_FACTOR = 8.0  # the learned spin rate stays within 8x the calibrated one (the clock ramp: ~6x)
MAX_SPIN_MS = 200.0  # one spin, planned: 64 calls of ~2 ms host time each at most (queue_batch)
SLEEP_CALIBRATION_CYCLES = 2_000_000  # about 1 ms at Hopper's 2 GHz
# device -> spin cycles per ms: calibrated once per process, then doubled whenever a spin proved too short (the
# SM clock ramps from ~0.35 GHz idle to ~2 GHz under load, so an early calibration can be several times low)
_SLEEP_CYCLES_PER_MS: dict = {}
_SLEEP_CALIBRATED: dict = {}  # device -> the calibrated rate, the base of the MAX_SPIN_RATE_FACTOR bound
MIN_DEVICE_CALL_MS = 1e-4  # 0.1 us: a graph replay per call below this captured no device work at all


class CaptureError(RuntimeError):
    """The callable cannot be captured in a CUDA graph (it synchronizes, copies from pageable host memory,
    allocates outside the graph's pool, ...). "kernel" falls back to "queue" on it."""


def _cuda_api():
    """torch.cuda; the tests substitute a simulated device."""
    return torch.cuda


def _host_ms() -> float:
    return time.perf_counter() * 1e3


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
        size = getattr(_cuda_api().get_device_properties(device), "L2_cache_size", 0)
        if size:
            return int(size)
    return DEFAULT_L2_BYTES


def rotation_copies(per_copy_bytes: int, min_total_bytes: int, max_copies: int = 256) -> int:
    """How many argument copies make `min_total_bytes` together: at least 1, at most `max_copies`."""
    if per_copy_bytes <= 0:
        return 1
    return min(max_copies, max(1, math.ceil(min_total_bytes / per_copy_bytes)))


def make_rotating_inputs(make_fn: Callable[[], Any], min_total_bytes: Optional[int] = None, *,
                         max_copies: int = 256, per_copy_bytes: Optional[int] = None) -> list[tuple]:
    """Call `make_fn()` until the argument tuples it returns hold at least `min_total_bytes` together.

    `make_fn` returns one argument tuple (a bare tensor is wrapped into a 1-tuple); it should draw fresh random
    data each call, never zeros (METHOD.md: zeros hide bugs and can run faster). `min_total_bytes` defaults to
    twice the L2 size of the device the first tuple lives on. `per_copy_bytes` is what one call reads and writes
    (default: the bytes of the tuple's tensors; pass the call's own count when the tuple also holds large tensors
    shared by every copy, e.g. a KV cache a call touches a few rows of). At least one copy, at most `max_copies`:
    calls that touch less than 2 x L2 / max_copies (~400 KB on H100) still read partly from L2, as they do in a
    model, where the previous kernel has just written their inputs.
    """
    first = make_fn()
    first = first if isinstance(first, tuple) else (first,)
    if per_copy_bytes is None:
        per_copy_bytes = tree_nbytes(first)
    if min_total_bytes is None:
        min_total_bytes = 2 * l2_cache_bytes(infer_device(first))
    out = [first]
    for _ in range(rotation_copies(per_copy_bytes, min_total_bytes, max_copies) - 1):
        args = make_fn()
        out.append(args if isinstance(args, tuple) else (args,))
    return out


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already-sorted values (numpy's default method)."""
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float], method: str = "", **extra) -> dict:
    """{median_ms, p20_ms, p80_ms, n, min_ms, method, **extra} of a list of per-call times in milliseconds."""
    if not times_ms:
        raise ValueError("no timings to summarize")
    s = sorted(float(t) for t in times_ms)
    med, p20, p80 = (_quantile(s, q) for q in QUANTILES)
    return dict(median_ms=med, p20_ms=p20, p80_ms=p80, n=len(s), min_ms=s[0], method=method, **extra)


def calls_per_graph(per_call_ms: float, n_inputs: int = 1, target_ms: float = TARGET_SAMPLE_MS,
                    max_calls: int = MAX_CALLS_PER_GRAPH) -> int:
    """R for "graph": enough calls that a replay lasts about `target_ms`, rounded up to a whole number of cycles
    through the `n_inputs` rotating copies (so each replay reads every copy equally, never a still-cached one)."""
    n_inputs = max(1, n_inputs)
    r = max(1, min(max_calls, math.ceil(target_ms / max(per_call_ms, 1e-6) - 1e-6)))  # (- 1e-6: float noise)
    return math.ceil(r / n_inputs) * n_inputs


def queue_batch(host_ms_per_call: float, max_batch: int = QUEUE_MAX_BATCH,
                batch_host_ms: float = QUEUE_BATCH_HOST_MS) -> int:
    """Calls enqueued behind one spin: as many as the host enqueues in `batch_host_ms`, 1..max_batch."""
    return max(1, min(max_batch, int(batch_host_ms / max(host_ms_per_call, 1e-6))))


def spin_ms(host_ms: float) -> float:
    """How long the spin must run to cover `host_ms` of enqueueing: 1.5x plus 0.2 ms."""
    return 1.5 * host_ms + 0.2


def time_fn(fn: Callable, *, warmup: int = 5, rep: int = 50, inputs=None, rotate_bytes: Optional[int] = None,
            device=None, method: str = "kernel", target_sample_ms: float = TARGET_SAMPLE_MS,
            keep_samples: bool = False) -> dict:
    """Time `fn`; return {median_ms, p20_ms, p80_ms, n, min_ms, method, calls_per_sample, input_copies, ...}.

    warmup: calls before timing (not milliseconds as in do_bench), so compilation, autotuning, the measured
        dispatch's first-call measurement and handle creation stay out.
    rep: samples: calls for "queue" / "events" / CPU, graph replays for "graph" (each a mean over R calls).
    inputs: None -> `fn()` each call; a list of argument tuples -> call i runs `fn(*inputs[i % len(inputs)])`
        (build it with `make_rotating_inputs`); a zero-argument callable -> it is `make_fn` and the list is built
        here with `make_rotating_inputs(inputs, rotate_bytes)` (rotate_bytes=None: twice the L2 size).
    device: where the work runs; default: the device of the first input tensor, else CUDA if present. Pass
        device="cpu" to time host-side work on a CUDA machine (device methods would see none of it).
    method: see the module docstring. "graph" raises CaptureError where "kernel" falls back to "queue".
    keep_samples: also return `samples_ms`, every sample's per-call time in the order taken (what the
        pytest-benchmark suites feed `benchmark.pedantic`, bench/conftest.py); "do_bench" keeps none.
    """
    got = _time_fn(fn, warmup, rep, inputs, rotate_bytes, device, method, target_sample_ms)
    samples = got.pop("samples_ms", None)
    if keep_samples and samples is not None:
        got["samples_ms"] = [float(t) for t in samples]
    return got


def _time_fn(fn, warmup, rep, inputs, rotate_bytes, device, method, target_sample_ms) -> dict:
    if callable(inputs):
        inputs = make_rotating_inputs(inputs, rotate_bytes)
    elif rotate_bytes is not None:
        raise ValueError("rotate_bytes applies only when inputs is a make_fn callable")
    if inputs is not None and len(inputs) == 0:
        raise ValueError("inputs is an empty list")
    if warmup < 0 or rep < 1:
        raise ValueError(f"need warmup >= 0 and rep >= 1, got warmup={warmup}, rep={rep}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    device = torch.device(device) if device is not None else infer_device(inputs)
    n_inputs = 1 if inputs is None else len(inputs)

    def call(i: int):
        return fn() if inputs is None else fn(*inputs[i % n_inputs])

    if device.type != "cuda":
        return _perf_counter_timing(call, warmup, rep, n_inputs)
    cuda = _cuda_api()
    with cuda.device(device):
        if method == "events":
            times = _event_times(call, warmup, rep)
            return summarize(times, "cuda-events", calls_per_sample=1, input_copies=n_inputs, samples_ms=times)
        if method == "do_bench":
            # The warm-up calls, timed, double as the per-call estimate that sizes do_bench's millisecond budgets.
            est = summarize(_event_times(call, 0, max(warmup, 1)))["median_ms"]
            return _do_bench(call, warmup, rep, per_call_ms=est, start=max(warmup, 1)) | dict(input_copies=n_inputs)
        if method in ("kernel", "graph"):
            try:
                return _graph_timing(call, warmup, rep, n_inputs, target_sample_ms)
            except CaptureError:
                if method == "graph":
                    raise
        return _queue_timing(call, warmup, rep, n_inputs)


def _perf_counter_timing(call, warmup: int, rep: int, n_inputs: int) -> dict:
    for i in range(warmup):
        call(i)
    times = []
    for i in range(warmup, warmup + rep):
        t0 = time.perf_counter()
        call(i)
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times, "perf_counter", calls_per_sample=1, input_copies=n_inputs, samples_ms=times)


def _event_times(call: Callable[[int], Any], warmup: int, rep: int) -> list[float]:
    """Per-call device times from a pair of CUDA events around each call, after `warmup` untimed calls."""
    cuda = _cuda_api()
    for i in range(warmup):
        call(i)
    cuda.synchronize()
    starts = [cuda.Event(enable_timing=True) for _ in range(rep)]
    ends = [cuda.Event(enable_timing=True) for _ in range(rep)]
    for k in range(rep):
        starts[k].record()
        call(warmup + k)
        ends[k].record()
    cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _spin_key() -> str:
    cuda = _cuda_api()
    return str(cuda.current_device()) if hasattr(cuda, "current_device") else "0"


def _sleep_cycles_per_ms() -> float:
    """Clock cycles `torch.cuda._sleep` spins per millisecond on the current device: the fastest of three spins
    (the spin counts SM cycles, so its rate follows the clock), measured once per process."""
    cuda, key = _cuda_api(), _spin_key()
    if key not in _SLEEP_CYCLES_PER_MS:
        cuda._sleep(SLEEP_CALIBRATION_CYCLES)  # the first launch loads the kernel
        spans = []
        for _ in range(3):
            start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
            start.record()
            cuda._sleep(SLEEP_CALIBRATION_CYCLES)
            end.record()
            spans.append((start, end))
        cuda.synchronize()
        fastest = min(s.elapsed_time(e) for s, e in spans)
        _SLEEP_CYCLES_PER_MS[key] = _SLEEP_CALIBRATED[key] = SLEEP_CALIBRATION_CYCLES / max(fastest, 1e-3)
    return _SLEEP_CYCLES_PER_MS[key]


def _learn_faster_spin() -> None:
    """A spin ended before the host finished enqueueing: double the spin rate, within MAX_SPIN_RATE_FACTOR x
    the calibrated one (a queue drained for another reason must not make every later spin longer forever)."""
    key = _spin_key()
    base = _SLEEP_CALIBRATED.get(key, _SLEEP_CYCLES_PER_MS[key])
    _SLEEP_CYCLES_PER_MS[key] = min(2 * _SLEEP_CYCLES_PER_MS[key], MAX_SPIN_RATE_FACTOR * base)


def planned_spin_ms(batch: int, host_ms_per_run: float) -> float:
    """The spin behind a batch: `spin_ms` of its enqueue time, at most MAX_SPIN_MS."""
    return min(spin_ms(batch * host_ms_per_run), MAX_SPIN_MS)


def prefilled_times(run: Callable[[int], Any], count: int, host_ms_per_run: float) -> dict:
    """{times, queue_drained, queue_retries, host_ms_per_run, host_blocking}: the device time of `run(k)` for
    k < count, each between two events, enqueued in batches behind a spin that outlasts the host's enqueueing
    (module docstring). `host_ms_per_run` is the first guess of the host's enqueue time per run; it is learned
    as batches go. host_blocking: the runs were found to wait on the device (a sync inside): later batches are
    enqueued without a spin (each run then starts on a drained queue, as it does wherever it runs)."""
    cuda = _cuda_api()
    times, drained, retries, k, blocking = [], 0, 0, 0, False
    while k < count:
        batch = min(count - k, queue_batch(host_ms_per_run))
        ok = False
        for attempt in range(QUEUE_ATTEMPTS):
            cuda.synchronize()
            planned = 0.0 if blocking else planned_spin_ms(batch, host_ms_per_run)
            if not blocking:
                cuda._sleep(int(planned * _sleep_cycles_per_ms()))
            spin_done = cuda.Event()
            spin_done.record()
            pairs, t0 = [], _host_ms()
            for j in range(batch):
                start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
                start.record()
                run(k + j)
                end.record()
                pairs.append((start, end))
            host_batch_ms = _host_ms() - t0
            spin_outlasted_host = not spin_done.query()  # the device was still spinning when the host finished
            cuda.synchronize()
            if spin_outlasted_host or blocking:
                ok = spin_outlasted_host
                break
            if attempt >= 1 and host_batch_ms >= planned:
                # Retried with a spin sized from the learned host time, and the host still took the whole spin:
                # the runs wait on the device. A longer spin would only be waited for too.
                blocking = True
                break
            host_ms_per_run = max(host_ms_per_run, host_batch_ms / batch)
            retries += 1
            _learn_faster_spin()  # the device spun faster than calibrated: learn it
        if not ok:
            drained += 1  # kept, and counted: the result says how many batches waited on the host
        times += [s.elapsed_time(e) for s, e in pairs]
        k += batch
    return dict(times=times, queue_drained=drained, queue_retries=retries, host_ms_per_run=host_ms_per_run,
                host_blocking=blocking)


def _host_enqueue_ms(call: Callable[[int], Any], start: int, n: int = 3) -> float:
    """Median host time to enqueue one call on an idle device (nothing waits: the launches are asynchronous)."""
    cuda = _cuda_api()
    cuda.synchronize()
    spans = []
    for i in range(n):
        t0 = _host_ms()
        call(start + i)
        spans.append(_host_ms() - t0)
    cuda.synchronize()
    return sorted(spans)[len(spans) // 2]


def _queue_timing(call: Callable[[int], Any], warmup: int, rep: int, n_inputs: int) -> dict:
    cuda = _cuda_api()
    if not hasattr(cuda, "_sleep"):  # no spin kernel in this torch: per-call events, and the result says so
        times = _event_times(call, warmup, rep)
        return summarize(times, "cuda-events (no torch.cuda._sleep)", calls_per_sample=1, input_copies=n_inputs,
                         samples_ms=times)
    for i in range(warmup):
        call(i)
    host = _host_enqueue_ms(call, warmup)
    got = prefilled_times(lambda k: call(warmup + 3 + k), rep, host)
    return summarize(got["times"], "cuda-queue", calls_per_sample=1, input_copies=n_inputs,
                     queue_drained=got["queue_drained"], queue_retries=got["queue_retries"],
                     host_blocking=got["host_blocking"], samples_ms=got["times"])


def _graph_timing(call: Callable[[int], Any], warmup: int, rep: int, n_inputs: int, target_ms: float) -> dict:
    """Warm up on a side stream (what capture needs: cuBLAS workspaces, Triton and dynamo compiles, the measured
    dispatch's first-call measurement), size R from a queued estimate, capture R calls, time `rep` replays."""
    cuda = _cuda_api()
    side = cuda.Stream()
    side.wait_stream(cuda.current_stream())
    with cuda.stream(side):
        for i in range(max(warmup, 1)):
            call(i)
    cuda.current_stream().wait_stream(side)
    cuda.synchronize()
    if not hasattr(cuda, "_sleep"):
        raise CaptureError("no torch.cuda._sleep to keep the replays queued")
    host = _host_enqueue_ms(call, 0)
    estimate = prefilled_times(call, 3, host)
    per_call = sorted(estimate["times"])[1]
    calls = calls_per_graph(per_call, n_inputs, target_ms)
    graph, stream = cuda.CUDAGraph(), cuda.current_stream()
    try:
        with cuda.graph(graph):
            for i in range(calls):
                call(i)
    except Exception as e:
        # An invalidated capture makes graph.__exit__ raise before it restores the caller's stream: restore it here.
        cuda.set_stream(stream)
        cuda.synchronize()
        raise CaptureError(f"{type(e).__name__}: {str(e)[:300]}") from e
    graph.replay()  # the first replay uploads the graph
    cuda.synchronize()
    got = prefilled_times(lambda k: graph.replay(), rep, host_ms_per_run=0.02)
    del graph
    per_call_times = [t / calls for t in got["times"]]
    if sorted(per_call_times)[len(per_call_times) // 2] < MIN_DEVICE_CALL_MS:
        raise CaptureError("the captured graph holds no device work: time host-side code with device='cpu'")
    return summarize(per_call_times, "cuda-graph", calls_per_sample=calls, input_copies=n_inputs,
                     queue_drained=got["queue_drained"], queue_retries=got["queue_retries"], samples_ms=per_call_times)


def _do_bench(call: Callable[[int], Any], warmup: int, rep: int, per_call_ms: float, start: int) -> dict:
    """`triton.testing.do_bench`, its millisecond budgets derived from call counts and a measured call time."""
    from triton.testing import do_bench  # lazy: triton is optional and heavy to import

    counter = itertools.count(start)
    per_call_ms = max(per_call_ms, 1e-3)
    med, p20, p80 = do_bench(lambda: call(next(counter)), warmup=max(warmup, 1) * per_call_ms,
                             rep=rep * per_call_ms, quantiles=list(QUANTILES))
    return dict(median_ms=float(med), p20_ms=float(p20), p80_ms=float(p80), n=rep, min_ms=None, method="do_bench",
                calls_per_sample=1)


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
    # the registry's extra candidates that `auto` races on this device (e.g. the split-K decode GEMV, the
    # Marlin-class int4/int8 decode kernel): timed by name too, so a benchmark shows each one against cuBLAS
    from qwen2vl_fast.ops.registry import get_op

    try:
        op = get_op(op_name)
    except Exception:
        return out
    dev = torch.device(device)
    for label, (fn, ok) in op.variants.items():
        if ok(dev, False) and f"ours-{label}" not in out:
            out[f"ours-{label}"] = fn
    return out
