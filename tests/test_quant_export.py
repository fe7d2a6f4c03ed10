"""Quantized checkpoints end to end: our quantizer writes the published formats, our loader reads them, the
logits equal the dequantized twin's, and the engine generates from them."""

import json

import pytest
import torch

import qwen2vl_fast
from qwen2vl_fast import cli
from qwen2vl_fast.engine import Engine
from qwen2vl_fast.quant import QuantizedWeight, dequantize
from qwen2vl_fast.quant.export import quantize_checkpoint
from qwen2vl_fast.testing.checkpoint_writer import write_random_checkpoint

IMG, VS, VE = 151655, 151652, 151653


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("dense") / "ckpt", "tiny-qwen2.5-vl",
                                   dtype=torch.float32, seed=3, std=0.15)


def twin_logits(path, inputs):
    """Logits of the quantized model and of the same model with every quantized weight dequantized."""
    q = qwen2vl_fast.load(path, dtype=torch.float32, backend="torch")
    assert any(isinstance(w, QuantizedWeight) for w in q.weights.values())
    assert all(isinstance(w, torch.Tensor) for n, w in q.weights.items() if n.startswith("visual."))
    twin = {n: (dequantize(w, torch.float32) if isinstance(w, QuantizedWeight) else w) for n, w in q.weights.items()}
    reference = type(q)(q.config, twin, q.ops)
    return q(**inputs).logits, reference(**inputs).logits


def inputs():
    return dict(input_ids=torch.tensor([[1, VS] + [IMG] * 6 + [VE, 2, 3]]), pixel_values=torch.randn(24, 1176),
                image_grid_thw=torch.tensor([[1, 4, 6]]))


@pytest.mark.parametrize("fmt, bits, method, act_order", [
    ("gptq", 4, "rtn", False), ("gptq", 8, "rtn", False), ("awq", 4, "rtn", False), ("gptq", 4, "gptq", True)])
def test_quantized_checkpoint_loads_and_equals_its_dequantized_twin(dense, tmp_path, fmt, bits, method, act_order):
    out = quantize_checkpoint(dense, tmp_path / "q", bits=bits, group_size=32, fmt=fmt, method=method,
                              act_order=act_order)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == fmt and qc["bits"] == bits
    x = inputs()
    a, b = twin_logits(out, x)
    assert float((a - b).norm() / b.norm()) < 1e-5
    dense_logits = qwen2vl_fast.load(dense, dtype=torch.float32)(**x).logits
    assert float((a - dense_logits).norm() / dense_logits.norm()) < 0.5  # quantized, not garbage


def test_engine_generates_from_a_quantized_checkpoint(dense, tmp_path):
    out = quantize_checkpoint(dense, tmp_path / "q", bits=4, group_size=32, fmt="gptq", method="rtn")
    engine = Engine.from_pretrained(out, dtype=torch.float32, max_batch=2, max_len=512)
    [c] = engine.generate([{"role": "user", "content": "hello"}], max_new_tokens=4)
    assert len(c.token_ids) >= 1


def test_cli_quantize_and_refusals(dense, tmp_path, capsys):
    assert cli.main(["quantize", "--model", str(dense), "--out", str(tmp_path / "cli"), "--bits", "4",
                     "--group-size", "32", "--format", "awq", "--method", "rtn", "--device", "cpu"]) == 0
    assert "awq format" in capsys.readouterr().out
    assert cli.main(["quantize", "--model", str(tmp_path / "cli"), "--out", str(tmp_path / "again"),
                     "--group-size", "32", "--device", "cpu"]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert cli.main(["quantize", "--model", str(dense), "--out", str(tmp_path / "x"), "--format", "awq",
                     "--act-order", "--device", "cpu"]) == 2


def test_calibration_collects_a_hessian_for_every_decoder_linear(dense):
    from qwen2vl_fast.quant.export import calibration_hessians

    hs = calibration_hessians(dense)
    layers = qwen2vl_fast.load_config(dense).text.num_hidden_layers
    expected = {f"model.layers.{i}.{m}" for i in range(layers)
                for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    assert set(hs) == expected
    assert all(h.shape[0] == h.shape[1] and torch.isfinite(h).all() and h.diagonal().sum() > 0 for h in hs.values())
