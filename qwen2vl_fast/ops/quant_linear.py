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
