"""The 2x2 patch merger (reference): norm, concatenate each group of 4 tokens, GEMM + bias + exact GELU,
GEMM + bias. Fast versions fuse the GELU into the first GEMM's epilogue."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .norms import layer_norm, rms_norm
from .registry import implementation, reference, triton_auto_on, triton_runs_on


@reference("merger", prefer_reference=True)
def merger(x: torch.Tensor, ln_w: torch.Tensor, ln_b, fc1_w: torch.Tensor, fc1_b: torch.Tensor,
           fc2_w: torch.Tensor, fc2_b: torch.Tensor, eps: float) -> torch.Tensor:
    """x (N, E) in merge-group order -> (N / 4, out). ln_b None selects RMSNorm (Qwen2.5-VL), else LayerNorm."""
    h = rms_norm(x, ln_w, eps) if ln_b is None else layer_norm(x, ln_w, ln_b, eps)
    h = h.reshape(-1, fc1_w.shape[1])
    return F.linear(F.gelu(F.linear(h, fc1_w, fc1_b)), fc2_w, fc2_b)


# ------------------------------------------------------------------------------------------ Triton
# The Triton norm (kernels/norms.py), then two GEMMs of kernels/gemm.py: fc1 with the exact GELU fused into its
# epilogue (one rounding after bias + GELU in fp32), fc2 with its bias. Imported on first call.

@implementation("merger", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def merger_triton(x, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, eps):
    from qwen2vl_fast.kernels import gemm, norms

    h = norms.rms_norm(x, ln_w, eps) if ln_b is None else norms.layer_norm(x, ln_w, ln_b, eps)
    h = h.reshape(-1, fc1_w.shape[1])
    return gemm.linear(gemm.linear_act(h, fc1_w, fc1_b, "gelu"), fc2_w, fc2_b)
