"""Zero-padding of unaligned MLP widths at load, so every GEMM of the model reduces over a multiple of 64.

Qwen2.5-VL's vision MLP is 3420 wide: down_proj's K = 3420 gives 6840-byte bf16 rows, so the GEMM kernels get
8-byte cp.async and a masked K tail (kernels/gemm.py), and gate_up's output half of 3420 columns ends in a
partial tile. Padding the intermediate width I to the next multiple of 64 (3420 -> 3456) with zeros is exact:

    up    [gate; up] (2I, K) -> [gate; 0; up; 0] (2I', K), each half padded on its own, biases likewise; one
          projection (Qwen2-VL's fc1) is padded the same way as one half
    act   silu(0) * 0 = 0, quick_gelu(0) = 0: the extra intermediate columns are exactly zero
    down  (N, I) -> (N, I') with zero columns, which add exact zeros to every output

64 elements is one BLOCK_K of the prefill tiles and 128 bytes of a bf16 row (16-byte aligned for cp.async and TMA).

What is padded: the vision blocks' MLPs and the decoder layers' MLPs whose width is not a multiple of 64 and
whose up and down weights are both dense tensors. A quantized MLP (quant.QuantizedWeight) keeps its layout: its
packing and groups fix K, and every released quantized checkpoint is aligned already (REFERENCE.md §6: 8960,
18944, 11008, and the 72B copies' 29696 and vision 3456 are multiples of 64). A dense down_proj after a
quantized gate/up is left as well: the quantized half fixes the width both must share.

What is not padded:
- the patch embedding's K = 1176 (3*2*14*14): its bf16 rows are 2352 bytes, already 16-byte aligned, and it is
  the width of pixel_values as the processor produces them; padding it would copy every image's pixels;
- the merger: its width 4 * embed_dim (5120 in every release) is also the K of its fc1, a view of the tower's
  activations, aligned whenever embed_dim is a multiple of 16;
- every other linear of the released presets (qkv, proj, o, lm_head, ...) already has K a multiple of 64.

The padded tensors are the runtime weights: `model.weights` / `state_dict()` hold them, and the config keeps
the checkpoint's widths. `strip_mlp_padding` cuts them back to the checkpoint's shapes.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import torch

from .config import QWEN2_VL, ModelConfig
from .errors import CheckpointError

ALIGNMENT = 64


class MLPWeights(NamedTuple):
    """Runtime tensor names of one MLP; `gated`: the up weight is the fused [gate; up] of two halves;
    `width`: the intermediate width config.json gives (the checkpoint's)."""

    up: str
    up_bias: Optional[str]
    down: str
    gated: bool
    width: int


def aligned_width(width: int, multiple: int = ALIGNMENT) -> int:
    return -(-width // multiple) * multiple


def mlp_weights(cfg: ModelConfig) -> Iterator[MLPWeights]:
    """Every MLP of the vision tower's blocks and of the decoder layers, in the runtime (fused) naming."""
    v, t = cfg.vision, cfg.text
    gated_vision = v.family != QWEN2_VL
    up, down = ("mlp.gate_up_proj", "mlp.down_proj") if gated_vision else ("mlp.fc1", "mlp.fc2")
    for i in range(v.depth):
        p = f"visual.blocks.{i}."
        yield MLPWeights(p + up + ".weight", p + up + ".bias", p + down + ".weight", gated_vision, v.mlp_hidden_size)
    for i in range(t.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        yield MLPWeights(p + "gate_up_proj.weight", None, p + "down_proj.weight", True, t.intermediate_size)


def pad_mlp_widths(cfg: ModelConfig, weights: dict) -> dict:
    """Zero-pad, in place, every dense MLP of `weights` (the runtime layout of layout.fused_tensor_shapes) whose
    intermediate width is not a multiple of ALIGNMENT; returns `weights`. One MLP at a time, each padded tensor
    allocated where the weight lives and its entry replaced, so memory peaks at the model plus one MLP.
    The width is read from the weights, so padded weights pass through unchanged."""
    for mlp in mlp_weights(cfg):
        up, down = weights[mlp.up], weights[mlp.down]
        if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor)):
            continue
        width = _checked_width(mlp, up, down)
        padded = aligned_width(width)
        if padded == width:
            continue
        weights[mlp.up] = _pad_rows(up, width, padded, mlp.gated)
        if mlp.up_bias is not None:
            weights[mlp.up_bias] = _pad_rows(weights[mlp.up_bias], width, padded, mlp.gated)
        weights[mlp.down] = _pad_columns(down, padded)
    return weights


def strip_mlp_padding(cfg: ModelConfig, weights: dict) -> dict:
    """A new dict with the dense MLP tensors cut back to the config's widths (the checkpoint's shapes), e.g. of
    a loaded model's `state_dict()`: views, except the gated up weights and biases, whose two halves are not
    adjacent once padded (copies). The other entries are shared."""
    out = dict(weights)
    for mlp in mlp_weights(cfg):
        up, down = out[mlp.up], out[mlp.down]
        if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor)):
            continue
        padded = _checked_width(mlp, up, down)
        out[mlp.up] = _unpad_rows(up, mlp.width, padded, mlp.gated)
        if mlp.up_bias is not None:
            out[mlp.up_bias] = _unpad_rows(out[mlp.up_bias], mlp.width, padded, mlp.gated)
        out[mlp.down] = down[:, : mlp.width]
    return out


def _checked_width(mlp: MLPWeights, up: torch.Tensor, down: torch.Tensor) -> int:
    """The MLP's intermediate width, from down's K; up must hold one (or, gated, two) blocks of that many rows."""
    width = down.shape[-1]
    if up.shape[0] != (2 if mlp.gated else 1) * width:
        raise CheckpointError(f"{mlp.up} has {up.shape[0]} rows, which does not match {mlp.down}'s width {width}")
    return width


def _pad_rows(t: torch.Tensor, width: int, padded: int, gated: bool) -> torch.Tensor:
    """(h * width, ...) -> (h * padded, ...) with zero rows after each of the h = 1 or 2 halves: silu_and_mul
    and the SwiGLU GEMM split the rows in two equal halves, so each half keeps its own padding."""
    halves = 2 if gated else 1
    out = t.new_zeros((halves * padded, *t.shape[1:]))
    for h in range(halves):
        out[h * padded: h * padded + width].copy_(t[h * width: (h + 1) * width])
    return out


def _unpad_rows(t: torch.Tensor, width: int, padded: int, gated: bool) -> torch.Tensor:
    if not gated:
        return t[:width]
    return torch.cat([t[:width], t[padded: padded + width]])


def _pad_columns(t: torch.Tensor, padded: int) -> torch.Tensor:
    out = t.new_zeros((t.shape[0], padded))
    out[:, : t.shape[1]].copy_(t)
    return out
