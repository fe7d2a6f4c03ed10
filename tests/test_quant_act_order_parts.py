"""GPTQ act-order checkpoints whose q/k/v (gate/up) have different g_idx load as QuantizedParts, run one GEMM per
part and give the logits of their dequantized twin; equal g_idx still fuse into one QuantizedWeight."""

import json
import os
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import qwen2vl_fast
from qwen2vl_fast.checkpoint import load_checkpoint
from qwen2vl_fast.config import ModelConfig
from qwen2vl_fast.errors import CheckpointError
from qwen2vl_fast.quant import QuantizedParts, QuantizedWeight, dequantize, pack_int32
from qwen2vl_fast.quant.formats import fuse_quantized, to_gptq
from qwen2vl_fast.testing.checkpoint_writer import write_random_checkpoint

GROUP = 32
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def random_act_order(n, k, perm, gen, group_size=GROUP) -> QuantizedWeight:
    g = k // group_size
    q = torch.randint(0, 16, (k, n), generator=gen)
    scales = (torch.rand(g, n, generator=gen) * 0.02 + 0.005).half().float()  # the checkpoint stores fp16
    zeros = torch.randint(1, 16, (g, n), generator=gen).float()  # GPTQ v1 stores zero - 1 in 4 bits
    return QuantizedWeight(pack_int32(q, 4), scales, zeros, 4, group_size, perm)


def write_act_order(path, shared: bool) -> dict:
    """Replace the decoder linears of a float checkpoint by GPTQ-v1 act-order tensors; `shared`: one g_idx per
    input (q/k/v alike, gate/up alike), else a different one for every projection. -> {hub prefix: (N, K) fp32}."""
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    gen = torch.Generator().manual_seed(7)
    expected = {}
    for name in list(tensors):
        prefix = name[: -len(".weight")]
        if not (name.startswith("model.layers.") and prefix.split(".", 3)[-1] in LINEARS):
            continue
        n, k = tensors.pop(name).shape
        seed = k if shared else len(expected) + 100
        w = random_act_order(n, k, torch.randperm(k, generator=torch.Generator().manual_seed(seed)), gen)
        expected[prefix] = dequantize(w, torch.float32)
        tensors.update({f"{prefix}.{key}": v for key, v in to_gptq(w, version=1).items()})
    save_file(tensors, file)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": True,
                                  "sym": False, "checkpoint_format": "gptq"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return expected


@pytest.fixture(scope="module")
def per_part(tmp_path_factory):
    path = write_random_checkpoint(tmp_path_factory.mktemp("parts") / "ckpt", "tiny-qwen2.5-vl",
                                   dtype=torch.float32, seed=2, std=0.15)
    return path, write_act_order(path, shared=False)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def twin(model):
    weights = {n: (dequantize(w, torch.float32) if isinstance(w, (QuantizedWeight, QuantizedParts)) else w)
               for n, w in model.weights.items()}
    return type(model)(model.config, weights, model.ops)


def image_inputs(device="cpu"):
    return dict(input_ids=torch.tensor([[1, 151652] + [151655] * 6 + [151653, 2]], device=device),
                pixel_values=torch.randn(24, 1176, device=device), image_grid_thw=torch.tensor([[1, 4, 6]]))


