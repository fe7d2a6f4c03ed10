"""The transformers-compatible model: `model(input_ids, attention_mask, pixel_values, image_grid_thw, ...)`.

Same call signature and `.logits` as transformers' `Qwen2VLForConditionalGeneration` /
`Qwen2_5_VLForConditionalGeneration` forward (prefill, no cache): vision features are written over the
`<|image_pad|>` / `<|video_pad|>` embeddings in order, M-RoPE positions follow the original release, left
padding is handled through `attention_mask`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .align import pad_mlp_widths
from .checkpoint import load_checkpoint
from .config import QWEN2_5_VL, ModelConfig, load_config
from .errors import DeviceError, InputError
from .language import LanguageModel
from .layout import fused_tensor_shapes
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


# transformers arguments that change nothing for a cache-less prefill, accepted when they ask for the default
_NEUTRAL_KWARGS = {"use_cache": (None, False, True), "return_dict": (None, True), "output_attentions": (None, False),
                   "output_hidden_states": (None, False), "rope_deltas": (None,), "cache_position": (None,),
                   "past_key_values": (None,), "inputs_embeds": (None,)}


def _check_unsupported(kwargs: dict) -> None:
    for name, value in kwargs.items():
        allowed = _NEUTRAL_KWARGS.get(name)
        if allowed is None or not any(value is a for a in allowed):
            raise InputError(f"argument {name}={value!r} is not supported by this forward (prefill without a "
                             f"KV cache); supported: input_ids, attention_mask, pixel_values, image_grid_thw, "
                             f"pixel_values_videos, video_grid_thw, second_per_grid_ts, position_ids, logits_to_keep")


def check_device(device) -> torch.device:
    """`device` as a torch.device, or a `DeviceError` saying why this machine cannot use it (checked before
    any work, so a CPU-only machine does not first read or write gigabytes and then fail on CUDA)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"device {device!r} is not a device name: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            why = f"this torch ({torch.__version__}) is a CPU-only build"
        elif not torch.cuda.is_available():
            why = "no CUDA device visible (no GPU, no driver, or CUDA_VISIBLE_DEVICES hides them)"
        elif dev.index is not None and dev.index >= (n := torch.cuda.device_count()):
            why = f"only {n} CUDA device(s) visible (cuda:0..cuda:{n - 1})"
        else:
            return dev
        raise DeviceError(f"device {str(device)!r} is not available: {why}")
    backend = getattr(torch, dev.type, None) if dev.type not in ("cpu", "meta") else None
    if backend is not None and hasattr(backend, "is_available") and not backend.is_available():
        raise DeviceError(f"device {str(device)!r} is not available on this machine")
    return dev


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


def load(path: str | os.PathLike, device="cpu", dtype=None, backend: str = "auto", progress=None,
         dispatch: str = "measure", dispatch_cache=None, tensor_parallel=False) -> "Qwen2VLFastModel":
    """Load a Qwen2-VL / Qwen2.5-VL checkpoint directory (config.json + safetensors).

    device: where the weights go (read straight there); dtype: None/"auto" for the checkpoint's dtype;
    backend: "auto" | "torch" | "triton" | "cuda" (overridden by QWEN2VL_FAST_BACKEND). Under "auto", an op with
    several implementations on the device runs the one measured fastest at each shape (ops/dispatch.py);
    dispatch: "measure" (the first call of a new shape times the candidates, as `tune` does), "cached" (only
    what the tuning cache holds; cuBLAS for unmeasured GEMMs) or "default" (no measurements at all);
    dispatch_cache: the tuning cache file (default ~/.cache/qwen2vl_fast/dispatch.json).
    The Qwen2.5-VL vision tower is kept in bfloat16 when float16 is asked for: it overflows fp16 in its last
    block (vLLM's note for Qwen2.5-VL-3B).
    MLP widths that are not multiples of 64 (Qwen2.5-VL's vision 3420) are zero-padded (align.py), which leaves
    the logits unchanged; `model.weights` / `state_dict()` hold the padded runtime tensors, and
    `align.strip_mlp_padding(model.config, model.state_dict())` gives the checkpoint's shapes back.
    tensor_parallel: True (the default torch.distributed group, initialised by the caller, e.g. under torchrun)
    or a ProcessGroup shards the language model over the group's ranks, each reading only its slices; every
    rank must make the same calls and gets the full logits (parallel.py). `model.config.text` is then the
    rank's share (heads, KV heads, MLP width); `cuda` without an index means the rank's GPU (LOCAL_RANK).
    """
    from . import parallel

    if tensor_parallel is None or tensor_parallel is False:  # the whole model in this process
        device = check_device(device)
        cfg = load_config(path)
        return _load(path, cfg, device, resolve_dtype(dtype, cfg), backend, progress, dispatch, dispatch_cache, None)
    group, rank, _ = parallel.process_group(tensor_parallel)
    model = None
    try:
        device = check_device(device)
        cfg = load_config(path)
        dtype = resolve_dtype(dtype, cfg)
        tp = parallel.setup(tensor_parallel, cfg, device)  # shardability: the same verdict on every rank
        device = parallel.rank_device(device, tp)
        model = _load(path, cfg, device, dtype, backend, progress if rank == 0 else False, dispatch,
                      dispatch_cache, tp)
    finally:  # every rank learns whether all loaded, so none is left waiting in a later collective
        parallel.fail_together(group, model is not None)
    return model


