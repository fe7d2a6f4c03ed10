"""The vision tower and its 2x2 merger, for both families. Composes ops; holds no math of its own.

Qwen2-VL: LayerNorm blocks with a QuickGELU MLP, attention per frame in every block.
Qwen2.5-VL: RMSNorm blocks with a SwiGLU MLP; attention inside 64-token windows except in the
`fullatt_block_indexes` blocks; tokens are permuted into window order before block 0 and back after the merger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import ModelConfig
from .errors import InputError
from .ops import OpTable
from .positions import VisionMeta, vision_metadata
from .processing.patchify import CLIP_MEAN, CLIP_STD


@dataclass
class VisionBlock:
    norm1_w: torch.Tensor
    norm1_b: Optional[torch.Tensor]
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    norm2_w: torch.Tensor
    norm2_b: Optional[torch.Tensor]
    # The MLP's width is the weights' own, never the config's: load() may have zero-padded it (align.py).
    # fc1 (Qwen2-VL) or fused gate/up (Qwen2.5-VL); or (gate, up) pairs where the weights are kept as two
    # tensors (hf_patch: a transformers model's own parameters, which a fused copy would duplicate)
    up_w: torch.Tensor | tuple
    up_b: torch.Tensor | tuple
    down_w: torch.Tensor  # fc2 or down_proj
    down_b: torch.Tensor
    full_attention: bool


class VisionTower:
    def __init__(self, cfg: ModelConfig, weights: dict, ops: OpTable):
        self.cfg, self.v, self.ops = cfg, cfg.vision, ops
        v = self.v
        self.gated = v.uses_windows
        up, down = ("mlp.gate_up_proj", "mlp.down_proj") if self.gated else ("mlp.fc1", "mlp.fc2")
        self.patch_w = weights["visual.patch_embed.weight"]
        self.blocks = []
        for i in range(v.depth):
            p = f"visual.blocks.{i}."
            if self.gated and p + up + ".weight" not in weights:  # unfused gate/up: run them as two GEMMs
                up_w, up_b = (tuple(weights[p + f"mlp.{n}_proj.{kind}"] for n in ("gate", "up"))
                              for kind in ("weight", "bias"))
            else:
                up_w, up_b = weights[p + up + ".weight"], weights[p + up + ".bias"]
            self.blocks.append(VisionBlock(
                norm1_w=weights[p + "norm1.weight"], norm1_b=weights.get(p + "norm1.bias"),
                qkv_w=weights[p + "attn.qkv.weight"], qkv_b=weights[p + "attn.qkv.bias"],
                proj_w=weights[p + "attn.proj.weight"], proj_b=weights[p + "attn.proj.bias"],
                norm2_w=weights[p + "norm2.weight"], norm2_b=weights.get(p + "norm2.bias"),
                up_w=up_w, up_b=up_b,
                down_w=weights[p + down + ".weight"], down_b=weights[p + down + ".bias"],
                full_attention=(not v.uses_windows) or i in v.fullatt_block_indexes,
            ))
        self.ln_q_w, self.ln_q_b = weights["visual.merger.ln_q.weight"], weights.get("visual.merger.ln_q.bias")
        self.fc1_w, self.fc1_b = weights["visual.merger.fc1.weight"], weights["visual.merger.fc1.bias"]
        self.fc2_w, self.fc2_b = weights["visual.merger.fc2.weight"], weights["visual.merger.fc2.bias"]
        self.dtype, self.device = self.patch_w.dtype, self.patch_w.device
        self.scale = v.head_dim ** -0.5

    def _norm(self, x, w, b):
        if b is None:
            return self.ops.rms_norm(x, w, self.v.norm_eps)
        return self.ops.layer_norm(x, w, b, self.v.norm_eps)

    def _add_norm(self, x, residual, w, b):
        """(norm(residual + x), residual + x) in one pass."""
        if b is None:
            return self.ops.add_rms_norm(x, residual, w, self.v.norm_eps)
        return self.ops.add_layer_norm(x, residual, w, b, self.v.norm_eps)

    def __call__(self, pixel_values: torch.Tensor, grid_thw, return_hidden: bool = False) -> torch.Tensor:
        """pixel_values (N, C*2*14*14) in the processor's merge-group order -> (N/4, LLM hidden) in the same order
        (`return_hidden`: as `forward`)."""
        meta = vision_metadata(self.cfg, grid_thw, self.device)
        if pixel_values.dim() != 2 or pixel_values.shape != (meta.num_patches, self.v.patch_dim):
            raise InputError(f"pixel values of shape {tuple(pixel_values.shape)} do not match the grids: expected "
                             f"({meta.num_patches}, {self.v.patch_dim}) for grid_thw {_rows(grid_thw)}")
        return self.forward(self.ops.patch_embed(pixel_values.to(self.device), self.patch_w), meta, return_hidden)

    def from_frames(self, frames: list, grid_thw, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
        """Resized uint8 frames (T, 3, h, w), one tensor per image/video in grid order -> merged features.

        The fused patch embedding normalises and gathers the patches inside its GEMM, so the (N, 1176) float
        pixel tensor is never written (ImageProcessor(return_frames=True) produces these frames)."""
        meta = vision_metadata(self.cfg, grid_thw, self.device)
        grids = torch.as_tensor(grid_thw).reshape(-1, 3).tolist()
        if len(frames) != len(grids):
            raise InputError(f"{len(frames)} frame tensors for {len(grids)} grid rows")
        v, parts = self.v, []
        for i, (f, (t, h, w)) in enumerate(zip(frames, grids)):
            f = torch.as_tensor(f)
            want_t = (t - 1) * v.temporal_patch_size + 1
            if (f.dtype != torch.uint8 or f.dim() != 4 or f.shape[1] != v.in_channels
                    or tuple(f.shape[2:]) != (h * v.patch_size, w * v.patch_size)
                    or not want_t <= f.shape[0] <= t * v.temporal_patch_size):
                raise InputError(f"frames {i}: expected uint8 (T, {v.in_channels}, {h * v.patch_size}, "
                                 f"{w * v.patch_size}) with {want_t}..{t * v.temporal_patch_size} frames for grid "
                                 f"{[t, h, w]}, got {f.dtype} {tuple(f.shape)}")
            parts.append(self.ops.patch_embed_frames(f.to(self.device), self.patch_w, mean, std, v.patch_size,
                                                     v.temporal_patch_size, v.spatial_merge_size))
        return self.forward(torch.cat(parts), meta)

    def forward(self, x: torch.Tensor, meta: VisionMeta, return_hidden: bool = False) -> torch.Tensor:
        """x: patch embeddings (N, E) in merge-group order -> merged features (N/4, LLM hidden), same order;
        with `return_hidden`, (merged features, the last block's output (N, E) in the order the blocks ran: window
        order for Qwen2.5-VL), which transformers 5 returns as the tower's last_hidden_state.

        Per block: h = norm1(x); x += proj(attn(rope(qkv(h)))); h = norm2(x); x += mlp(h), with each residual
        add fused into the following norm (the next block's norm1, or nothing before the merger)."""
        ops, unit, blocks = self.ops, self.v.merge_unit, self.blocks
        s, e = x.shape
        if meta.window_index is not None:
            x = x.view(s // unit, unit, e)[meta.window_index].reshape(s, e)
        h = self._norm(x, blocks[0].norm1_w, blocks[0].norm1_b)
        for i, blk in enumerate(blocks):
            segments = meta.full if blk.full_attention or meta.window is None else meta.window
            qkv = ops.linear(h, blk.qkv_w, blk.qkv_b)
            q, k, v = ops.vision_rotary(qkv, meta.cos, meta.sin, self.v.num_heads)
            attn = ops.varlen_attention(q, k, v, segments, self.scale)
            h, x = self._add_norm(ops.linear(attn.reshape(s, e), blk.proj_w, blk.proj_b), x, blk.norm2_w, blk.norm2_b)
            if isinstance(blk.up_w, tuple):
                gate, up = (ops.linear(h, w, b) for w, b in zip(blk.up_w, blk.up_b))
                h = ops.silu_and_mul(torch.cat([gate, up], dim=-1))
            elif self.gated:
                h = ops.linear_swiglu(h, blk.up_w, blk.up_b)
            else:
                h = ops.linear_act(h, blk.up_w, blk.up_b, "quick_gelu")
            down = ops.linear(h, blk.down_w, blk.down_b)
            if i + 1 < len(blocks):
                h, x = self._add_norm(down, x, blocks[i + 1].norm1_w, blocks[i + 1].norm1_b)
            else:
                x = x + down
        hidden = x
        x = ops.merger(x, self.ln_q_w, self.ln_q_b, self.fc1_w, self.fc1_b, self.fc2_w, self.fc2_b, self.v.norm_eps)
        if meta.reverse_index is not None:
            x = x[meta.reverse_index]
        return (x, hidden) if return_hidden else x


def _rows(grid) -> list:
    return torch.as_tensor(grid).reshape(-1, 3).tolist()
