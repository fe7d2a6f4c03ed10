"""Processed model inputs without a tokenizer or a picture: what warm-ups, `qwen2vl-fast tune` and benchmarks feed
the model when only the shapes matter (speed does not depend on the values)."""

from __future__ import annotations

import torch

IM_START = 151644  # <|im_start|>


def image_prompt(cfg, width: int, height: int, text_tokens: int = 64, seed: int = 0) -> dict:
    """Batch 1: <|im_start|>, text, <|vision_start|>, one <|image_pad|> per merged patch, <|vision_end|>, text.

    width and height are the resized image's (multiples of patch_size * merge_size, 28); pixel_values are random
    float32 rows (N, 1176), as the processor emits them; text ids are random in [0, 1000); `text_tokens` counts
    every token outside the image span (>= 1)."""
    v = cfg.vision
    unit = v.patch_size * v.spatial_merge_size
    if width <= 0 or height <= 0 or width % unit or height % unit:
        raise ValueError(f"image {width}x{height}: both sides must be positive multiples of {unit}")
    if text_tokens < 1:
        raise ValueError("text_tokens must be >= 1 (the <|im_start|> token)")
    gh, gw = height // v.patch_size, width // v.patch_size
    n = gh * gw
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 1000, (text_tokens - 1,), generator=gen).tolist()
    half = len(text) // 2
    ids = [IM_START, *text[:half], cfg.vision_start_token_id, *[cfg.image_token_id] * (n // v.merge_unit),
           cfg.vision_end_token_id, *text[half:]]
    return dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                pixel_values=torch.randn(n, v.patch_dim, generator=gen), image_grid_thw=torch.tensor([[1, gh, gw]]))


def text_prompt(length: int, seed: int = 0) -> dict:
    """Batch 1 of `length` random text ids (no image)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (1, length), generator=gen)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))
