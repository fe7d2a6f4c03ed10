"""Weight-only quantized linear (reference): y = x @ dequantize(w).T + b, the activation's columns permuted
first for act-order weights. Fast versions dequantise inside the GEMM and never build the dense weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import reference


@reference("quant_linear")
def quant_linear(x: torch.Tensor, w, bias=None) -> torch.Tensor:
    """x (..., K), w a qwen2vl_fast.quant.QuantizedWeight (K -> N), bias (N,) or None -> (..., N) in x's dtype."""
    from ..quant.weight import dequantize

    return F.linear(x, dequantize(w, x.dtype), bias)


# Imported on first call, so importing qwen2vl_fast never imports Triton. Fused dequantisation inside the GEMM
# (kernels/quant_gemm.py); act-order permutes x's columns before the launch.
from .registry import implementation, triton_auto_on, triton_runs_on  # noqa: E402


@implementation("quant_linear", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def quant_linear_triton(x: torch.Tensor, w, bias=None) -> torch.Tensor:
    from qwen2vl_fast.kernels.quant_gemm import quant_linear as _k

    return _k(x, w, bias)
