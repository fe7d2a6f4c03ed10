"""Calling transformers' Qwen2-VL models the same way across its major versions (tests, benchmarks, --check).

transformers 5 refuses multimodal inputs without `mm_token_type_ids` (0 text, 1 image, 2 video per token),
which its processor returns; transformers 4 has no such argument. `transformers_inputs` adds it when needed.
"""

from __future__ import annotations

import torch

IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 151655, 151656


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID):
    return (input_ids == image_token_id).long() + 2 * (input_ids == video_token_id).long()


def transformers_inputs(inputs: dict) -> dict:
    """A copy of model inputs for transformers' forward, with mm_token_type_ids under transformers >= 5."""
    out = dict(inputs)
    if transformers_major() >= 5 and "mm_token_type_ids" not in out:
        out["mm_token_type_ids"] = mm_token_type_ids(out["input_ids"])
    return out
