"""Measured device ceilings, and where a measured time sits under them (the roofline).

Datasheet numbers are leads, not ceilings (METHOD.md "Two numbers first"): the ceilings used here are measured
once per process on the device at hand:
- bandwidth: one large device-to-device copy, counting bytes read plus bytes written (2 x size);
- compute: one large square matrix product through torch (cuBLAS on CUDA), 2 n^3 FLOPs.
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


def measure_copy_bandwidth(device=None, nbytes: Optional[int] = None, *, rep: int = 20) -> float:
    """Copy bandwidth in GB/s (1e9 bytes/s), counting read + write bytes: 2 * nbytes / median time.

    nbytes defaults to max(1 GiB, 16 x L2) on CUDA (far past any cache) and 16 MiB on the CPU. The source is
    random data (never zeros). A contiguous same-dtype `copy_` is a plain device memcpy on CUDA.
    """
    device = _device(device)
    if nbytes is None:
        nbytes = max(2**30, 16 * l2_cache_bytes(device)) if device.type == "cuda" else 16 * 2**20
    key = ("copy", str(device), nbytes)
    if key not in _CACHE:
        src = torch.randn(max(1, nbytes // 4), dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        t = time_fn(lambda: dst.copy_(src), warmup=3, rep=rep, device=device)
        moved = 2 * src.numel() * src.element_size()
        _CACHE[key] = moved / (t["median_ms"] * 1e-3) / 1e9
        del src, dst
    return _CACHE[key]


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
    """{tflops, gbps, dtype, device}: both measured ceilings at their default sizes (cached per process)."""
    device = _device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return dict(tflops=measure_matmul_tflops(device, dtype), gbps=measure_copy_bandwidth(device),
                dtype=str(dtype).removeprefix("torch."), device=name)


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
    (floor_ms / ms, in %: 100 means the kernel runs at the binding ceiling).
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
    return dict(
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
