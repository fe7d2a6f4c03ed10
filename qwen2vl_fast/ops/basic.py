"""Dense ops: linear layers, the token embedding and the ViT patch embedding (references)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import implementation, reference, triton_auto_on, triton_runs_on, variant


@reference("linear", prefer_reference=True)
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias; weight (out, in), in the model dtype."""
    return F.linear(x, weight, bias)


@reference("embedding")
def embedding(input_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Token embedding lookup: (B, L) ids -> (B, L, hidden)."""
    return F.embedding(input_ids, table)


@reference("patch_embed", prefer_reference=True)
def patch_embed(pixel_values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The Conv3d patch embedding as one GEMM: pixel_values (N, C*2*14*14) @ weight (E, C*2*14*14).T.

    The Conv3d's kernel equals its stride, so each output is the dot product of one flattened patch with one
    filter; the flattening order (c, t, py, px) of the processor's rows equals the Conv3d weight's.
    pixel_values are cast to the weight dtype first, as transformers' `get_image_features` does.
    """
    return F.linear(pixel_values.to(weight.dtype), weight)


_ACTS = ("none", "quick_gelu", "gelu")


@reference("linear_act", prefer_reference=True)
def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """act(x @ weight.T + bias), act in none | quick_gelu | gelu (exact erf): a GEMM with its epilogue."""
    y = F.linear(x, weight, bias)
    if act == "quick_gelu":
        return y * torch.sigmoid(1.702 * y)
    if act == "gelu":
        return F.gelu(y)
    if act != "none":
        raise ValueError(f"act must be one of {_ACTS}, got {act!r}")
    return y


@reference("linear_swiglu", prefer_reference=True)
def linear_swiglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(gate) * up of a fused gate/up projection: weight (2I, K) = [gate; up] -> (..., I)."""
    gate, up = F.linear(x, weight, bias).chunk(2, dim=-1)
    return F.silu(gate) * up


@reference("patch_embed_frames")
def patch_embed_frames(frames: torch.Tensor, weight: torch.Tensor, mean, std, patch_size: int = 14,
                       temporal_patch_size: int = 2, merge_size: int = 2) -> torch.Tensor:
    """The patch embedding straight from resized uint8 frames (T, C, H, W): normalise, gather the
    (C, t, 14, 14) tubes in merge-group order, GEMM with weight (E, C*t*14*14). Equals
    patch_embed(normalize_patchify(frames)): the fast version never writes the (N, 1176) float tensor."""
    from ..processing.patchify import normalize_patchify

    rows, _ = normalize_patchify(frames, mean, std, patch_size, temporal_patch_size, merge_size)
    return F.linear(rows.to(weight.dtype), weight)


# ------------------------------------------------------------------------- Triton (kernels/gemm.py, kernels/patch_embed.py)
# Imported on first call, so importing qwen2vl_fast never imports Triton. The GEMM epilogues round once, after the
# bias and activation in fp32 (the references round the GEMM output first): see kernels/gemm.py.

@implementation("linear", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def linear_triton(x, weight, bias=None):
    from qwen2vl_fast.kernels.gemm import linear as _k

    return _k(x, weight, bias)


@implementation("linear_act", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def linear_act_triton(x, weight, bias, act):
    from qwen2vl_fast.kernels.gemm import linear_act as _k

    return _k(x, weight, bias, act)


@implementation("linear_swiglu", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def linear_swiglu_triton(x, weight, bias):
    from qwen2vl_fast.kernels.gemm import linear_swiglu as _k

    return _k(x, weight, bias)


@implementation("patch_embed", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def patch_embed_triton(pixel_values, weight):
    from qwen2vl_fast.kernels.patch_embed import patch_embed as _k

    return _k(pixel_values, weight)


@implementation("patch_embed_frames", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def patch_embed_frames_triton(frames, weight, mean, std, patch_size: int = 14, temporal_patch_size: int = 2,
                              merge_size: int = 2):
    from qwen2vl_fast.kernels.patch_embed import patch_embed_frames as _k

    return _k(frames, weight, mean, std, patch_size, temporal_patch_size, merge_size)


# ------------------------------------------------------------------------- cuBLAS GEMM + our activation kernel
# Candidates of `auto` only (registry.variant): a fused-epilogue GEMM must beat not just the all-PyTorch reference
# (cuBLAS + two or three elementwise kernels) but also cuBLAS followed by our one-pass activation kernel.
# Numerics as the reference: the GEMM output is rounded to the model dtype before the activation.

@variant("linear_act", "cublas+triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def linear_act_cublas_triton(x, weight, bias, act):
    from qwen2vl_fast.kernels import activations

    y = F.linear(x, weight, bias)
    if act == "none":
        return y
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"act must be one of {_ACTS}, got {act!r}")
    return activations.quick_gelu(y) if act == "quick_gelu" else activations.gelu(y)


@variant("linear_swiglu", "cublas+triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def linear_swiglu_cublas_triton(x, weight, bias):
    from qwen2vl_fast.kernels.activations import silu_and_mul

    return silu_and_mul(F.linear(x, weight, bias))


# ------------------------------------------------------------------------- split-K decode GEMV (kernels/gemv_splitk.py)
# Candidates of `auto` only, for M <= 16 rows (decode): K split so the column tiles x splits fill one wave of
# resident CTAs, reduced in a fixed order (deterministic), in the same launch or in a second one. It raises for M > 16, so it never wins a prefill shape.
# Raced on CUDA only: kept out of the interpreted race (runs_on = auto_on) so the CPU dispatch tests keep their
# candidate lists; tests/test_kernels_gemv_splitk.py races it under the interpreter itself.

@variant("linear", "triton-splitk", runs_on=triton_auto_on, auto_on=triton_auto_on)
def linear_gemv_splitk(x, weight, bias=None):
    from qwen2vl_fast.kernels.gemv_splitk import linear as _k

    return _k(x, weight, bias)


@variant("linear_swiglu", "triton-splitk", runs_on=triton_auto_on, auto_on=triton_auto_on)
def linear_swiglu_gemv_splitk(x, weight, bias):
    from qwen2vl_fast.kernels.gemv_splitk import linear_swiglu as _k

    return _k(x, weight, bias)


# The same with the reduction in a second kernel (correct whatever the GPU's memory ordering; see gemv_splitk.py)
@variant("linear", "triton-splitk-2pass", runs_on=triton_auto_on, auto_on=triton_auto_on)
def linear_gemv_splitk_2pass(x, weight, bias=None):
    from qwen2vl_fast.kernels.gemv_splitk import linear as _k

    return _k(x, weight, bias, reduce="pass")


@variant("linear_swiglu", "triton-splitk-2pass", runs_on=triton_auto_on, auto_on=triton_auto_on)
def linear_swiglu_gemv_splitk_2pass(x, weight, bias):
    from qwen2vl_fast.kernels.gemv_splitk import linear_swiglu as _k

    return _k(x, weight, bias, reduce="pass")
