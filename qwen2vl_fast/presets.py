"""Model presets: the released checkpoints' shapes (REFERENCE.md §3, §6) and tiny ones for tests.

Each preset is a `config.json` dict in the hub's original (transformers 4, flat) layout, the one the official
checkpoints ship, so transformers and qwen2vl_fast both read what the writer produces. Real presets keep the
official sparse vision sub-configs on purpose: the defaults must come from our config parser, as they do for
the released files. The tiny presets keep the real vocabulary size so the Qwen special tokens keep their real ids.
"""

from __future__ import annotations

import copy

from .errors import ConfigError

_TOKENS = dict(
    bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652, vision_end_token_id=151653,
    vision_token_id=151654, image_token_id=151655, video_token_id=151656,
)


def _text(hidden, layers, heads, kv_heads, intermediate, vocab, tie, max_pos, mrope=(16, 24, 24)):
    return dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=intermediate, vocab_size=vocab, tie_word_embeddings=tie,
        max_position_embeddings=max_pos, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0,
        rope_scaling={"type": "mrope", "mrope_section": list(mrope)}, sliding_window=32768,
        max_window_layers=layers, use_sliding_window=False, attention_dropout=0.0, initializer_range=0.02,
        use_cache=True, torch_dtype="bfloat16",
    )


def _qwen2_vl(text, vision_extra):
    return dict(architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl", **_TOKENS, **text,
                vision_config={"in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14, **vision_extra})


def _qwen2_5_vl(text, vision_extra):
    return dict(architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl", **_TOKENS, **text,
                vision_config={"in_chans": 3, "model_type": "qwen2_5_vl", "spatial_patch_size": 14,
                               "tokens_per_second": 2, **vision_extra})


# Tiny vision towers: 2 Qwen2-VL blocks; 4 Qwen2.5-VL blocks with full attention in blocks 1 and 3, so both
# the windowed and the full-attention path run. Head dims stay multiples of 4 (the 2D rotary splits halves).
_TINY_QWEN2_VISION = dict(depth=2, embed_dim=64, num_heads=4, mlp_ratio=2, hidden_act="quick_gelu",
                          patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
_TINY_QWEN2_5_VISION = dict(depth=4, hidden_size=64, num_heads=4, intermediate_size=88, hidden_act="silu",
                            patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3,
                            window_size=112, fullatt_block_indexes=[1, 3])

PRESETS: dict[str, dict] = {
    "qwen2-vl-2b": _qwen2_vl(_text(1536, 28, 12, 2, 8960, 151936, True, 32768), {"hidden_size": 1536}),
    "qwen2-vl-7b": _qwen2_vl(_text(3584, 28, 28, 4, 18944, 152064, False, 32768), {}),
    "qwen2-vl-72b": _qwen2_vl(_text(8192, 80, 64, 8, 29568, 152064, False, 32768), {"hidden_size": 8192}),
    "qwen2.5-vl-3b": _qwen2_5_vl(_text(2048, 36, 16, 2, 11008, 151936, True, 128000),
                                 {"hidden_size": 1280, "out_hidden_size": 2048}),
    "qwen2.5-vl-7b": _qwen2_5_vl(_text(3584, 28, 28, 4, 18944, 152064, False, 128000), {"hidden_size": 1280}),
    "qwen2.5-vl-72b": _qwen2_5_vl(_text(8192, 80, 64, 8, 29568, 152064, False, 128000),
                                  {"hidden_size": 1280, "out_hidden_size": 8192}),
    # Tiny presets for tests: real vocabulary and token ids, GQA (4 query heads over 2 kv heads), head_dim 16
    # with mrope_section [2, 3, 3] (sums to head_dim/2 as [16, 24, 24] does for 128).
    "tiny-qwen2-vl": _qwen2_vl(_text(64, 2, 4, 2, 96, 151936, True, 32768, mrope=(2, 3, 3)),
                               {**_TINY_QWEN2_VISION, "hidden_size": 64}),
    "tiny-qwen2.5-vl": _qwen2_5_vl(_text(64, 2, 4, 2, 96, 151936, False, 128000, mrope=(2, 3, 3)),
                                   {**_TINY_QWEN2_5_VISION, "out_hidden_size": 64}),
}

REAL_PRESETS = tuple(name for name in PRESETS if not name.startswith("tiny-"))
TINY_PRESETS = tuple(name for name in PRESETS if name.startswith("tiny-"))


def preset_config(name: str) -> dict:
    """A fresh copy of a preset's config.json dict."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
