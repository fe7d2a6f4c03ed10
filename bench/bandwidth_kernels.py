"""A Triton copy kernel for the measured bandwidth ceiling (bench/roofline.py): a streaming copy driven by the SMs,
as every kernel is, unlike `copy_`'s cudaMemcpyAsync. Imported lazily: Triton is optional and heavy to import."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

COPY_BLOCK = 4096  # float32 elements per program: 16 KiB, four 16-byte vectors per thread at 8 warps


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # .cg: through L2 only; .cs: streaming store (evict first). Neither data is read again.
    tl.store(dst + offs, tl.load(src + offs, mask=mask, cache_modifier=".cg"), mask=mask, cache_modifier=".cs")


def triton_copy(src: torch.Tensor, dst: torch.Tensor, block: int = COPY_BLOCK) -> torch.Tensor:
    """dst <- src for contiguous tensors of one dtype and size (a flat copy of their elements)."""
    if src.numel() != dst.numel() or src.dtype != dst.dtype or not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError(f"triton_copy needs contiguous tensors of one dtype and size, got {src.dtype} "
                         f"{tuple(src.shape)} -> {dst.dtype} {tuple(dst.shape)}")
    n = src.numel()
    if n:
        _copy_kernel[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block, num_warps=8)
    return dst
