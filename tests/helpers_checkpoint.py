"""Writers of tiny hub-format safetensors checkpoints for the loader tests."""

from __future__ import annotations

import functools
import json
import os

import torch
from safetensors.torch import save_file

from qwen2vl_fast import layout
from qwen2vl_fast.config import ModelConfig, parse_config
from qwen2vl_fast.presets import preset_config


def tiny_config(preset: str = "tiny-qwen2-vl", **top_level) -> ModelConfig:
    """A tiny preset's config, with top-level config.json keys overridden (e.g. tie_word_embeddings)."""
    raw = preset_config(preset)
    raw.update(top_level)
    return parse_config(raw)


def random_hub_tensors(cfg: ModelConfig, dtype=torch.bfloat16, include_lm_head=None, seed=0) -> dict:
    """Every hub tensor of `cfg` (layout.hub_tensor_shapes) filled with random values.

    A fresh dict each call over cached tensors (the real 151936-row vocabulary makes generation the slow
    part): replace entries freely, but do not modify the tensors in place.
    """
    return dict(_random_hub_tensors(cfg, dtype, include_lm_head, seed))


@functools.lru_cache(maxsize=16)
def _random_hub_tensors(cfg, dtype, include_lm_head, seed) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = layout.hub_tensor_shapes(cfg, include_lm_head=include_lm_head)
    return {name: torch.randn(shape, generator=g).to(dtype) for name, shape in shapes.items()}


def to_new_scheme(tensors: dict) -> dict:
    """Rename hub keys to the transformers >= 4.52 scheme (model.visual.*, model.language_model.*)."""
    def rename(name):
        if name.startswith("visual."):
            return "model." + name
        if name.startswith("model."):
            return "model.language_model." + name[len("model."):]
        return name
    return {rename(n): t for n, t in tensors.items()}


def write_checkpoint(path, tensors: dict, shards: int = 1, config: ModelConfig | None = None) -> str:
    """Write `tensors` as `model.safetensors`, or as `shards` files plus `model.safetensors.index.json`.

    Shards take consecutive runs of names, so some fusion groups (q/k/v, gate/up) straddle two files.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if config is not None:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config.raw, f)
    tensors = {n: t.contiguous() for n, t in tensors.items()}
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return path
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = names[i * per:(i + 1) * per]
        save_file({n: tensors[n] for n in chunk}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return path
