"""qwen2vl_fast.checkpoint: tiny hub checkpoints -> fused runtime tensors, and every refusal it promises."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from helpers_checkpoint import random_hub_tensors, tiny_config, to_new_scheme, write_checkpoint

from qwen2vl_fast import checkpoint, layout
from qwen2vl_fast.checkpoint import checkpoint_files, load_checkpoint
from qwen2vl_fast.errors import CheckpointError, Qwen2VLFastError

PRESETS = ("tiny-qwen2-vl", "tiny-qwen2.5-vl")


@pytest.fixture(autouse=True)
def _no_unpickling(monkeypatch):
    """The loader must never fall back to pickle-based loading."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called by the safetensors loader")
    monkeypatch.setattr(torch, "load", refuse)


def _expected_fused(cfg, hub: dict, dtype=None) -> dict:
    """The fused layout built the obvious way, from a hub-named dict of tensors."""
    plan = layout.fusion_plan(cfg)
    consumed = {p for parts in plan.values() for p in parts}
    out = {}
    for name, t in hub.items():
        if name in consumed:
            continue
        if name == "visual.patch_embed.proj.weight":
            t = t.reshape(t.shape[0], -1)
        out[layout.RENAMES.get(name, name)] = t
    for fused, parts in plan.items():
        out[fused] = torch.cat([hub[p] for p in parts], dim=0)
    if cfg.text.tie_word_embeddings:
        out["lm_head.weight"] = hub["model.embed_tokens.weight"]
    return {n: (t.to(dtype) if dtype is not None else t) for n, t in out.items()}


def _assert_equal_dicts(got: dict, want: dict):
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


def _header(file: str) -> tuple[int, dict]:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


# ---------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("scheme", ["hub", "transformers>=4.52"])
@pytest.mark.parametrize("preset", PRESETS)
def test_loads_fused_layout(tmp_path, preset, scheme, shards):
    cfg = tiny_config(preset)
    hub = random_hub_tensors(cfg)
    write_checkpoint(tmp_path, hub if scheme == "hub" else to_new_scheme(hub), shards=shards)
    out = load_checkpoint(tmp_path, cfg, progress=False)

    shapes = layout.fused_tensor_shapes(cfg)
    assert list(out) == list(shapes)
    assert {n: tuple(t.shape) for n, t in out.items()} == shapes
    _assert_equal_dicts(out, _expected_fused(cfg, hub))
    # Spot checks of the two transforms, spelled out.
    e = cfg.vision.embed_dim
    assert out["visual.patch_embed.weight"].shape == (e, cfg.vision.patch_dim)
    assert torch.equal(out["visual.patch_embed.weight"][3], hub["visual.patch_embed.proj.weight"][3].flatten())
    p = "model.layers.1.self_attn."
    assert torch.equal(out[p + "qkv_proj.weight"],
                       torch.cat([hub[p + "q_proj.weight"], hub[p + "k_proj.weight"], hub[p + "v_proj.weight"]]))
    assert torch.equal(out["visual.merger.fc2.bias"], hub["visual.merger.mlp.2.bias"])


def test_sharded_groups_straddle_files(tmp_path):
    """The sharded writer splits some fusion groups across two files; the loader must still fuse them."""
    cfg = tiny_config("tiny-qwen2.5-vl")
    write_checkpoint(tmp_path, random_hub_tensors(cfg), shards=7)
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    straddling = [f for f, parts in layout.fusion_plan(cfg).items() if len({weight_map[p] for p in parts}) > 1]
    assert straddling, "test setup: expected a fusion group split across shards"
    assert len(checkpoint_files(tmp_path)) == 7
    load_checkpoint(tmp_path, cfg, progress=False)


def test_shards_without_index(tmp_path):
    cfg = tiny_config("tiny-qwen2-vl")
    hub = random_hub_tensors(cfg)
    write_checkpoint(tmp_path, hub, shards=2)
    os.remove(tmp_path / "model.safetensors.index.json")
    _assert_equal_dicts(load_checkpoint(tmp_path, cfg, progress=False), _expected_fused(cfg, hub))


