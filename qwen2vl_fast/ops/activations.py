"""Activations (references). Each form matches transformers' exactly: sglang PR #2365 saw Qwen2-VL outputs
drift until QuickGELU used this exact expression."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import implementation, reference, triton_auto_on, triton_runs_on


@reference("quick_gelu")
def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the Qwen2-VL ViT MLP activation."""
    return x * torch.sigmoid(1.702 * x)


@reference("gelu")
def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU: the merger's activation."""
    return F.gelu(x)


@reference("silu_and_mul")
def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused gate/up projection output (..., 2I) -> silu(gate) * up, (..., I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------- Triton (kernels/activations.py)

@implementation("quick_gelu", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def quick_gelu_triton(x):
    from qwen2vl_fast.kernels.activations import quick_gelu as _k

    return _k(x)


@implementation("gelu", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def gelu_triton(x):
    from qwen2vl_fast.kernels.activations import gelu as _k

    return _k(x)


@implementation("silu_and_mul", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def silu_and_mul_triton(gate_up):
    from qwen2vl_fast.kernels.activations import silu_and_mul as _k

    return _k(gate_up)
