"""qwen2vl_fast.config: every preset agrees with transformers' own config classes, the three config.json layouts
(hub flat, transformers-4.57 nested, transformers-5 `rope_parameters`) parse to the same ModelConfig, the sparse
official vision sub-configs get transformers' defaults, and every bad input is refused with a ConfigError that
says what is wrong (REFERENCE.md §1-3, §6)."""

from __future__ import annotations

import copy
import json

import pytest
import transformers

from qwen2vl_fast.config import ModelConfig, load_config, parse_config
from qwen2vl_fast.errors import ConfigError, Qwen2VLFastError
from qwen2vl_fast.presets import PRESETS, preset_config

V4_ONLY = pytest.mark.skipif(int(transformers.__version__.split(".")[0]) >= 5, reason="compares with transformers 4 internals; transformers 5 renamed them (end-to-end parity covers it)")

ALL_PRESETS = tuple(PRESETS)
TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
              "bos_token_id", "eos_token_id")
# Keys a transformers-5 save keeps under text_config (no flat copies at the top level).
TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "use_cache",
             "use_sliding_window", "sliding_window", "max_window_layers", "attention_dropout",
             "initializer_range", "bos_token_id", "eos_token_id")


# ---------------------------------------------------------------------------------------------------- helpers
def hf_config(raw: dict):
    cls = transformers.Qwen2VLConfig if raw["model_type"] == "qwen2_vl" else transformers.Qwen2_5_VLConfig
    return cls(**copy.deepcopy(raw))


def t457_layout(raw: dict) -> dict:
    """What transformers 4.57 `save_pretrained` writes: nested text_config (plus some flat copies)."""
    return json.loads(hf_config(raw).to_json_string())


def t457_nested_only(raw: dict) -> dict:
    """The 4.57 layout with every flat copy of a text key removed: only text_config says it."""
    d = t457_layout(raw)
    for key in list(d["text_config"]) + ["rope_scaling", "rope_theta"]:
        if key != "model_type":
            d.pop(key, None)
    return d


def t5_layout(raw: dict, tie_in: str) -> dict:
    """A transformers-5 style config.json built by hand: text keys only under text_config, RoPE in
    `rope_parameters` (which carries rope_theta), tie_word_embeddings at the top level or in text_config."""
    text = {k: raw[k] for k in TEXT_KEYS if k in raw}
    text["model_type"] = raw["model_type"] + "_text"
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": list(raw["rope_scaling"]["mrope_section"]),
                               "rope_theta": raw["rope_theta"]}
    out = {"architectures": raw["architectures"], "model_type": raw["model_type"], "dtype": "bfloat16",
           "transformers_version": "5.0.0", "text_config": text, "vision_config": copy.deepcopy(raw["vision_config"])}
    for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        out[k] = raw[k]
    (out if tie_in == "top" else text)["tie_word_embeddings"] = raw["tie_word_embeddings"]
    return out


def with_changes(name: str, vision=None, **top) -> dict:
    """A preset's hub dict with top-level keys replaced (None deletes) and vision_config keys merged in."""
    raw = preset_config(name)
    for k, v in top.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    if vision:
        raw["vision_config"].update(vision)
    return raw


def t5_with_rope(rope_parameters: dict, name: str = "qwen2.5-vl-7b") -> dict:
    raw = t5_layout(preset_config(name), "top")
    raw["text_config"]["rope_parameters"] = rope_parameters
    return raw


def assert_same(a: ModelConfig, b: ModelConfig):
    assert a.text == b.text
    assert a.vision == b.vision
    assert a == b  # token ids, model_type, dtype too (raw is excluded from equality)


