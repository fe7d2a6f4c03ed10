"""One validated config for Qwen2-VL and Qwen2.5-VL, read from a checkpoint's `config.json`.

Three layouts exist in the wild and all are accepted:
- the hub's original (transformers 4) layout: text keys flat at the top level, `rope_scaling`;
- transformers >= 4.52 saves: the same keys nested under `text_config`, still `rope_scaling`;
- transformers 5: `text_config` with `rope_parameters` (which also carries `rope_theta`).
A key is looked up in `text_config` first, then at the top level, then falls back to the code default.

The official configs are sparse (REFERENCE.md §6): the Qwen2-VL vision sub-config is often only
`{"in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14}`, so every missing vision key is filled
with the transformers defaults. `rms_norm_eps`, `tokens_per_second` and `tie_word_embeddings` are read from
the file because their code defaults (1e-5, 4, False) differ from the released checkpoints (1e-6, 2, ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ConfigError

QWEN2_VL = "qwen2_vl"
QWEN2_5_VL = "qwen2_5_vl"
MODEL_TYPES = (QWEN2_VL, QWEN2_5_VL)

# transformers' config-class defaults: what a key means when the file leaves it out.
_TEXT_DEFAULTS = dict(
    vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
    num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1000000.0,
    max_position_embeddings=32768, hidden_act="silu",
)
_QWEN2_VL_VISION_DEFAULTS = dict(
    depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu", mlp_ratio=4, num_heads=16,
    in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
)
_QWEN2_5_VL_VISION_DEFAULTS = dict(
    depth=32, hidden_size=1280, hidden_act="silu", intermediate_size=3420, num_heads=16, in_channels=3,
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=4, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=3584,
)
_TOKEN_DEFAULTS = dict(
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    bos_token_id=151643, eos_token_id=151645,
)


@dataclass(frozen=True)
class VisionConfig:
    """The ViT and its 2x2 merger. `embed_dim` is the ViT width (1280); `out_hidden_size` the merger's output."""

    family: str
    depth: int
    embed_dim: int
    num_heads: int
    mlp_hidden_size: int  # Qwen2-VL: embed_dim * mlp_ratio (fc1); Qwen2.5-VL: intermediate_size (gate/up)
    hidden_act: str
    out_hidden_size: int
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # Qwen2.5-VL only
    fullatt_block_indexes: tuple = ()  # Qwen2.5-VL only; Qwen2-VL attends per frame in every block
    tokens_per_second: float = 4.0  # Qwen2.5-VL only: video time scale of the M-RoPE T axis
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch, `C * t * p * p` = 1176: the K of the patch-embed GEMM."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    @property
    def merger_hidden_size(self) -> int:
        return self.embed_dim * self.merge_unit

    @property
    def uses_windows(self) -> bool:
        return self.family == QWEN2_5_VL

    @property
    def window_units(self) -> int:
        """Window side in merged units (112 // 2 // 14 = 4, i.e. 8x8 patches = 64 tokens)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def qkv_out_features(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vision: VisionConfig
    text: TextConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: Any = 151645
    torch_dtype: Optional[str] = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def family(self) -> str:
        return self.model_type

    def __post_init__(self):
        _validate(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return parse_config(d)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        return load_config(path)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ConfigError(f"no config.json found at {file!r}")
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: not a readable JSON config ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a JSON object at the top level, got {type(raw).__name__}")
    try:
        return parse_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def parse_config(raw: dict) -> ModelConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a JSON object (dict), got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"unsupported model_type {model_type!r}: qwen2vl_fast runs {', '.join(MODEL_TYPES)} checkpoints"
        )
    text_raw = raw.get("text_config") or {}
    vision_raw = raw.get("vision_config") or {}
    if not isinstance(text_raw, dict) or not isinstance(vision_raw, dict):
        raise ConfigError("text_config and vision_config must be JSON objects")

    def text_key(name, default=None):
        if name in text_raw and text_raw[name] is not None:
            return text_raw[name]
        if name in raw and raw[name] is not None:
            return raw[name]
        return _TEXT_DEFAULTS.get(name, default)

    text = _parse_text(raw, text_raw, text_key)
    vision = _parse_vision(model_type, vision_raw, raw, text.hidden_size)
    # A null id means "not given", as for every other key: fall back to the text config, then the default.
    tokens = {k: next((x for x in (raw.get(k), text_raw.get(k)) if x is not None), v)
              for k, v in _TOKEN_DEFAULTS.items()}
    for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        tokens[k] = _int(tokens[k], k)
    dtype = raw.get("torch_dtype", raw.get("dtype", text_raw.get("torch_dtype", text_raw.get("dtype"))))
    return ModelConfig(model_type=model_type, vision=vision, text=text, torch_dtype=dtype, raw=raw, **tokens)


def _parse_text(raw: dict, text_raw: dict, text_key) -> TextConfig:
    rope = text_raw.get("rope_parameters") or raw.get("rope_parameters") \
        or text_raw.get("rope_scaling") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"rope_scaling / rope_parameters must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("mrope", "default"):
        raise ConfigError(f"unsupported rope type {rope_type!r}: only M-RoPE ('mrope'/'default') is implemented")
    theta = rope.get("rope_theta", text_key("rope_theta"))
    section = rope.get("mrope_section", (16, 24, 24))
    if not isinstance(section, (list, tuple)):
        raise ConfigError(f"mrope_section must be a list of 3 integers, got {section!r}")
    section = tuple(_int(s, "mrope_section") for s in section)
    num_heads = _int(text_key("num_attention_heads"), "num_attention_heads")
    kv_heads = text_key("num_key_value_heads")
    tie = bool(raw.get("tie_word_embeddings", False)) or bool(text_raw.get("tie_word_embeddings", False))
    return TextConfig(
        vocab_size=_int(text_key("vocab_size"), "vocab_size"),
        hidden_size=_int(text_key("hidden_size"), "hidden_size"),
        intermediate_size=_int(text_key("intermediate_size"), "intermediate_size"),
        num_hidden_layers=_int(text_key("num_hidden_layers"), "num_hidden_layers"),
        num_attention_heads=num_heads,
        num_key_value_heads=_int(kv_heads if kv_heads is not None else num_heads, "num_key_value_heads"),
        rms_norm_eps=_float(text_key("rms_norm_eps"), "rms_norm_eps"),
        rope_theta=_float(theta, "rope_theta"),
        mrope_section=section,
        max_position_embeddings=_int(text_key("max_position_embeddings"), "max_position_embeddings"),
        tie_word_embeddings=tie,
        hidden_act=str(text_key("hidden_act")),
    )


def _parse_vision(model_type: str, v: dict, raw: dict, text_hidden: int) -> VisionConfig:
    in_channels = _int(v.get("in_channels", v.get("in_chans", 3)), "vision_config.in_channels")
    patch = _int(v.get("patch_size", v.get("spatial_patch_size", 14)), "vision_config.patch_size")
    if model_type == QWEN2_VL:
        d = {**_QWEN2_VL_VISION_DEFAULTS, **{k: x for k, x in v.items() if x is not None}}
        embed_dim = _int(d["embed_dim"], "vision_config.embed_dim")
        return VisionConfig(
            family=QWEN2_VL, depth=_int(d["depth"], "vision_config.depth"), embed_dim=embed_dim,
            num_heads=_int(d["num_heads"], "vision_config.num_heads"),
            mlp_hidden_size=int(embed_dim * _float(d["mlp_ratio"], "vision_config.mlp_ratio")),
            hidden_act=str(d["hidden_act"]),
            # The merger writes into the LLM: its width is vision_config.hidden_size (defaults to 3584).
            out_hidden_size=_int(d["hidden_size"], "vision_config.hidden_size"),
            in_channels=in_channels, patch_size=patch,
            temporal_patch_size=_int(d["temporal_patch_size"], "vision_config.temporal_patch_size"),
            spatial_merge_size=_int(d["spatial_merge_size"], "vision_config.spatial_merge_size"),
        )
    d = {**_QWEN2_5_VL_VISION_DEFAULTS, **{k: x for k, x in v.items() if x is not None}}
    tps = next((x for x in (v.get("tokens_per_second"), raw.get("tokens_per_second")) if x is not None),
               d["tokens_per_second"])
    fullatt = d["fullatt_block_indexes"]
    if not isinstance(fullatt, (list, tuple)):
        raise ConfigError(f"vision_config.fullatt_block_indexes must be a list of integers, got {fullatt!r}")
    return VisionConfig(
        family=QWEN2_5_VL, depth=_int(d["depth"], "vision_config.depth"),
        embed_dim=_int(d["hidden_size"], "vision_config.hidden_size"),
        num_heads=_int(d["num_heads"], "vision_config.num_heads"),
        mlp_hidden_size=_int(d["intermediate_size"], "vision_config.intermediate_size"),
        hidden_act=str(d["hidden_act"]),
        out_hidden_size=_int(d["out_hidden_size"], "vision_config.out_hidden_size"),
        in_channels=in_channels, patch_size=patch,
        temporal_patch_size=_int(d["temporal_patch_size"], "vision_config.temporal_patch_size"),
        spatial_merge_size=_int(d["spatial_merge_size"], "vision_config.spatial_merge_size"),
        window_size=_int(d["window_size"], "vision_config.window_size"),
        fullatt_block_indexes=tuple(_int(i, "vision_config.fullatt_block_indexes") for i in fullatt),
        tokens_per_second=_float(tps, "vision_config.tokens_per_second"),
    )


def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    return float(value)


_VISION_ACTS = {QWEN2_VL: ("quick_gelu",), QWEN2_5_VL: ("silu",)}


def _validate(cfg: ModelConfig) -> None:
    t, v = cfg.text, cfg.vision
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"text {name} must be positive, got {getattr(t, name)}")
    if t.hidden_size % t.num_attention_heads:
        raise ConfigError(
            f"hidden_size {t.hidden_size} is not divisible by num_attention_heads {t.num_attention_heads}")
    if t.num_attention_heads % t.num_key_value_heads:
        raise ConfigError(f"num_attention_heads {t.num_attention_heads} is not a multiple of "
                          f"num_key_value_heads {t.num_key_value_heads}")
    if v.out_hidden_size != t.hidden_size:  # before mrope_section: an edited hidden_size shows here first
        raise ConfigError(f"vision merger output {v.out_hidden_size} (vision_config "
                          f"{'hidden_size' if v.family == QWEN2_VL else 'out_hidden_size'}) does not match the "
                          f"language model hidden_size {t.hidden_size}")
    if len(t.mrope_section) != 3:
        raise ConfigError(f"mrope_section {list(t.mrope_section)} must have 3 parts (temporal, height, width)")
    if sum(t.mrope_section) != t.head_dim // 2:
        # head_dim is derived, so a mismatch is as likely an edited hidden_size / num_attention_heads
        raise ConfigError(f"head_dim {t.head_dim} (hidden_size {t.hidden_size} / num_attention_heads "
                          f"{t.num_attention_heads}) does not fit mrope_section {list(t.mrope_section)}, which must "
                          f"sum to head_dim/2 = {t.head_dim // 2}: check hidden_size and num_attention_heads, "
                          "then mrope_section")
    if t.head_dim % 2:
        raise ConfigError(f"head_dim {t.head_dim} must be even for rotary embeddings")
    if t.hidden_act != "silu":
        raise ConfigError(f"text hidden_act {t.hidden_act!r} is not supported (Qwen2 uses 'silu')")
    if not t.rms_norm_eps > 0:
        raise ConfigError(f"rms_norm_eps must be positive, got {t.rms_norm_eps}")
    for name in ("depth", "embed_dim", "num_heads", "mlp_hidden_size", "out_hidden_size", "patch_size",
                 "temporal_patch_size", "spatial_merge_size", "in_channels"):
        if getattr(v, name) <= 0:
            raise ConfigError(f"vision {name} must be positive, got {getattr(v, name)}")
    if v.embed_dim % v.num_heads:
        raise ConfigError(f"vision width {v.embed_dim} is not divisible by num_heads {v.num_heads}")
    if v.head_dim % 4:
        raise ConfigError(f"vision head_dim {v.head_dim} must be a multiple of 4 (2D rotary halves)")
    if v.hidden_act not in _VISION_ACTS[v.family]:
        raise ConfigError(f"vision hidden_act {v.hidden_act!r} is not supported for {v.family} "
                          f"(expected {_VISION_ACTS[v.family][0]!r})")
    if v.uses_windows:
        if v.window_units <= 0:
            raise ConfigError(f"window_size {v.window_size} is smaller than one merged unit")
        bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
        if bad:
            raise ConfigError(f"fullatt_block_indexes {bad} lie outside the {v.depth} vision blocks")
    ids = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]
    if any(not 0 <= i < t.vocab_size for i in ids):
        raise ConfigError(f"special token ids {ids} must lie inside the vocabulary (size {t.vocab_size})")
