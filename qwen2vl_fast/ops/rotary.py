"""Rotary embeddings: the ViT's 2D rotary and the LLM's M-RoPE (references; REFERENCE.md §1c-d, §3).

Both rotate pairs (d, d + D/2) ("rotate_half" layout). The ViT applies it in fp32 and rounds back; the LLM
computes cos/sin in fp32, rounds them to the model dtype and rotates in the model dtype.
"""

from __future__ import annotations

import functools

import torch

from .registry import implementation, reference, triton_auto_on, triton_runs_on


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@reference("vision_rotary")
def vision_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int):
    """2D rotary on the q and k of a fused qkv projection output.

    qkv: (S, 3 * H * D), columns q | k | v, each head-major; cos, sin: (S, D) fp32.
    Returns q, k, v as (S, H, D) in qkv's dtype; q and k rotated in fp32 then rounded.
    """
    s = qkv.shape[0]
    q, k, v = qkv.view(s, 3, num_heads, -1).unbind(1)
    c, n = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    q32, k32 = q.float(), k.float()
    q_rot = (q32 * c + rotate_half(q32) * n).to(qkv.dtype)
    k_rot = (k32 * c + rotate_half(k32) * n).to(qkv.dtype)
    return q_rot, k_rot, v


@reference("mrope_cos_sin")
def mrope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section, dtype: torch.dtype):
    """M-RoPE tables: position_ids (3, B, L) -> cos, sin (B, L, D) in `dtype`.

    Frequency j uses the T row for j < s0, H for s0 <= j < s0+s1, W above (contiguous sections); dim j + D/2
    repeats frequency j. Angles are `pos * inv_freq` in fp32, cos/sin in fp32, then rounded to `dtype`.
    """
    half = inv_freq.shape[0]
    axis = _section_axes(tuple(mrope_section), str(position_ids.device))
    if axis.shape[0] != half:
        raise ValueError(f"mrope_section {list(mrope_section)} does not cover {half} frequencies")
    # pos_per_freq[b, l, j] = position_ids[axis[j], b, l]
    pos = position_ids.float().permute(1, 2, 0)[..., axis]
    freqs = pos * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@functools.lru_cache(maxsize=32)
def _section_axes(section: tuple, device: str) -> torch.Tensor:
    """Which M-RoPE axis (0 = T, 1 = H, 2 = W) each frequency uses; cached so a CUDA-graph capture never copies
    it from the host."""
    # From a host list, not repeat_interleave: its output size is data-dependent, which torch.compile cannot trace.
    return torch.tensor([axis for axis, n in enumerate(section) for _ in range(n)], dtype=torch.int64, device=device)


@reference("apply_rotary")
def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q (B, L, Hq, D) and k (B, L, Hkv, D) by cos/sin (B, L, D), in q's dtype."""
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s


# ------------------------------------------------------------------------------------------ Triton (kernels/rotary.py)

@implementation("vision_rotary", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def vision_rotary_triton(qkv, cos, sin, num_heads):
    """Rotates q and k inside `qkv` IN PLACE (no copies) and returns views of it; callers must not reuse
    the un-rotated qkv afterwards."""
    from qwen2vl_fast.kernels.rotary import vision_rotary as _k

    return _k(qkv, cos, sin, num_heads)


# ------------------------------------------------------------------------------ Triton M-RoPE (kernels/mrope.py)

@implementation("mrope_cos_sin", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def mrope_cos_sin_triton(position_ids, inv_freq, mrope_section, dtype):
    """One kernel for the tables (fp32 angles and trig, one rounding); equal to the reference up to the libm's
    cos/sin (libdevice on CUDA, numpy under the interpreter: 1 fp32 ulp before the rounding)."""
    from qwen2vl_fast.kernels.mrope import mrope_cos_sin as _k

    return _k(position_ids, inv_freq, mrope_section, dtype)


@implementation("apply_rotary", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def apply_rotary_triton(q, k, cos, sin):
    """New rotated q, k (inputs untouched), bit-identical to the reference in every dtype."""
    from qwen2vl_fast.kernels.mrope import apply_rotary as _k

    return _k(q, k, cos, sin)
