"""The transformers-compatible model: `model(input_ids, attention_mask, pixel_values, image_grid_thw, ...)`.

Same call signature and `.logits` as transformers' `Qwen2VLForConditionalGeneration` /
`Qwen2_5_VLForConditionalGeneration` forward (prefill, no cache): vision features are written over the
`<|image_pad|>` / `<|video_pad|>` embeddings in order, M-RoPE positions follow the original release, left
padding is handled through `attention_mask`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from .checkpoint import load_checkpoint
from .config import QWEN2_5_VL, ModelConfig, load_config
from .errors import InputError
from .language import LanguageModel
from .ops import OpTable, resolve
from .positions import mrope_position_ids
from .vision import VisionTower

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
           "float": torch.float32, "half": torch.float16}


@dataclass
class Qwen2VLFastOutput:
    """What the forward returns: logits (B, L, vocab) in the model dtype, and the M-RoPE deltas (B, 1)
    that decoding needs (position of cache slot i = i + delta)."""

    logits: torch.Tensor
    rope_deltas: torch.Tensor

    def __getitem__(self, key):  # `out["logits"]`, like transformers' ModelOutput
        return getattr(self, key)


def resolve_dtype(dtype, cfg: ModelConfig) -> torch.dtype:
    """None or "auto" -> the checkpoint's `torch_dtype` (float32 if absent); strings and torch dtypes accepted."""
    if isinstance(dtype, torch.dtype):
        chosen = dtype
    elif dtype is None or dtype == "auto":
        chosen = _DTYPES.get(str(cfg.torch_dtype), torch.float32)
    elif isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        chosen = _DTYPES[dtype.removeprefix("torch.")]
    else:
        raise InputError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")
    if chosen not in (torch.float32, torch.float16, torch.bfloat16):
        raise InputError(f"unsupported dtype {chosen}; use float32, float16 or bfloat16")
    return chosen


def load(path: str | os.PathLike, device="cpu", dtype=None, backend: str = "auto", progress=None) -> "Qwen2VLFastModel":
    """Load a Qwen2-VL / Qwen2.5-VL checkpoint directory (config.json + safetensors).

    device: where the weights go (read straight there); dtype: None/"auto" for the checkpoint's dtype;
    backend: "auto" | "torch" | "triton" | "cuda" (overridden by QWEN2VL_FAST_BACKEND).
    The Qwen2.5-VL vision tower is kept in bfloat16 when float16 is asked for: it overflows fp16 in its last
    block (vLLM's note for Qwen2.5-VL-3B).
    """
    cfg = load_config(path)
    device = torch.device(device)
    dtype = resolve_dtype(dtype, cfg)
    ops = resolve(backend, device)
    vision_dtype = torch.bfloat16 if (dtype == torch.float16 and cfg.model_type == QWEN2_5_VL) else dtype
    weights = load_checkpoint(path, cfg, device=device, dtype=dtype, progress=progress)
    if vision_dtype != dtype:
        weights = {k: (w.to(vision_dtype) if k.startswith("visual.") else w) for k, w in weights.items()}
    return Qwen2VLFastModel(cfg, weights, ops)


class Qwen2VLFastModel:
    def __init__(self, cfg: ModelConfig, weights: dict, ops: OpTable):
        self.config, self.ops, self.weights = cfg, ops, weights
        self.visual = VisionTower(cfg, weights, ops)
        self.language_model = LanguageModel(cfg, weights, ops)
        self.device, self.dtype = self.language_model.device, self.language_model.dtype

    def __repr__(self) -> str:
        n = sum(w.numel() for k, w in self.weights.items() if k != "lm_head.weight" or not self.config.text.tie_word_embeddings)
        return (f"Qwen2VLFastModel({self.config.model_type}, {n / 1e9:.2f}B params, dtype={self.dtype}, "
                f"device={self.device}, backend={self.ops.backend!r})")

    def state_dict(self) -> dict:
        return dict(self.weights)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 pixel_values: Optional[torch.Tensor] = None, image_grid_thw: Optional[torch.Tensor] = None,
                 pixel_values_videos: Optional[torch.Tensor] = None, video_grid_thw: Optional[torch.Tensor] = None,
                 second_per_grid_ts=None, **unused) -> Qwen2VLFastOutput:
        input_ids, attention_mask = self._check_text(input_ids, attention_mask)
        # Positions first: they also check that the placeholders match the grids, before any scatter.
        position_ids, rope_deltas = mrope_position_ids(
            self.config, input_ids, attention_mask, image_grid_thw, video_grid_thw, second_per_grid_ts)
        embeds = self.language_model.embed(input_ids)
        for pixels, grid, token_id, name in ((pixel_values, image_grid_thw, self.config.image_token_id, "image"),
                                             (pixel_values_videos, video_grid_thw, self.config.video_token_id, "video")):
            if pixels is None:
                continue
            if grid is None:
                raise InputError(f"{name} pixel values were given without {name}_grid_thw")
            features = self.visual(torch.as_tensor(pixels), grid).to(embeds.dtype)
            slots = (input_ids == token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(slots, features)
        hidden = self.language_model(embeds, position_ids, attention_mask)
        return Qwen2VLFastOutput(logits=self.language_model.logits(hidden), rope_deltas=rope_deltas)

    forward = __call__

    def _check_text(self, input_ids, attention_mask):
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32) or input_ids.shape[1] == 0:
            raise InputError(f"input_ids must be a non-empty (batch, length) integer tensor, got "
                             f"{tuple(input_ids.shape)} {input_ids.dtype}")
        vocab = self.config.text.vocab_size
        if bool(((input_ids < 0) | (input_ids >= vocab)).any()):
            raise InputError(f"input_ids hold ids outside the vocabulary [0, {vocab})")
        input_ids = input_ids.to(self.device, torch.long)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask).to(self.device)
            if attention_mask.shape != input_ids.shape:
                raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                                 f"shape {tuple(input_ids.shape)}")
        return input_ids, attention_mask