# ----------------------------------------------------------------------------- agreement with transformers
@V4_ONLY
@pytest.mark.parametrize("name", ALL_PRESETS)
def test_preset_agrees_with_transformers(name):
    raw = preset_config(name)
    cfg, hf = parse_config(raw), hf_config(raw)
    ht, hv, t, v = hf.text_config, hf.vision_config, cfg.text, cfg.vision

    assert cfg.model_type == hf.model_type
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers) == \
           (ht.vocab_size, ht.hidden_size, ht.intermediate_size, ht.num_hidden_layers)
    assert (t.num_attention_heads, t.num_key_value_heads) == (ht.num_attention_heads, ht.num_key_value_heads)
    assert t.rms_norm_eps == ht.rms_norm_eps
    assert t.rope_theta == ht.rope_theta
    assert list(t.mrope_section) == ht.rope_scaling["mrope_section"]
    assert t.max_position_embeddings == ht.max_position_embeddings
    assert t.tie_word_embeddings == ht.tie_word_embeddings
    assert t.hidden_act == ht.hidden_act
    assert t.head_dim == ht.hidden_size // ht.num_attention_heads

    assert v.depth == hv.depth and v.num_heads == hv.num_heads and v.hidden_act == hv.hidden_act
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.in_channels) == \
           (hv.patch_size, hv.temporal_patch_size, hv.spatial_merge_size, hv.in_channels)
    if cfg.model_type == "qwen2_vl":
        assert v.embed_dim == hv.embed_dim
        assert v.mlp_hidden_size == int(hv.embed_dim * hv.mlp_ratio)
        assert v.out_hidden_size == hv.hidden_size
    else:
        assert v.embed_dim == hv.hidden_size
        assert v.mlp_hidden_size == hv.intermediate_size
        assert v.out_hidden_size == hv.out_hidden_size
        assert v.window_size == hv.window_size
        assert list(v.fullatt_block_indexes) == list(hv.fullatt_block_indexes)
        assert v.tokens_per_second == hv.tokens_per_second
    assert v.out_hidden_size == t.hidden_size

    for key in TOKEN_KEYS:
        assert getattr(cfg, key) == getattr(hf, key), key


# ---------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("name", ALL_PRESETS)
@pytest.mark.parametrize("layout", ["t457", "t457-nested-only", "t5-tie-top", "t5-tie-text"])
def test_layouts_parse_identically(name, layout):
    raw = preset_config(name)
    other = {"t457": t457_layout, "t457-nested-only": t457_nested_only,
             "t5-tie-top": lambda r: t5_layout(r, "top"), "t5-tie-text": lambda r: t5_layout(r, "text")}[layout](raw)
    if layout != "t457":
        # Nothing text-related may be left at the top level for the parser to fall back on.
        assert "hidden_size" not in other and "rope_scaling" not in other and "rope_theta" not in other
    assert_same(parse_config(other), parse_config(raw))


