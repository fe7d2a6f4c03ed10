"""Normalisations (references, transformers' numerics exactly; REFERENCE.md §2, §9)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import implementation, reference, triton_auto_on, triton_runs_on


@reference("layer_norm")
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim (Qwen2-VL ViT, merger ln_q); PyTorch accumulates in fp32 internally."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@reference("rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2RMSNorm: normalise in fp32, round to the input dtype, then multiply by the weight in that dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@reference("add_rms_norm")
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """residual' = residual + x; returns (rms_norm(residual'), residual'). The fused form of a decoder's
    `h = h + sublayer(...)` followed by the next norm; kernels do both in one pass over the row."""
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


@reference("add_layer_norm")
def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """residual' = residual + x; returns (layer_norm(residual'), residual'): the ViT's residual add fused with
    the next LayerNorm (Qwen2-VL blocks and merger)."""
    residual = residual + x
    return layer_norm(residual, weight, bias, eps), residual


# ------------------------------------------------------------------------------------------ Triton (kernels/norms.py)
# Imported on first call, so importing qwen2vl_fast never imports Triton.

@implementation("layer_norm", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def layer_norm_triton(x, weight, bias, eps):
    from qwen2vl_fast.kernels.norms import layer_norm as _k

    return _k(x, weight, bias, eps)


@implementation("rms_norm", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def rms_norm_triton(x, weight, eps):
    from qwen2vl_fast.kernels.norms import rms_norm as _k

    return _k(x, weight, eps)


@implementation("add_layer_norm", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def add_layer_norm_triton(x, residual, weight, bias, eps):
    from qwen2vl_fast.kernels.norms import add_layer_norm as _k

    return _k(x, residual, weight, bias, eps)


@implementation("add_rms_norm", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def add_rms_norm_triton(x, residual, weight, eps):
    from qwen2vl_fast.kernels.norms import add_rms_norm as _k

    return _k(x, residual, weight, eps)