def test_checkpoint_files_single(tmp_path):
    cfg = tiny_config("tiny-qwen2-vl")
    write_checkpoint(tmp_path, random_hub_tensors(cfg))
    assert checkpoint_files(tmp_path) == [str(tmp_path / "model.safetensors")]


@pytest.mark.parametrize("store_lm_head", [False, True])
@pytest.mark.parametrize("scheme", ["hub", "transformers>=4.52"])
def test_tied_lm_head_is_embed_tokens(tmp_path, store_lm_head, scheme):
    cfg = tiny_config("tiny-qwen2-vl")
    assert cfg.text.tie_word_embeddings
    hub = random_hub_tensors(cfg, include_lm_head=store_lm_head)
    if store_lm_head:  # a stored copy that differs must be ignored, not flagged and not used
        hub["lm_head.weight"] = torch.zeros_like(hub["lm_head.weight"])
    write_checkpoint(tmp_path, hub if scheme == "hub" else to_new_scheme(hub))
    out = load_checkpoint(tmp_path, cfg, progress=False)
    assert out["lm_head.weight"] is out["model.embed_tokens.weight"]
    embed = out["model.embed_tokens.weight"]
    assert out["lm_head.weight"].untyped_storage().data_ptr() == embed.untyped_storage().data_ptr()
    assert torch.equal(out["lm_head.weight"], hub["model.embed_tokens.weight"])


def test_tied_with_dtype_cast_still_shares(tmp_path):
    cfg = tiny_config("tiny-qwen2-vl")
    write_checkpoint(tmp_path, random_hub_tensors(cfg, include_lm_head=True))
    out = load_checkpoint(tmp_path, cfg, dtype=torch.float16, progress=False)
    assert out["lm_head.weight"] is out["model.embed_tokens.weight"]


def test_untied_lm_head_loaded(tmp_path):
    cfg = tiny_config("tiny-qwen2.5-vl")
    assert not cfg.text.tie_word_embeddings
    hub = random_hub_tensors(cfg)
    write_checkpoint(tmp_path, hub)
    out = load_checkpoint(tmp_path, cfg, progress=False)
    assert out["lm_head.weight"] is not out["model.embed_tokens.weight"]
    assert torch.equal(out["lm_head.weight"], hub["lm_head.weight"])


