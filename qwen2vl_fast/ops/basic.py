"""Dense ops: linear layers, the token embedding and the ViT patch embedding (references)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import reference


@reference("linear")
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias; weight (out, in), in the model dtype."""
    return F.linear(x, weight, bias)


@reference("embedding")
def embedding(input_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Token embedding lookup: (B, L) ids -> (B, L, hidden)."""
    return F.embedding(input_ids, table)


@reference("patch_embed")
def patch_embed(pixel_values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The Conv3d patch embedding as one GEMM: pixel_values (N, C*2*14*14) @ weight (E, C*2*14*14).T.

    The Conv3d's kernel equals its stride, so each output is the dot product of one flattened patch with one
    filter; the flattening order (c, t, py, px) of the processor's rows equals the Conv3d weight's.
    pixel_values are cast to the weight dtype first, as transformers' `get_image_features` does.
    """
    return F.linear(pixel_values.to(weight.dtype), weight)
