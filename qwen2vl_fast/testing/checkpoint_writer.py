"""Random-weight checkpoints in the Hugging Face format, at the released models' shapes.

No weights can be downloaded where this project is tested, and speed does not depend on the weights'
values, so tests and benchmarks stand in for real checkpoints with these: `config.json` in the hub layout,
safetensors shards with `model.safetensors.index.json`, a small Qwen-style tokenizer with the special tokens
at their real ids, and `preprocessor_config.json`. transformers loads the directory as it loads the real one.

Values: matrices ~ N(0, 0.02) (the models' initializer_range), biases ~ N(0, 0.02), norm weights ~ 1 + N(0, 0.02).
Each tensor draws from its own generator seeded from (seed, name), so a tensor's values do not depend on the
shard size or on which other tensors are written. Tensors are generated and written shard by shard, so a
72B checkpoint needs disk, not memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import parse_config
from ..layout import hub_tensor_shapes
from ..presets import preset_config

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NEW_KEY_PREFIXES = (("visual.", "model.visual."), ("model.", "model.language_model."))


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def random_tensor(name: str, shape: tuple, dtype: torch.dtype, seed: int, std: float = 0.02) -> torch.Tensor:
    gen = torch.Generator().manual_seed(tensor_seed(seed, name))
    t = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(std)
    if ("norm" in name or "ln_q" in name) and name.endswith(".weight"):
        t.add_(1.0)
    return t.to(dtype)


def write_random_checkpoint(out_dir, preset: str = "tiny-qwen2-vl", *, config: dict | None = None,
                            dtype: torch.dtype = torch.bfloat16, seed: int = 0, max_shard_bytes: int = 2 << 30,
                            key_scheme: str = "hub", store_tied_lm_head: bool = False, tokenizer: bool = True,
                            std: float = 0.02) -> Path:
    """Write a random-weight checkpoint for `preset` (or an explicit config.json dict) into `out_dir`.

    key_scheme: "hub" (`visual.*`, `model.*`, as released) or "transformers" (`model.visual.*`,
    `model.language_model.*`, as transformers >= 4.52 saves). store_tied_lm_head: also store `lm_head.weight`
    for a tied model (some exports do). Returns the directory.
    """
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES.values())}, got {dtype}")
    if key_scheme not in ("hub", "transformers"):
        raise ValueError(f"key_scheme must be 'hub' or 'transformers', got {key_scheme!r}")
    raw = config if config is not None else preset_config(preset)
    raw = {**raw, "torch_dtype": _DTYPE_NAMES[dtype]}
    cfg = parse_config(raw)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shapes = hub_tensor_shapes(cfg, include_lm_head=True if store_tied_lm_head else None)
    shards = _plan_shards(shapes, dtype, max_shard_bytes)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            stored = _rename(name) if key_scheme == "transformers" else name
            # a stored tied head holds the embedding's values (drawn from the embedding's seed)
            source = "model.embed_tokens.weight" if (name == "lm_head.weight" and cfg.text.tie_word_embeddings) else name
            t = random_tensor(source, shapes[name], dtype, seed, std)
            tensors[stored] = t
            weight_map[stored] = file
            total += t.numel() * t.element_size()
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
         "do_sample": False}, indent=2))
    if tokenizer:
        from .tokenizer import write_preprocessor_config, write_tokenizer

        write_tokenizer(out, model_type=cfg.model_type)
        write_preprocessor_config(out)
    return out


def _rename(name: str) -> str:
    for old, new in _NEW_KEY_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _plan_shards(shapes: dict, dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    """Group tensors, in order, into shards of at most max_shard_bytes (a larger tensor gets its own)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        n = itemsize
        for s in shape:
            n *= s
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current:
        shards.append(current)
    return shards


def checkpoint_bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def default_cache_dir() -> Path:
    return Path(os.environ.get("QWEN2VL_FAST_CACHE", Path.home() / ".cache" / "qwen2vl_fast"))