def test_untied_without_lm_head_is_missing(tmp_path):
    cfg = tiny_config("tiny-qwen2.5-vl")
    hub = random_hub_tensors(cfg)
    del hub["lm_head.weight"]
    write_checkpoint(tmp_path, hub)
    with pytest.raises(CheckpointError, match=r"1 missing tensors: lm_head\.weight"):
        load_checkpoint(tmp_path, cfg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bfloat16"])
@pytest.mark.parametrize("preset", PRESETS)
def test_dtype_cast(tmp_path, preset, dtype):
    cfg = tiny_config(preset)
    hub = random_hub_tensors(cfg, dtype=torch.float32)
    write_checkpoint(tmp_path, hub, shards=2)
    out = load_checkpoint(tmp_path, cfg, dtype=dtype, progress=False)
    want_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    _assert_equal_dicts(out, _expected_fused(cfg, hub, dtype=want_dtype))


def test_dtype_none_keeps_stored_dtype(tmp_path):
    cfg = tiny_config("tiny-qwen2-vl")
    write_checkpoint(tmp_path, random_hub_tensors(cfg, dtype=torch.float16))
    out = load_checkpoint(tmp_path, cfg, progress=False)
    assert {t.dtype for t in out.values()} == {torch.float16}


def test_device_argument(tmp_path):
    cfg = tiny_config("tiny-qwen2-vl")
    write_checkpoint(tmp_path, random_hub_tensors(cfg))
    out = load_checkpoint(tmp_path, cfg, device=torch.device("cpu"), progress=False)
    assert all(t.device.type == "cpu" for t in out.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loads_straight_to_cuda(tmp_path):
    cfg = tiny_config("tiny-qwen2.5-vl")
    hub = random_hub_tensors(cfg)
    write_checkpoint(tmp_path, hub, shards=2)
    out = load_checkpoint(tmp_path, cfg, device="cuda", dtype=torch.float16, progress=False)
    assert all(t.device.type == "cuda" for t in out.values())
    want = _expected_fused(cfg, hub, dtype=torch.float16)
    _assert_equal_dicts({n: t.cpu() for n, t in out.items()}, want)


def test_progress_bar(tmp_path, capsys, monkeypatch):
    cfg = tiny_config("tiny-qwen2-vl")
    write_checkpoint(tmp_path, random_hub_tensors(cfg))
    load_checkpoint(tmp_path, cfg)  # progress=None on a small checkpoint: silent
    assert capsys.readouterr().err == ""
    load_checkpoint(tmp_path, cfg, progress=False)
    assert capsys.readouterr().err == ""
    load_checkpoint(tmp_path, cfg, progress=True)
    assert "loading checkpoint" in capsys.readouterr().err
    monkeypatch.setattr(checkpoint, "PROGRESS_MIN_BYTES", 0)  # progress=None above the size threshold
    load_checkpoint(tmp_path, cfg)
    captured = capsys.readouterr()
    assert "loading checkpoint" in captured.err and captured.out == ""


# ----------------------------------------------------------------------------------------------- errors


def _raises(path, cfg, *fragments, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, cfg, progress=False, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert isinstance(info.value, Qwen2VLFastError)
    return message


def test_missing_directory(tmp_path):
    _raises(tmp_path / "nope", tiny_config(), "nope", "does not exist")


def test_empty_directory(tmp_path):
    _raises(tmp_path, tiny_config(), "no safetensors files", str(tmp_path))


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "model.pt"])
def test_pickle_only_directory_is_refused(tmp_path, filename):
    (tmp_path / filename).write_bytes(b"\x80\x04 not really a pickle")
    _raises(tmp_path, tiny_config(), "only safetensors checkpoints are supported", filename)


def test_index_unreadable(tmp_path):
    cfg = tiny_config()
    write_checkpoint(tmp_path, random_hub_tensors(cfg), shards=2)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    _raises(tmp_path, cfg, "model.safetensors.index.json", "unreadable")


def test_index_without_weight_map(tmp_path):
    cfg = tiny_config()
    write_checkpoint(tmp_path, random_hub_tensors(cfg), shards=2)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    _raises(tmp_path, cfg, "model.safetensors.index.json", "weight_map")


def test_missing_shard(tmp_path):
    cfg = tiny_config()
    write_checkpoint(tmp_path, random_hub_tensors(cfg), shards=3)
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    gone = "model-00002-of-00003.safetensors"
    os.remove(tmp_path / gone)
    first = next(n for n, f in weight_map.items() if f == gone)
    _raises(tmp_path, cfg, f"missing shard {tmp_path / gone}", "model.safetensors.index.json", f"tensor {first}")


def test_tensor_absent_from_its_shard(tmp_path):
    cfg = tiny_config()
    write_checkpoint(tmp_path, random_hub_tensors(cfg), shards=2)
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"  # it lives in shard 2
    index.write_text(json.dumps(data))
    _raises(tmp_path, cfg, "model.norm.weight", "model-00001-of-00002.safetensors", "does not contain it")


@pytest.mark.parametrize("cut", [1, 4096])
def test_truncated_shard(tmp_path, cut):
    cfg = tiny_config("tiny-qwen2.5-vl")
    write_checkpoint(tmp_path, random_hub_tensors(cfg), shards=2)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    n, header = _header(str(shard))
    size = os.path.getsize(shard)
    os.truncate(shard, size - cut)
    header.pop("__metadata__", None)
    beyond = [k for k, v in header.items() if 8 + n + v["data_offsets"][1] > size - cut]
    first = min(beyond, key=lambda k: header[k]["data_offsets"][0])
    _raises(tmp_path, cfg, str(shard), "truncated", f"tensor {first}")


@pytest.mark.parametrize("keep", [0, 5, 40])
def test_truncated_inside_header(tmp_path, keep):
    cfg = tiny_config()
    write_checkpoint(tmp_path, random_hub_tensors(cfg))
    os.truncate(tmp_path / "model.safetensors", keep)
    _raises(tmp_path, cfg, str(tmp_path / "model.safetensors"), "header")


def test_corrupt_header(tmp_path):
    cfg = tiny_config()
    write_checkpoint(tmp_path, random_hub_tensors(cfg))
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"\xff\x00garbage")
    _raises(tmp_path, cfg, str(tmp_path / "model.safetensors"), "unreadable safetensors header")