def test_t5_layout_rope_theta_comes_from_rope_parameters():
    raw = t5_with_rope({"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 5e5}, "tiny-qwen2-vl")
    assert parse_config(raw).text.rope_theta == 5e5


@V4_ONLY
def test_t457_layout_tie_only_in_text_config():
    """4.57 writes tie_word_embeddings=true only inside text_config for the 2B (a tied model)."""
    d = t457_layout(preset_config("qwen2-vl-2b"))
    assert d["text_config"]["tie_word_embeddings"] is True and "tie_word_embeddings" not in d
    assert parse_config(d).text.tie_word_embeddings is True


# ------------------------------------------------------------------------------- sparse official configs
def test_sparse_qwen2_vl_vision_gets_defaults():
    raw = with_changes("qwen2-vl-2b", vision_config={"in_chans": 3, "model_type": "qwen2_vl",
                                                     "spatial_patch_size": 14, "hidden_size": 1536})
    v = parse_config(raw).vision
    assert (v.depth, v.embed_dim, v.num_heads, v.mlp_hidden_size) == (32, 1280, 16, 5120)
    assert (v.hidden_act, v.out_hidden_size, v.head_dim) == ("quick_gelu", 1536, 80)
    assert (v.in_channels, v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.patch_dim) == \
           (3, 14, 2, 2, 1176)


def test_sparse_qwen2_5_vl_vision_gets_defaults():
    raw = with_changes("qwen2.5-vl-7b", vision_config={"hidden_size": 1280, "in_chans": 3, "model_type": "qwen2_5_vl",
                                                       "spatial_patch_size": 14, "tokens_per_second": 2})
    v = parse_config(raw).vision
    assert (v.depth, v.embed_dim, v.num_heads, v.mlp_hidden_size, v.hidden_act) == (32, 1280, 16, 3420, "silu")
    assert (v.window_size, v.window_units, v.fullatt_block_indexes) == (112, 4, (7, 15, 23, 31))
    assert v.out_hidden_size == 3584  # not in the file: the code default
    assert v.tokens_per_second == 2.0 and isinstance(v.tokens_per_second, float)  # the file's 2, not the code's 4


def test_tokens_per_second_code_default_when_absent():
    raw = preset_config("qwen2.5-vl-7b")
    del raw["vision_config"]["tokens_per_second"]
    assert parse_config(raw).vision.tokens_per_second == hf_config(raw).vision_config.tokens_per_second == 4


@pytest.mark.parametrize("name", ["qwen2-vl-7b", "qwen2.5-vl-7b"])
def test_rms_norm_eps_from_file_else_code_default(name):
    assert parse_config(preset_config(name)).text.rms_norm_eps == 1e-6
    raw = with_changes(name, rms_norm_eps=None)
    assert parse_config(raw).text.rms_norm_eps == 1e-5 == hf_config(raw).text_config.rms_norm_eps


def test_mrope_type_rewritten_by_transformers_is_accepted():
    for rope in ({"type": "mrope", "mrope_section": [2, 3, 3]}, {"rope_type": "default", "mrope_section": [2, 3, 3]},
                 {"type": "default", "rope_type": "default", "mrope_section": [2, 3, 3]}):
        assert parse_config(with_changes("tiny-qwen2-vl", rope_scaling=rope)).text.mrope_section == (2, 3, 3)


# ----------------------------------------------------------------------------------------------- errors
BAD_CONFIGS = {
    "unknown model_type": (lambda: with_changes("qwen2-vl-7b", model_type="llava"), r"model_type 'llava'"),
    "missing model_type": (lambda: with_changes("qwen2-vl-7b", model_type=None), r"model_type None"),
    "hidden % heads": (lambda: with_changes("tiny-qwen2-vl", hidden_size=66, vision={"hidden_size": 66}),
                       r"hidden_size 66 is not divisible by num_attention_heads 4"),
    "heads % kv heads": (lambda: with_changes("qwen2-vl-7b", num_key_value_heads=3),
                         r"num_attention_heads 28 is not a multiple of num_key_value_heads 3"),
    "mrope sum": (lambda: with_changes("qwen2-vl-7b", rope_scaling={"type": "mrope", "mrope_section": [16, 24, 16]}),
                  r"mrope_section \[16, 24, 16\].*64"),
    "mrope parts": (lambda: with_changes("tiny-qwen2-vl", rope_scaling={"type": "mrope", "mrope_section": [4, 4]}),
                    r"mrope_section \[4, 4\]"),
    "qwen2 merger width": (lambda: with_changes("qwen2-vl-2b", vision={"hidden_size": 3584}),
                           r"merger output 3584 \(vision_config hidden_size\).*hidden_size 1536"),
    "qwen2.5 merger width": (lambda: with_changes("qwen2.5-vl-3b", vision={"out_hidden_size": 3584}),
                             r"merger output 3584 \(vision_config out_hidden_size\).*hidden_size 2048"),
    "qwen2 sparse vision, 72b text": (lambda: with_changes("qwen2-vl-72b", vision_config={"in_chans": 3}),
                                      r"merger output 3584.*8192"),
    "float size": (lambda: with_changes("qwen2-vl-7b", intermediate_size=18944.5),
                   r"intermediate_size must be an integer, got 18944.5"),
    "string size": (lambda: with_changes("qwen2-vl-7b", num_hidden_layers="28"),
                    r"num_hidden_layers must be an integer, got '28'"),
    "bool size": (lambda: with_changes("qwen2-vl-7b", num_key_value_heads=True), r"num_key_value_heads"),
    "float vision size": (lambda: with_changes("qwen2.5-vl-7b", vision={"depth": 31.5}),
                          r"vision_config.depth must be an integer, got 31.5"),
    "yarn": (lambda: with_changes("qwen2.5-vl-7b", rope_scaling={"type": "yarn", "factor": 4.0,
                                                                  "mrope_section": [16, 24, 24]}),
             r"unsupported rope type 'yarn'"),
    "t5 yarn": (lambda: t5_with_rope({"rope_type": "yarn", "factor": 4.0, "mrope_section": [16, 24, 24],
                                      "rope_theta": 1e6}), r"unsupported rope type 'yarn'"),
    "fullatt index too big": (lambda: with_changes("qwen2.5-vl-7b", vision={"fullatt_block_indexes": [7, 15, 23, 32]}),
                              r"fullatt_block_indexes \[32\] lie outside the 32 vision blocks"),
    "fullatt index negative": (lambda: with_changes("tiny-qwen2.5-vl", vision={"fullatt_block_indexes": [-1, 3]}),
                               r"fullatt_block_indexes \[-1\]"),
    "zero heads": (lambda: with_changes("tiny-qwen2-vl", num_attention_heads=0),
                   r"num_attention_heads must be positive"),
    "vision act": (lambda: with_changes("qwen2-vl-7b", vision={"hidden_act": "silu"}), r"vision hidden_act 'silu'"),
    "token id outside vocab": (lambda: with_changes("tiny-qwen2-vl", vocab_size=1000), r"special token ids"),
    "text_config not an object": (lambda: with_changes("tiny-qwen2-vl", text_config=[1]), r"text_config"),
    "rope_scaling not an object": (lambda: with_changes("tiny-qwen2-vl", rope_scaling=[2, 3, 3]), r"rope_scaling"),
    # Malformed values must still come back as ConfigError (not TypeError/ValueError from deep inside).
    "string token id": (lambda: with_changes("tiny-qwen2-vl", image_token_id="151655"), r"image_token_id"),
    "non-numeric eps": (lambda: with_changes("tiny-qwen2-vl", rms_norm_eps="1e-6x"), r"rms_norm_eps"),
    "non-numeric theta": (lambda: with_changes("tiny-qwen2-vl", rope_theta="big"), r"rope_theta"),
    "non-numeric tokens_per_second": (lambda: with_changes("tiny-qwen2.5-vl", vision={"tokens_per_second": "two"}),
                                      r"tokens_per_second"),
    "non-numeric mlp_ratio": (lambda: with_changes("tiny-qwen2-vl", vision={"mlp_ratio": "4"}), r"mlp_ratio"),
    "mrope_section not a list": (lambda: with_changes("tiny-qwen2-vl", rope_scaling={"type": "mrope",
                                                                                     "mrope_section": 8}),
                                 r"mrope_section"),
    "mrope_section strings": (lambda: with_changes("tiny-qwen2-vl", rope_scaling={"type": "mrope",
                                                                                  "mrope_section": ["a", 3, 3]}),
                              r"mrope_section"),
    "fullatt not ints": (lambda: with_changes("tiny-qwen2.5-vl", vision={"fullatt_block_indexes": ["x"]}),
                         r"fullatt_block_indexes"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_refused(case):
    make, message = BAD_CONFIGS[case]
    with pytest.raises(ConfigError, match=message) as exc:
        parse_config(make())
    assert isinstance(exc.value, Qwen2VLFastError) and isinstance(exc.value, ValueError)


def test_null_token_id_falls_back_to_default():
    """A null (as a transformers-5 save may write for unset ids) means 'not given', like every other key."""
    cfg = parse_config(with_changes("tiny-qwen2-vl", image_token_id=None) | {"video_token_id": None})
    assert (cfg.image_token_id, cfg.video_token_id) == (151655, 151656)


def test_parse_config_refuses_non_object():
    with pytest.raises(ConfigError, match="object"):
        parse_config([preset_config("tiny-qwen2-vl")])


# ------------------------------------------------------------------------------------------ load_config
def test_load_config_from_dir_and_file(tmp_path):
    raw = preset_config("qwen2.5-vl-3b")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert_same(load_config(tmp_path), parse_config(raw))
    assert_same(load_config(tmp_path / "config.json"), parse_config(raw))
    assert_same(ModelConfig.from_pretrained(str(tmp_path)), parse_config(raw))


def _load_error(path) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert isinstance(exc.value, Qwen2VLFastError)
    return str(exc.value)


def test_load_config_missing(tmp_path):
    assert str(tmp_path / "nope.json") in _load_error(tmp_path / "nope.json")
    assert str(tmp_path / "config.json") in _load_error(tmp_path)  # a directory without config.json


@pytest.mark.parametrize("text, words", [
    ('{"model_type": "qwen2_vl",', "JSON"),
    ("", "JSON"),
    ("[1, 2, 3]", "list"),
    ('"qwen2_vl"', "str"),
    ("\udcff".encode("utf-8", "surrogateescape").decode("latin-1"), "JSON"),
])
def test_load_config_unreadable(tmp_path, text, words):
    file = tmp_path / "config.json"
    file.write_text(text, encoding="latin-1")
    message = _load_error(file)
    assert str(file) in message and words in message


def test_load_config_names_file_for_inconsistent_config(tmp_path):
    file = tmp_path / "config.json"
    file.write_text(json.dumps(with_changes("qwen2-vl-7b", num_key_value_heads=3)))
    message = _load_error(tmp_path)
    assert str(file) in message and "num_key_value_heads 3" in message
