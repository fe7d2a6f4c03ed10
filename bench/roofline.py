"""Measured device ceilings, and where a measured time sits under them (the roofline).

Datasheet numbers are leads, not ceilings (METHOD.md "Two numbers first"): the ceilings used here are measured
once per process on the device at hand:
- bandwidth: the best of several ways to stream a buffer far past L2 (>= 1 GiB and 16 x L2 on CUDA), each counting
  the bytes it must move (`BANDWIDTH_METHODS`): torch's `copy_` (read + write), an elementwise torch kernel
  (read + write), a vectorised Triton copy (read + write; CUDA only) and a read-only reduction (`sum`: read);
  each timed both as graph replays and on a pre-filled queue. Why not the copy alone: the first H200 run
  measured 2,629 GB/s with `copy_` (read + write bytes of 1 GiB, graph-timed), where the GEMVs of that run
  streamed their weights at 4.1-4.2 TB/s and HBM3e is rated 4.8 TB/s. A contiguous same-dtype `copy_` is a
  cudaMemcpyAsync, which CUDA may run on a copy engine (as a graph's memcpy node), not the SMs every kernel
  uses: a lower ceiling than the device's, so memory-bound kernels read 105-160% of "roofline". The SM-driven
  methods give the ceiling kernels actually face; every method's figure is kept (`measure_bandwidth_methods`);
- compute: one large square matrix product through torch (cuBLAS on CUDA), 2 n^3 FLOPs.
A kernel above a measured ceiling means the ceiling was under-measured (or the bytes over-counted): every
`roofline_fraction` above 100% carries `ceiling_flag` = CEILING_UNDER_MEASURED, and reports print the flag next to
the figure (`format_pct`), never a bare > 100%.
A kernel's floor is max(FLOPs / compute ceiling, bytes / bandwidth ceiling); its arithmetic intensity
(FLOPs per byte) against the ridge point (compute ceiling / bandwidth ceiling) says which term binds.

Both ceilings are timed with the harness's kernel method (graph replays, bench/harness.py), the method every kernel
figure is timed with, so a kernel's % of a ceiling compares like with like.
Everything also runs on the CPU with small default sizes, so the arithmetic is unit-testable without a GPU.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .harness import default_device, l2_cache_bytes, time_fn

_CACHE: dict = {}  # (what, device, dtype, size) -> measured value; ceilings do not change within a process


def _device(device) -> torch.device:
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# name -> bytes moved per byte of the buffer: a copy reads and writes each byte, a reduction only reads it.
BANDWIDTH_METHODS = {"torch-copy": 2, "torch-elementwise": 2, "triton-copy": 2, "torch-sum": 1}
BANDWIDTH_TIMINGS = ("graph", "queue")  # a copy captured as a graph's memcpy node may run on a copy engine
CEILING_UNDER_MEASURED = "ceiling under-measured"
OVER_CEILING_TOLERANCE_PCT = 100.0  # above this % of a ceiling a figure is flagged (no allowance for noise)


def default_bandwidth_bytes(device) -> int:
    """The buffer a bandwidth method streams: max(1 GiB, 16 x L2) on CUDA (far past any cache), 16 MiB on the CPU."""
    device = _device(device)
    return max(2**30, 16 * l2_cache_bytes(device)) if device.type == "cuda" else 16 * 2**20


def gbps(moved_bytes: float, ms: float) -> float:
    """GB/s (1e9 bytes per second, as every kernel figure here) of `moved_bytes` in `ms` milliseconds."""
    if ms <= 0:
        raise ValueError(f"time must be positive, got {ms} ms")
    return moved_bytes / (ms * 1e-3) / 1e9


def best_bandwidth(per_method: dict) -> tuple:
    """(GB/s, name) of the fastest method among {name: GB/s or None (could not run)}; the measured ceiling."""
    ran = {k: v for k, v in per_method.items() if v is not None and v > 0}
    if not ran:
        raise RuntimeError(f"no bandwidth method ran: {per_method}")
    name = max(ran, key=ran.get)
    return ran[name], name


def _triton_copy():
    """fn(src, dst): a vectorised Triton copy (bench/bandwidth_kernels.py), or None without Triton."""
    try:
        from .bandwidth_kernels import triton_copy
    except ImportError:
        return None
    return triton_copy


def _bandwidth_buffers(device, nbytes: int) -> tuple:
    """(src, dst): float32 buffers of `nbytes`, src random in [0.5, 1.5) (never zeros)."""
    gen = torch.Generator(device=device).manual_seed(0)
    src = torch.rand(max(1, nbytes // 4), dtype=torch.float32, device=device, generator=gen) + 0.5
    return src, torch.empty_like(src)


def _bandwidth_fns(device, src, dst) -> dict:
    """{method: zero-argument callable} of the methods that can run on `device`."""
    fns = {"torch-copy": lambda: dst.copy_(src),
           "torch-elementwise": lambda: torch.neg(src, out=dst),
           "torch-sum": lambda: torch.sum(src, dtype=torch.float32)}
    if device.type == "cuda":
        copy = _triton_copy()
        if copy is not None:
            fns["triton-copy"] = lambda: copy(src, dst)
    return fns


def measure_bandwidth_methods(device=None, nbytes: Optional[int] = None, *, rep: int = 20,
                              timings: tuple = BANDWIDTH_TIMINGS) -> dict:
    """{method: {gbps, ms, bytes_moved, timing} or {error}} for each of BANDWIDTH_METHODS on a `nbytes` float32
    buffer (random data, never zeros; default `default_bandwidth_bytes`). Each method counts the bytes it must
    move (BANDWIDTH_METHODS: 2x the buffer for a copy, 1x for a read-only reduction) over its median time, and
    keeps the faster of its `timings` (harness methods; on the CPU wall time)."""
    device = _device(device)
    nbytes = nbytes or default_bandwidth_bytes(device)
    key = ("bandwidth", str(device), nbytes, tuple(timings))  # measured once per process, as the matmul rate
    if key in _CACHE:
        return _CACHE[key]
    src, dst = _bandwidth_buffers(device, nbytes)
    size = src.numel() * src.element_size()
    out = {}
    for name, fn in _bandwidth_fns(device, src, dst).items():
        moved = BANDWIDTH_METHODS[name] * size
        best = None
        for timing in (timings if device.type == "cuda" else timings[:1]):
            try:
                t = time_fn(fn, warmup=3, rep=rep, device=device, method=timing)
            except Exception as e:  # noqa: BLE001 -- a method that cannot run (or be captured) here: the others decide
                best = best or dict(error=f"{type(e).__name__}: {str(e)[:200]}")
                continue
            row = dict(gbps=gbps(moved, t["median_ms"]), ms=t["median_ms"], bytes_moved=moved,
                       timing=t["method"])
            if best is None or "gbps" not in best or row["gbps"] > best["gbps"]:
                best = row
        out[name] = best
    del src, dst
    _CACHE[key] = out
    return out


def measure_copy_bandwidth(device=None, nbytes: Optional[int] = None, *, rep: int = 20) -> float:
    """The measured bandwidth ceiling in GB/s (1e9 bytes/s): the best of `measure_bandwidth_methods` (each
    counting the bytes it must move: read + write for the copies, read for the reduction)."""
    per = measure_bandwidth_methods(device, nbytes, rep=rep)
    return best_bandwidth({k: v.get("gbps") for k, v in per.items()})[0]


def measure_matmul_tflops(device=None, dtype: torch.dtype = torch.bfloat16, n: Optional[int] = None, *,
                          rep: int = 20) -> float:
    """Dense matmul rate in TFLOP/s: an (n, n) @ (n, n) product in `dtype`, 2 n^3 FLOPs over the median time.

    n defaults to 8192 on CUDA (large enough to fill an H100's SMs with full tiles) and 256 on the CPU.
    """
    device = _device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 256
    key = ("matmul", str(device), str(dtype), n)
    if key not in _CACHE:
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, generator=gen).to(dtype)
        b = torch.randn(n, n, device=device, generator=gen).to(dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        t = time_fn(lambda: torch.mm(a, b, out=c), warmup=5, rep=rep, device=device)
        _CACHE[key] = 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12
        del a, b, c
    return _CACHE[key]


def device_ceilings(device=None, dtype: torch.dtype = torch.bfloat16) -> dict:
    """{tflops, gbps, gbps_method, gbps_methods, bandwidth_bytes, dtype, device}: both measured ceilings at their
    default sizes (cached per process); gbps is the best bandwidth method (gbps_method), gbps_methods every
    method's GB/s (None where it could not run)."""
    device = _device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    per = measure_bandwidth_methods(device)
    methods = {k: v.get("gbps") for k, v in per.items()}
    best, best_name = best_bandwidth(methods)
    return dict(tflops=measure_matmul_tflops(device, dtype), gbps=best, gbps_method=best_name, gbps_methods=methods,
                bandwidth_bytes=default_bandwidth_bytes(device), dtype=str(dtype).removeprefix("torch."),
                device=name)


def is_memory_bound(flops: float, nbytes: float, ceilings: dict) -> bool:
    """Whether a call's fewest bytes take longer than its FLOPs at the measured ceilings: arithmetic intensity
    (FLOPs per byte) below the ridge point (TFLOP/s over GB/s, about 180 FLOP/B for bf16 on an H200). Such a call
    is timed on inputs rotated past L2 (bench/compare.py): from L2 it would run faster than device memory allows."""
    if nbytes <= 0:
        return False
    return flops / nbytes < ceilings["tflops"] * 1e12 / (ceilings["gbps"] * 1e9)


def roofline_fraction(flops: float, nbytes: float, ms: float, ceilings: dict) -> dict:
    """Where a measured time sits under the roofline given by `ceilings` ({"tflops": ..., "gbps": ...}).

    Returns achieved_tflops, achieved_gbps, pct_of_tflops, pct_of_gbps (achieved / ceiling, in %),
    intensity (FLOPs per byte), ridge (the ceilings' FLOPs per byte), bound ("compute" when
    intensity >= ridge, else "memory"), floor_ms (the larger of the two ideal times) and pct_of_roofline
    (floor_ms / ms, in %: 100 means the kernel runs at the binding ceiling), and ceiling_flag:
    CEILING_UNDER_MEASURED when any of the three percentages exceeds 100 (a kernel cannot beat a true ceiling:
    the measured ceiling is low, or the bytes / FLOPs over-count), else None. The values are kept as measured.
    """
    if ms <= 0:
        raise ValueError(f"time must be positive, got {ms} ms")
    if flops < 0 or nbytes < 0:
        raise ValueError(f"flops and bytes must be non-negative, got {flops}, {nbytes}")
    peak_flops = ceilings["tflops"] * 1e12
    peak_bytes = ceilings["gbps"] * 1e9
    seconds = ms * 1e-3
    intensity = flops / nbytes if nbytes else math.inf
    ridge = peak_flops / peak_bytes
    floor_ms = max(flops / peak_flops, nbytes / peak_bytes) * 1e3
    out = dict(
        achieved_tflops=flops / seconds / 1e12,
        achieved_gbps=nbytes / seconds / 1e9,
        pct_of_tflops=100.0 * flops / seconds / peak_flops,
        pct_of_gbps=100.0 * nbytes / seconds / peak_bytes,
        intensity=intensity,
        ridge=ridge,
        bound="compute" if intensity >= ridge else "memory",
        floor_ms=floor_ms,
        pct_of_roofline=100.0 * floor_ms / ms,
    )
    out["ceiling_flag"] = ceiling_flag(out["pct_of_roofline"], out["pct_of_gbps"], out["pct_of_tflops"])
    return out


def ceiling_flag(*pcts) -> Optional[str]:
    """CEILING_UNDER_MEASURED when any percentage of a measured ceiling exceeds 100, else None."""
    return CEILING_UNDER_MEASURED if any(p is not None and p > OVER_CEILING_TOLERANCE_PCT for p in pcts) else None


def format_pct(pct: Optional[float], width: int = 0, fmt: str = ".1f") -> str:
    """A % of a measured ceiling for a report, with its % sign: over 100 it carries the flag
    ("105.3% (ceiling under-measured)"), so no report shows a bare figure above its ceiling; None prints as "-"."""
    if pct is None:
        return format("-", f">{width}")
    text = format(pct, fmt) + "%"
    if pct > OVER_CEILING_TOLERANCE_PCT:
        text += f" ({CEILING_UNDER_MEASURED})"
    return format(text, f">{width}")


def over_ceiling(rows) -> list:
    """The rows (dicts with pct_of_roofline / pct_of_gbps / pct_of_tflops) above a measured ceiling."""
    return [r for r in rows if ceiling_flag(r.get("pct_of_roofline"), r.get("pct_of_gbps"), r.get("pct_of_tflops"))]
