"""FLOP counts of one model forward (prefill), from the config: the numerator of every TFLOP/s we report.

Counted: each matrix product at 2 FLOPs per multiply-add, i.e. 2 x (weights of the product) x tokens, plus
attention's two products QK^T and PV (4 x width x query-key pairs). Not counted: norms, activations, rotary,
softmax, bias adds and embedding lookups: O(tokens x width), under 1% of the products here (they are
memory-bound, so they cost time without FLOPs; the roofline fraction shows that cost).
Causal attention counts the L(L+1)/2 pairs it needs, not L^2 (as flash-attention's benchmarks count).

Vision attention follows the models (REFERENCE.md): Qwen2-VL attends within each frame in every block;
Qwen2.5-VL attends within windows of `window_size` pixels (8x8 patches) except in `fullatt_block_indexes`.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from qwen2vl_fast.config import ModelConfig, TextConfig, VisionConfig


def _chunks(n: int, size: int) -> list[int]:
    """Split n into pieces of `size` and a remainder: 10, 4 -> [4, 4, 2]."""
    return [size] * (n // size) + ([n % size] if n % size else [])


def vision_sequences(v: VisionConfig, grid_thw: Iterable[Sequence[int]], windowed: bool) -> list[int]:
    """Lengths (in patches) of the independent attention sequences of one vision block.

    Full blocks: one sequence of h*w patches per frame. Windowed blocks (Qwen2.5-VL): windows of
    `window_units` x `window_units` merged units (4 patches each), the image edge giving smaller windows.
    """
    seqs = []
    m = v.spatial_merge_size
    for t, h, w in grid_thw:
        if not windowed:
            seqs += [h * w] * t
            continue
        rows, cols = _chunks(h // m, v.window_units), _chunks(w // m, v.window_units)
        seqs += [r * c * m * m for r in rows for c in cols] * t
    return seqs


def vision_matmul_params(v: VisionConfig) -> dict:
    """Weights of the vision tower's matrix products: per patch (embed + blocks), per merged token (merger)."""
    d = v.embed_dim
    mlp = (3 if v.uses_windows else 2) * d * v.mlp_hidden_size  # SwiGLU gate/up/down vs fc1/fc2
    per_patch = v.patch_dim * d + v.depth * (3 * d * d + d * d + mlp)
    merged = v.merger_hidden_size
    per_merged = merged * merged + merged * v.out_hidden_size
    return dict(per_patch=per_patch, per_merged_token=per_merged)


def text_matmul_params(t: TextConfig) -> int:
    """Weights of the decoder's matrix products per token, the LM head included (tied or not, it multiplies)."""
    h, kv = t.hidden_size, t.num_key_value_heads * t.head_dim
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * t.intermediate_size  # q, k, v, o, gate/up/down
    return t.num_hidden_layers * per_layer + h * t.vocab_size


def vision_flops(v: VisionConfig, grid_thw: Iterable[Sequence[int]]) -> dict:
    """{patches, linear, attention, total} FLOPs of the vision tower and merger for these images."""
    grid = [tuple(int(x) for x in g) for g in grid_thw]
    patches = sum(t * h * w for t, h, w in grid)
    p = vision_matmul_params(v)
    linear = 2 * patches * p["per_patch"] + 2 * (patches // v.merge_unit) * p["per_merged_token"]
    full_blocks = len(v.fullatt_block_indexes) if v.uses_windows else v.depth
    pairs_full = sum(s * s for s in vision_sequences(v, grid, windowed=False))
    pairs_win = sum(s * s for s in vision_sequences(v, grid, windowed=True)) if v.uses_windows else 0
    attention = 4 * v.embed_dim * (full_blocks * pairs_full + (v.depth - full_blocks) * pairs_win)
    return dict(patches=patches, linear=linear, attention=attention, total=linear + attention)


def text_flops(t: TextConfig, seq_len: int, batch: int = 1) -> dict:
    """{tokens, linear, attention, total} FLOPs of a causal prefill of `batch` sequences of `seq_len` tokens."""
    tokens = batch * seq_len
    linear = 2 * tokens * text_matmul_params(t)
    pairs = batch * seq_len * (seq_len + 1) // 2
    attention = 4 * t.hidden_size * pairs * t.num_hidden_layers
    return dict(tokens=tokens, linear=linear, attention=attention, total=linear + attention)


def forward_flops(cfg: ModelConfig, grid_thw: Iterable[Sequence[int]], seq_len: int, batch: int = 1) -> dict:
    """{vision, text, total} FLOPs of one model forward: vision tower on all images, then the decoder prefill."""
    vis = vision_flops(cfg.vision, grid_thw)
    txt = text_flops(cfg.text, seq_len, batch)
    return dict(vision=vis, text=txt, total=vis["total"] + txt["total"])
