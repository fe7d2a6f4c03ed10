"""CUDA C++ implementations (the extension qwen2vl_fast._C), registered as the "cuda" backend of their ops.

Each wrapper calls a `torch.ops.qwen2vl_fast.*` op defined in csrc/ (TORCH_LIBRARY); the extension is imported
only when an op first runs on a CUDA device (`cuda_ext_runs_on`), so CPU installs never need it.

- vision_rotary -> `rotary_2d_` (csrc/rotary_2d.cu): rotates q and k IN PLACE inside qkv, returns views of it.
- patch_embed_frames -> `patch_gather` (csrc/patch_gather.cu) writes the normalised patch rows straight in the
  weight dtype, then one cuBLAS GEMM (F.linear); the (N, 1176) float32 rows are never materialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BackendError
from .registry import cuda_ext_runs_on, implementation

_ROTARY_HEAD_DIMS = (64, 80, 128)  # the instances compiled in csrc/rotary_2d.cu
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ops():
    """torch.ops.qwen2vl_fast, after importing the extension (the import runs its TORCH_LIBRARY registrations)."""
    from qwen2vl_fast import _C  # noqa: F401

    return torch.ops.qwen2vl_fast


@implementation("vision_rotary", "cuda", runs_on=cuda_ext_runs_on,
                supports=lambda cfg: cfg.vision.head_dim in _ROTARY_HEAD_DIMS)
def vision_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int):
    """2D rotary on the q and k of a fused qkv projection output, in place (csrc/rotary_2d.cu).

    qkv: (S, 3 * H * D) CUDA, fp32/fp16/bf16, last dim contiguous (rows may be padded), columns q | k | v, each
    head-major; cos, sin: (S, D) fp32. Returns q, k, v as (S, H, D) views of qkv, whose q and k parts are
    overwritten: rotated in fp32 and rounded once, bit-identical to the reference. v is untouched. Head dims
    64/80/128 only: `resolve` gives models with other head dims (the tiny test presets use 16) the next backend.
    """
    s, width = qkv.shape
    d = width // (3 * num_heads)
    if d not in _ROTARY_HEAD_DIMS or qkv.dtype not in _KERNEL_DTYPES or qkv.stride(-1) != 1:
        raise BackendError(f"the CUDA 2D rotary handles head_dim {sorted(_ROTARY_HEAD_DIMS)}, dtypes fp32/fp16/bf16 "
                           f"and a unit last stride; got head_dim {d}, {qkv.dtype}, stride {qkv.stride(-1)}")
    _ops().rotary_2d_(qkv, cos.float().contiguous(), sin.float().contiguous(), num_heads)
    return qkv.view(s, 3, num_heads, d).unbind(1)


@implementation("patch_embed_frames", "cuda", runs_on=cuda_ext_runs_on)
def patch_embed_frames(frames: torch.Tensor, weight: torch.Tensor, mean, std, patch_size: int = 14,
                       temporal_patch_size: int = 2, merge_size: int = 2) -> torch.Tensor:
    """The patch embedding from resized uint8 frames (T, C, H, W): gather + normalise into (N, C*tp*p*p) rows of
    weight's dtype in merge-group order (csrc/patch_gather.cu; rows bit-identical to
    normalize_patchify(...).to(weight.dtype)), then rows @ weight.T with weight (E, C*tp*p*p). Frames elsewhere
    than weight's device are copied there first."""
    if weight.dtype not in _KERNEL_DTYPES:
        raise BackendError(f"the CUDA patch gather writes fp32/fp16/bf16 rows, not {weight.dtype}")
    frames = frames.to(weight.device, non_blocking=True).contiguous()
    rows = _ops().patch_gather(frames, [float(m) for m in mean], [float(s) for s in std], patch_size,
                               temporal_patch_size, merge_size, weight.dtype)
    return F.linear(rows, weight)
