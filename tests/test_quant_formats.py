"""GPTQ v1/v2 and AWQ GEMM checkpoint tensors -> QuantizedWeight, checked against an independent dequantizer
written here from the format descriptions (ENGINES.md §5.2), plus round trips and config errors."""

import pytest
import torch

from qwen2vl_fast.errors import CheckpointError
from qwen2vl_fast.quant.config import QuantConfig
from qwen2vl_fast.quant.formats import (fuse_quantized, from_awq, from_gptq, load_quantized_linear, to_awq,
                                        to_gptq)
from qwen2vl_fast.quant.weight import dequantize

K, N = 384, 200


def _i32(x: int) -> int:
    return x - (1 << 32) if x >= (1 << 31) else x


# ---- independent packers (the published layouts, written out field by field) ----

def pack_rows(q, bits):
    """GPTQ qweight: (K, N) -> (K*bits/32, N); row k in word k // pack at shift (k % pack) * bits."""
    pack = 32 // bits
    out = torch.zeros(q.shape[0] // pack, q.shape[1], dtype=torch.int64)
    for k in range(q.shape[0]):
        out[k // pack] |= q[k].long() << ((k % pack) * bits)
    return torch.tensor([[_i32(int(v)) for v in row] for row in out.tolist()], dtype=torch.int32)


def pack_cols(z, bits, order=None):
    """Packed along N: word c, field i (shift bits*i) holds column pack*c + order[i]."""
    pack = 32 // bits
    order = order or list(range(pack))
    r, n = z.shape
    out = [[0] * (n // pack) for _ in range(r)]
    zl = z.tolist()
    for i in range(r):
        for c in range(n // pack):
            w = 0
            for f in range(pack):
                w |= int(zl[i][pack * c + order[f]]) << (bits * f)
            out[i][c] = _i32(w)
    return torch.tensor(out, dtype=torch.int32)


# ---- independent dequantizers ----

def ref_gptq(qweight, qzeros, scales, g_idx, bits, version):
    """(N, K) fp32: w[n, k] = s[g, n] * (q[k, n] - z[g, n]) with g = g_idx[k], z = stored (+1 for v1)."""
    pack, mask = 32 // bits, (1 << bits) - 1
    k_total = qweight.shape[0] * pack
    qw = qweight.long() & 0xFFFFFFFF
    qz = qzeros.long() & 0xFFFFFFFF
    n = scales.shape[1]
    zeros = torch.zeros(qz.shape[0], n)
    for col in range(n):
        zeros[:, col] = ((qz[:, col // pack] >> (bits * (col % pack))) & mask).float()
    if version == 1:
        zeros = zeros + 1
    out = torch.zeros(n, k_total)
    for k in range(k_total):
        q = ((qw[k // pack] >> (bits * (k % pack))) & mask).float()
        g = int(g_idx[k])
        out[:, k] = (q - zeros[g]) * scales[g].float()
    return out


def ref_awq(qweight, qzeros, scales, group_size):
    order = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble f of word c holds column 8c + order[f]
    k_total, n = qweight.shape[0], qweight.shape[1] * 8
    qw = qweight.long() & 0xFFFFFFFF
    qz = qzeros.long() & 0xFFFFFFFF
    q = torch.zeros(k_total, n)
    z = torch.zeros(qz.shape[0], n)
    for c in range(n // 8):
        for f in range(8):
            q[:, 8 * c + order[f]] = ((qw[:, c] >> (4 * f)) & 15).float()
            z[:, 8 * c + order[f]] = ((qz[:, c] >> (4 * f)) & 15).float()
    gs = k_total if group_size == -1 else group_size
    out = torch.zeros(n, k_total)
    for k in range(k_total):
        out[:, k] = (q[k] - z[k // gs]) * scales[k // gs].float()
    return out


def make_gptq(bits, group_size, sym, version, desc_act, seed=0, k=K, n=N):
    gen = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    groups = 1 if group_size == -1 else k // group_size
    gs = k if group_size == -1 else group_size
    q = torch.randint(0, maxq + 1, (k, n), generator=gen)
    if sym:
        true_z = torch.full((groups, n), (maxq + 1) // 2)
    else:
        true_z = torch.randint(0, maxq + 1, (groups, n), generator=gen)
        true_z[0, :4] = 0  # exercise v1's wrap: stored 2^bits - 1, read back as 2^bits
        true_z[0, 4:8] = maxq
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).half()
    g_idx = torch.arange(k) // gs
    if desc_act:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    if version == 1:
        stored = (true_z - 1) & maxq
        effective_z = stored + 1  # what v1 kernels use
    else:
        stored = true_z
        effective_z = true_z
    tensors = {"qweight": pack_rows(q, bits), "qzeros": pack_cols(stored, bits), "scales": scales,
               "g_idx": g_idx.to(torch.int32)}
    return tensors, effective_z


CASES = [(bits, gs, sym, version, desc)
         for bits in (4, 8) for gs in (32, 64, 128, -1) for sym in (True, False) for version in (1, 2)
         for desc in (False, True) if not (desc and gs in (32, -1))]


@pytest.mark.parametrize("bits,gs,sym,version,desc", CASES)
def test_gptq_matches_reference(bits, gs, sym, version, desc):
    t, _ = make_gptq(bits, gs, sym, version, desc, seed=bits * 1000 + gs + 7 * version + 3 * desc + sym)
    w = from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, gs, version, dtype=torch.float32)
    ref = ref_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, version)
    assert torch.equal(dequantize(w, torch.float32), ref)
    assert (w.perm is not None) == (desc and gs != -1)
    if w.perm is not None:  # groups are contiguous after the sort
        assert torch.equal(torch.sort(t["g_idx"].long(), stable=True).values, t["g_idx"].long()[w.perm])
    back = to_gptq(w, version)
    for key in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(back[key], t[key]), key
    w2 = from_gptq(back["qweight"], back["qzeros"], back["scales"], back["g_idx"], bits, gs, version,
                   dtype=torch.float32)
    assert torch.equal(w2.qweight, w.qweight) and torch.equal(w2.zeros, w.zeros)


def test_gptq_v1_symmetric_words_and_v1_v2_agree():
    t, z = make_gptq(4, 128, True, 1, False)
    assert (t["qzeros"] == 0x77777777).all()
    w1 = from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 128, 1)
    assert (w1.zeros == 8).all()
    v2 = to_gptq(w1, 2)
    assert (v2["qzeros"] == _i32(0x88888888)).all()
    w2 = from_gptq(v2["qweight"], v2["qzeros"], v2["scales"], None, 4, 128, 2)
    assert torch.equal(dequantize(w1), dequantize(w2))
    t8, _ = make_gptq(8, 64, True, 1, False)
    assert (t8["qzeros"] == 0x7F7F7F7F).all()


def test_gptq_missing_g_idx_is_trivial():
    t, _ = make_gptq(4, 64, False, 2, False)
    w = from_gptq(t["qweight"], t["qzeros"], t["scales"], None, 4, 64, 2)
    assert w.perm is None and torch.equal(w.qweight, t["qweight"])


@pytest.mark.parametrize("gs", [32, 128, -1])
def test_awq_matches_reference(gs):
    gen = torch.Generator().manual_seed(gs + 11)
    groups = 1 if gs == -1 else K // gs
    q = torch.randint(0, 16, (K, N), generator=gen)
    z = torch.randint(0, 16, (groups, N), generator=gen)
    scales = (torch.rand(groups, N, generator=gen) * 0.02 + 0.001).half()
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    t = {"qweight": pack_cols(q, 4, order), "qzeros": pack_cols(z, 4, order), "scales": scales}
    w = from_awq(t["qweight"], t["qzeros"], t["scales"], gs, dtype=torch.float32)
    ref = ref_awq(t["qweight"], t["qzeros"], scales, gs)
    assert torch.equal(dequantize(w, torch.float32), ref)
    # and directly from the integers, without any unpacking
    rows = torch.arange(K) // (K if gs == -1 else gs)
    assert torch.equal(ref, ((q.float() - z.float()[rows]) * scales.float()[rows]).t())
    back = to_awq(w)
    for key in t:
        assert torch.equal(back[key], t[key]), key


def test_awq_nibble_order_single_word():
    # columns 0..7 hold values 1..8: AWQ order puts column order[f] in nibble f
    vals = torch.arange(1, 9).view(1, 8).repeat(8, 1)
    qw = pack_cols(vals, 4, [0, 2, 4, 6, 1, 3, 5, 7])
    assert int(qw[0, 0]) & 0xFFFFFFFF == 0x86427531
    w = from_awq(qw, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 8), -1)
    assert torch.equal(dequantize(w)[:, 0], torch.arange(1, 9).float())


def test_awq_gptq_cross_conversion():
    t, _ = make_gptq(4, 64, False, 2, False, seed=5)
    w = from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 64, 2)
    a = to_awq(w)
    w2 = from_awq(a["qweight"], a["qzeros"], a["scales"], 64)
    assert torch.equal(dequantize(w), dequantize(w2))


# ---- errors ----

@pytest.mark.parametrize("qc,needle", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits=3"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "marlin"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "is_marlin_format": True}, "is_marlin_format"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size=0"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": {"-:.*": {}}}, "dynamic"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "gemv"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "exllama"}, "exllama"),
    ({"quant_method": "awq", "bits": 8, "group_size": 128}, "bits=8"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, "zero_point"),
    ({"quant_method": "exl2", "bits": 4}, "exl2"),
    ({"quant_method": "bitsandbytes"}, "bitsandbytes"),
])
def test_config_errors(qc, needle):
    with pytest.raises(CheckpointError, match=needle):
        QuantConfig.parse(qc)


def test_config_parse():
    assert QuantConfig.from_config({"model_type": "qwen2_vl"}) is None
    c = QuantConfig.from_config({"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": False,
        "checkpoint_format": "gptq_v2", "modules_to_not_convert": ["visual"]}})
    assert (c.method, c.bits, c.group_size, c.desc_act, c.sym, c.version) == ("gptq", 4, 128, True, False, 2)
    assert c.skips("visual.blocks.0.attn.qkv") and not c.skips("model.layers.0.mlp.up_proj")
    a = QuantConfig.parse({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                           "version": "GEMM"})
    assert (a.method, a.version, a.sym) == ("awq", 0, False)
    g = QuantConfig.parse({"quant_method": "gptq", "bits": 8, "group_size": -1,
                           "exllama_config": {"version": 2}})
    assert g.version == 1 and g.bits == 8


def test_shape_errors():
    t, _ = make_gptq(4, 64, False, 1, True)
    with pytest.raises(CheckpointError, match="scales"):
        from_gptq(t["qweight"], t["qzeros"], t["scales"][:, :-8], t["g_idx"], 4, 64, 1)
    with pytest.raises(CheckpointError, match="qzeros"):
        from_gptq(t["qweight"], t["qzeros"][:, :-1], t["scales"], t["g_idx"], 4, 64, 1)
    with pytest.raises(CheckpointError, match="group_size=100"):
        from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 100, 1)
    bad = t["g_idx"].clone()
    bad[0], bad[1] = 0, 0
    bad[:] = 0
    with pytest.raises(CheckpointError, match="g_idx"):
        from_gptq(t["qweight"], t["qzeros"], t["scales"], bad, 4, 64, 1)
    with pytest.raises(CheckpointError, match="g_idx"):
        from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"][:-1], 4, 64, 1)
    with pytest.raises(CheckpointError, match="bits=3"):
        from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 3, 64, 1)
    with pytest.raises(CheckpointError, match="qweight"):
        from_awq(t["qweight"].float(), t["qzeros"], t["scales"], 64)
    with pytest.raises(CheckpointError, match="scales"):
        from_awq(torch.zeros(K, N // 8, dtype=torch.int32), torch.zeros(K // 64, N // 8, dtype=torch.int32),
                 torch.ones(K // 128, N), 64)
    w = from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 64, 1)
    with pytest.raises(CheckpointError, match="act-order"):
        to_awq(w)


def test_load_and_fuse():
    parts = []
    store = {}
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        t, _ = make_gptq(4, 64, False, 1, False, seed=40 + i, n=64 if i else 128)
        for key, v in t.items():
            store[f"model.layers.0.self_attn.{name}.{key}"] = v
    qc = QuantConfig.parse({"quant_method": "gptq", "bits": 4, "group_size": 64})
    for name in ("q_proj", "k_proj", "v_proj"):
        parts.append(load_quantized_linear(store, f"model.layers.0.self_attn.{name}", qc, dtype=torch.float32))
    fused = fuse_quantized(parts)
    assert fused.out_features == 256
    assert torch.equal(dequantize(fused), torch.cat([dequantize(p) for p in parts], 0))
    with pytest.raises(CheckpointError, match="missing tensor"):
        load_quantized_linear(store, "model.layers.0.self_attn.o_proj", qc)


# ---- checkpoint loading ----

LM_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")


def _rewrite_quantized(path, method, keep_float=()):
    """Replace the language model's linears of a float checkpoint by 4-bit g32 GPTQ-v1 (act-order) / AWQ
    tensors built from random integers; returns {hub prefix: expected dense (N, K) weight in fp32}."""
    import json
    import os

    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    expected = {}
    gen = torch.Generator().manual_seed(3)
    for name in list(tensors):
        prefix = name[: -len(".weight")]
        if not (name.startswith("model.layers.") and prefix.split(".", 3)[-1] in LM_LINEARS):
            continue
        if prefix in keep_float:
            continue
        n, k = tensors.pop(name).shape
        groups = k // 32
        q = torch.randint(0, 16, (k, n), generator=gen)
        z = torch.randint(1, 16, (groups, n), generator=gen)
        s = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).half()
        if method == "gptq":  # same act-order permutation for every layer sharing an input
            g_idx = (torch.arange(k) // 32)[torch.randperm(k, generator=torch.Generator().manual_seed(k))]
            stored = {"qweight": pack_rows(q, 4), "qzeros": pack_cols(z - 1, 4), "scales": s,
                      "g_idx": g_idx.to(torch.int32)}
            expected[prefix] = ref_gptq(stored["qweight"], stored["qzeros"], s, g_idx, 4, 1)
        else:
            order = [0, 2, 4, 6, 1, 3, 5, 7]
            stored = {"qweight": pack_cols(q, 4, order), "qzeros": pack_cols(z, 4, order), "scales": s}
            expected[prefix] = ref_awq(stored["qweight"], stored["qzeros"], s, 32)
        tensors.update({f"{prefix}.{key}": v for key, v in stored.items()})
    save_file(tensors, file)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = (
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False}
        if method == "gptq" else {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                  "version": "gemm", "modules_to_not_convert": ["visual"]})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return expected


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_load_quantized_checkpoint(tmp_path, method):
    from qwen2vl_fast.checkpoint import load_checkpoint
    from qwen2vl_fast.config import ModelConfig
    from qwen2vl_fast.quant.weight import QuantizedWeight
    from qwen2vl_fast.testing.checkpoint_writer import write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "ckpt", "tiny-qwen2.5-vl", dtype=torch.float32, seed=1)
    dense = load_checkpoint(path, ModelConfig.from_pretrained(path))
    keep = ("model.layers.1.mlp.down_proj",)
    expected = _rewrite_quantized(path, method, keep_float=keep)
    cfg = ModelConfig.from_pretrained(path)
    out = load_checkpoint(path, cfg)
    assert set(out) == set(dense)
    for i in range(cfg.text.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv = out[p + "self_attn.qkv_proj.weight"]
        assert isinstance(qkv, QuantizedWeight) and (qkv.perm is not None) == (method == "gptq")
        assert torch.equal(dequantize(qkv, torch.float32), torch.cat(
            [expected[p + f"self_attn.{x}_proj"] for x in "qkv"], 0))
        assert torch.equal(dequantize(out[p + "mlp.gate_up_proj.weight"], torch.float32), torch.cat(
            [expected[p + "mlp.gate_proj"], expected[p + "mlp.up_proj"]], 0))
        assert torch.equal(dequantize(out[p + "self_attn.o_proj.weight"], torch.float32),
                           expected[p + "self_attn.o_proj"])
        assert torch.equal(out[p + "self_attn.qkv_proj.bias"], dense[p + "self_attn.qkv_proj.bias"])
    assert torch.equal(out["model.layers.1.mlp.down_proj.weight"], dense["model.layers.1.mlp.down_proj.weight"])
    for name, t in dense.items():  # the vision tower, norms, embeddings, lm_head stay floating and identical
        if not isinstance(out[name], QuantizedWeight):
            assert torch.equal(out[name], t), name


def test_load_quantized_checkpoint_refuses_quantized_vision(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from qwen2vl_fast.checkpoint import load_checkpoint
    from qwen2vl_fast.config import ModelConfig
    from qwen2vl_fast.testing.checkpoint_writer import write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "ckpt", "tiny-qwen2.5-vl", dtype=torch.float32, seed=1)
    _rewrite_quantized(path, "gptq")
    file = f"{path}/model.safetensors"
    t = load_file(file)
    w = t.pop("visual.blocks.0.attn.proj.weight")
    t["visual.blocks.0.attn.proj.qweight"] = torch.zeros(w.shape[1] // 8, w.shape[0], dtype=torch.int32)
    save_file(t, file)
    with pytest.raises(CheckpointError, match="visual.blocks.0.attn.proj.qweight"):
        load_checkpoint(path, ModelConfig.from_pretrained(path))
    cfg = json.load(open(f"{path}/config.json"))
    cfg["quantization_config"]["bits"] = 3
    json.dump(cfg, open(f"{path}/config.json", "w"))
    with pytest.raises(CheckpointError, match="bits=3"):
        load_checkpoint(path, ModelConfig.from_pretrained(path))