def _load(path, cfg, device, dtype, backend, progress, dispatch, dispatch_cache, tp) -> "Qwen2VLFastModel":
    run_cfg = cfg if tp is None else tp.local_config(cfg)
    ops = resolve(backend, device, run_cfg, dispatch=dispatch, cache_path=dispatch_cache)
    vision_dtype = torch.bfloat16 if (dtype == torch.float16 and cfg.model_type == QWEN2_5_VL) else dtype
    weights = load_checkpoint(path, cfg, device=device, dtype=dtype, progress=progress, shard=tp)
    if tp is not None:
        tp.wrap_gathered(weights, device)
    if vision_dtype != dtype:
        weights = {k: (w.to(vision_dtype) if k.startswith("visual.") else w) for k, w in weights.items()}
    pad_mlp_widths(run_cfg, weights)
    return Qwen2VLFastModel(run_cfg, weights, ops, tensor_parallel=tp)


class Qwen2VLFastModel:
    def __init__(self, cfg: ModelConfig, weights: dict, ops: OpTable, tensor_parallel=None):
        self.config, self.ops, self.weights = cfg, ops, weights
        self.tensor_parallel = tensor_parallel  # parallel.TensorParallel of this rank, or None
        self.visual = VisionTower(cfg, weights, ops)  # replicated on every rank (parallel.py says why)
        self.language_model = LanguageModel(cfg, weights, ops, tensor_parallel=tensor_parallel)
        self.device, self.dtype = self.language_model.device, self.language_model.dtype

    def __repr__(self) -> str:
        # the checkpoint's parameter count: the shapes before any load-time padding (align.py), and before any
        # tensor-parallel split (the whole model's config)
        tp = self.tensor_parallel
        shapes = fused_tensor_shapes(self.config if tp is None else tp.cfg)
        n = sum(math.prod(shapes[k]) if k in shapes else w.numel() for k, w in self.weights.items()
                if k != "lm_head.weight" or not self.config.text.tie_word_embeddings)
        where = "" if tp is None else f", tensor_parallel=rank {tp.rank} of {tp.size}"
        return (f"Qwen2VLFastModel({self.config.model_type}, {n / 1e9:.2f}B params, dtype={self.dtype}, "
                f"device={self.device}, backend={self.ops.backend!r}{where})")

    def state_dict(self) -> dict:
        return dict(self.weights)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 pixel_values: Optional[torch.Tensor] = None, image_grid_thw: Optional[torch.Tensor] = None,
                 pixel_values_videos: Optional[torch.Tensor] = None, video_grid_thw: Optional[torch.Tensor] = None,
                 second_per_grid_ts=None, position_ids: Optional[torch.Tensor] = None, logits_to_keep: int = 0,
                 mm_token_type_ids: Optional[torch.Tensor] = None, pixel_frames: Optional[list] = None,
                 **kwargs) -> Qwen2VLFastOutput:
        """Prefill forward, as transformers' `forward` without a cache. `position_ids` (3, B, L) or (B, L)
        overrides the M-RoPE ids (rope_deltas then come from them); `logits_to_keep` = k > 0 computes logits
        for the last k positions only. `mm_token_type_ids` (what transformers 5 processors return) is accepted
        and checked against the placeholders in input_ids, which remain the source of truth. `pixel_frames`
        (resized uint8 frames per image, `ImageProcessor(return_frames=True)`) replaces pixel_values: the
        patch embedding then normalises and gathers inside its GEMM."""
        _check_unsupported(kwargs)
        input_ids, attention_mask, embeds, position_ids, rope_deltas = self.prepare_inputs(
            input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
            second_per_grid_ts, position_ids, mm_token_type_ids, pixel_frames)
        hidden = self.language_model(embeds, position_ids, attention_mask)
        if logits_to_keep:
            hidden = hidden[:, -int(logits_to_keep):]
        return Qwen2VLFastOutput(logits=self.language_model.logits(hidden), rope_deltas=rope_deltas)

    forward = __call__

    def prepare_inputs(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                       pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, position_ids=None,
                       mm_token_type_ids=None, pixel_frames=None, encode=None):
        """Validated ids and mask, input embeddings with the vision features in place, M-RoPE ids and deltas:
        everything before the decoder (shared by the forward and the generation engine's prefill).
        encode(kind, pixels, grid) -> features replaces `encode_media` (the engine's vision cache)."""
        input_ids, attention_mask = self._check_text(input_ids, attention_mask)
        if mm_token_type_ids is not None:
            self._check_token_types(mm_token_type_ids, input_ids)
        # Positions first: they also check that the placeholders match the grids, before any scatter.
        computed, rope_deltas = mrope_position_ids(
            self.config, input_ids, attention_mask, image_grid_thw, video_grid_thw, second_per_grid_ts)
        if position_ids is None:
            position_ids = computed
        else:
            position_ids = self._check_positions(position_ids, input_ids)
            rope_deltas = position_ids.max(0)[0].max(-1, keepdim=True)[0] + 1 - input_ids.shape[1]
        embeds = self.language_model.embed(input_ids)
        if pixel_frames is not None and pixel_values is not None:
            raise InputError("give images either as pixel_values or as pixel_frames, not both")
        for pixels, grid, token_id, name in ((pixel_values, image_grid_thw, self.config.image_token_id, "image"),
                                             (pixel_frames, image_grid_thw, self.config.image_token_id, "image"),
                                             (pixel_values_videos, video_grid_thw, self.config.video_token_id, "video")):
            if pixels is None:
                continue
            if grid is None:
                raise InputError(f"{name} pixel values were given without {name}_grid_thw")
            kind = "frames" if pixels is pixel_frames else name
            features = (encode or self.encode_media)(kind, pixels, grid).to(embeds.dtype)
            slots = (input_ids == token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(slots, features)
        return input_ids, attention_mask, embeds, position_ids, rope_deltas

    def encode_media(self, kind: str, pixels, grid) -> torch.Tensor:
        """The vision tower's merged features of `kind` "image" / "video" patches or "frames" (uint8 images)."""
        if kind == "frames":
            return self.visual.from_frames(list(pixels), grid)
        return self.visual(torch.as_tensor(pixels), grid)

    def _check_token_types(self, types, input_ids):
        types = torch.as_tensor(types).to(self.device)
        expected = ((input_ids == self.config.image_token_id).long()
                    + 2 * (input_ids == self.config.video_token_id).long())
        if types.shape != input_ids.shape or bool((types.long() != expected).any()):
            raise InputError("mm_token_type_ids disagree with the <|image_pad|>/<|video_pad|> tokens of input_ids "
                             "(expected 1 on image pads, 2 on video pads, 0 elsewhere)")

    def _check_positions(self, position_ids, input_ids):
        position_ids = torch.as_tensor(position_ids).to(self.device, torch.long)
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        if position_ids.shape != (3, *input_ids.shape):
            raise InputError(f"position_ids shape {tuple(position_ids.shape)} must be (3, B, L) or (B, L) for "
                             f"input_ids of shape {tuple(input_ids.shape)}")
        return position_ids

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