def test_header_entry_without_offsets(tmp_path):
    body = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [64]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
    _raises(tmp_path, tiny_config(), str(tmp_path / "model.safetensors"), "model.norm.weight", "data_offsets")


def test_safetensors_own_error_is_wrapped(tmp_path):
    """Trailing bytes pass our header check but safetensors refuses the file: re-raised with the file named."""
    cfg = tiny_config()
    write_checkpoint(tmp_path, random_hub_tensors(cfg))
    with open(tmp_path / "model.safetensors", "ab") as f:
        f.write(b"\0" * 16)
    _raises(tmp_path, cfg, str(tmp_path / "model.safetensors"), "cannot read tensor")


def test_missing_tensors_listed_with_count(tmp_path):
    cfg = tiny_config("tiny-qwen2.5-vl")
    hub = random_hub_tensors(cfg)
    dropped = [n for n in hub if n.startswith("model.layers.1.")]
    assert len(dropped) > 10
    for n in dropped:
        del hub[n]
    write_checkpoint(tmp_path, hub)
    message = _raises(tmp_path, cfg, f"{len(dropped)} missing tensors", sorted(dropped)[0],
                      f"({len(dropped) - 10} more)")
    assert sorted(dropped)[-1] not in message  # capped at 10 names


def test_unexpected_tensor(tmp_path):
    cfg = tiny_config()
    hub = random_hub_tensors(cfg)
    hub["model.layers.7.self_attn.q_proj.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    hub["visual.extra.scale"] = torch.zeros(1, dtype=torch.bfloat16)
    write_checkpoint(tmp_path, hub)
    _raises(tmp_path, cfg, "2 unexpected tensors", "model.layers.7.self_attn.q_proj.weight", "visual.extra.scale")


def test_same_tensor_in_both_key_schemes(tmp_path):
    cfg = tiny_config()
    hub = random_hub_tensors(cfg)
    hub["model.language_model.norm.weight"] = hub["model.norm.weight"].clone()
    write_checkpoint(tmp_path, hub)
    _raises(tmp_path, cfg, "model.norm.weight", "model.language_model.norm.weight", "stored twice")


def test_wrong_shape(tmp_path):
    cfg = tiny_config()
    hub = random_hub_tensors(cfg)
    name = "model.layers.0.mlp.up_proj.weight"
    hub[name] = torch.zeros(95, 64, dtype=torch.bfloat16)
    write_checkpoint(tmp_path, hub, shards=2)
    shard = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"][name]
    _raises(tmp_path, cfg, name, str(tmp_path / shard), "expected shape (96, 64)", "found (95, 64)")


def test_wrong_config_for_checkpoint(tmp_path):
    """A Qwen2-VL checkpoint against the Qwen2.5-VL config: a clear missing/unexpected report, no crash."""
    write_checkpoint(tmp_path, random_hub_tensors(tiny_config("tiny-qwen2-vl")))
    _raises(tmp_path, tiny_config("tiny-qwen2.5-vl"), "missing tensors", "unexpected tensors",
            "visual.blocks.0.mlp.fc1.weight", "visual.blocks.0.mlp.gate_proj.weight")


def test_integer_weights_are_refused_as_quantized(tmp_path):
    cfg = tiny_config()
    hub = random_hub_tensors(cfg)
    name = "model.layers.1.self_attn.q_proj.weight"
    hub[name] = torch.zeros(hub[name].shape, dtype=torch.int32)
    write_checkpoint(tmp_path, hub)
    _raises(tmp_path, cfg, name, str(tmp_path / "model.safetensors"), "I32", "quantized checkpoints are not supported")


@pytest.mark.parametrize("dtype", [torch.int8, "bfloat", "int32"])
def test_bad_dtype_argument(tmp_path, dtype):
    cfg = tiny_config()
    write_checkpoint(tmp_path, random_hub_tensors(cfg))
    _raises(tmp_path, cfg, "dtype must be a floating-point torch dtype", dtype=dtype)