def test_different_g_idx_per_projection_load_as_parts(per_part):
    path, expected = per_part
    cfg = ModelConfig.from_pretrained(path)
    out = load_checkpoint(path, cfg)
    for i in range(cfg.text.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv, gate_up = out[p + "self_attn.qkv_proj.weight"], out[p + "mlp.gate_up_proj.weight"]
        assert isinstance(qkv, QuantizedParts) and len(qkv.parts) == 3
        assert isinstance(gate_up, QuantizedParts) and len(gate_up.parts) == 2
        perms = [w.perm for w in qkv.parts + gate_up.parts]
        assert all(not torch.equal(a, b) for a, b in pairwise(perms))
        assert qkv.out_features == sum(expected[p + f"self_attn.{x}_proj"].shape[0] for x in "qkv")
        assert torch.equal(dequantize(qkv, torch.float32),
                           torch.cat([expected[p + f"self_attn.{x}_proj"] for x in "qkv"], 0))
        assert torch.equal(dequantize(gate_up, torch.float32),
                           torch.cat([expected[p + "mlp.gate_proj"], expected[p + "mlp.up_proj"]], 0))
        for single in ("self_attn.o_proj", "mlp.down_proj"):  # one linear: its own perm, nothing to fuse
            w = out[p + single + ".weight"]
            assert isinstance(w, QuantizedWeight) and w.perm is not None
            assert torch.equal(dequantize(w, torch.float32), expected[p + single])


def test_per_part_logits_equal_the_dequantized_twin_torch(per_part):
    model = qwen2vl_fast.load(per_part[0], dtype=torch.float32, backend="torch")
    assert isinstance(model.weights["model.layers.0.self_attn.qkv_proj.weight"], QuantizedParts)
    x = image_inputs()
    a, b = model(**x).logits, twin(model)(**x).logits
    assert rel(a, b) < 1e-5


def test_per_part_hidden_states_equal_the_dequantized_twin_triton(per_part, triton_device):
    """The decoder on the Triton backend (the quantized GEMM with act-order per part); the 151936-wide lm_head is
    applied with torch afterwards (too slow interpreted), to both sides alike."""
    model = qwen2vl_fast.load(per_part[0], device=triton_device, dtype=torch.float32, backend="triton")
    assert model.ops.chosen["quant_linear"] == "triton"
    reference = twin(model)
    embeds = torch.randn(1, 11, 64, device=triton_device)
    positions = torch.arange(11, device=triton_device).view(1, 1, -1).expand(3, 1, -1)
    a, b = model.language_model(embeds, positions, None), reference.language_model(embeds, positions, None)
    assert rel(a, b) < 1e-5
    head = model.language_model.lm_head_w
    assert rel(F.linear(a, head), F.linear(b, head)) < 1e-5


def test_shared_g_idx_still_fuses(tmp_path):
    path = write_random_checkpoint(tmp_path / "ckpt", "tiny-qwen2.5-vl", dtype=torch.float32, seed=2)
    expected = write_act_order(path, shared=True)
    out = load_checkpoint(path, ModelConfig.from_pretrained(path))
    qkv, gate_up = out["model.layers.0.self_attn.qkv_proj.weight"], out["model.layers.0.mlp.gate_up_proj.weight"]
    for w in (qkv, gate_up):
        assert type(w) is QuantizedWeight and w.perm is not None
    assert qkv.out_features == 128 and gate_up.out_features == 192
    assert torch.equal(dequantize(qkv, torch.float32), torch.cat(
        [expected[f"model.layers.0.self_attn.{x}_proj"] for x in "qkv"], 0))


def test_fuse_quantized_rules():
    gen = torch.Generator().manual_seed(0)
    p1, p2 = torch.randperm(64, generator=gen), torch.randperm(64, generator=gen)
    a, b = random_act_order(16, 64, p1, gen), random_act_order(8, 64, p1.clone(), gen)
    fused = fuse_quantized([a, b])
    assert type(fused) is QuantizedWeight and torch.equal(fused.perm, p1) and fused.out_features == 24
    c = random_act_order(8, 64, p2, gen)
    plain = random_act_order(8, 64, None, gen)
    for parts in ([a, c], [a, plain], [plain, a, b]):
        w = fuse_quantized(parts)
        assert isinstance(w, QuantizedParts) and w.splits == [p.out_features for p in parts]
        assert torch.equal(dequantize(w), torch.cat([dequantize(p) for p in parts], 0))
        assert isinstance(w.to("cpu"), QuantizedParts)
    assert type(fuse_quantized([plain, random_act_order(8, 64, None, gen)])) is QuantizedWeight
    with pytest.raises(CheckpointError, match="group_size"):
        fuse_quantized([a, random_act_order(8, 64, p2, gen, group_size=16)])
