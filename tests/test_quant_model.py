"""A model whose decoder linears are weight-only quantized gives the logits of its dequantized twin."""

import pytest
import torch

import qwen2vl_fast
from qwen2vl_fast.quant import QuantizedWeight, dequantize, pack_int32

QUANTIZED = ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight")


def random_quantized(dense: torch.Tensor, bits: int, group_size: int, gen) -> QuantizedWeight:
    n, k = dense.shape
    groups = k // (k if group_size == -1 else group_size)
    q = torch.randint(0, 2 ** bits, (k, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.01).to(dense.dtype)
    zeros = torch.randint(0, 2 ** bits, (groups, n), generator=gen).to(dense.dtype)
    return QuantizedWeight(pack_int32(q, bits), scales, zeros, bits, group_size)


@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, -1)])
def test_quantized_decoder_equals_its_dequantized_twin(tiny_checkpoints, bits, group_size):
    path = tiny_checkpoints["tiny-qwen2.5-vl"]
    gen = torch.Generator().manual_seed(0)
    dense = qwen2vl_fast.load(path, dtype=torch.float32, backend="torch")
    weights = dict(dense.weights)
    for name in list(weights):
        if name.startswith("model.layers.") and name.endswith(QUANTIZED):
            weights[name] = random_quantized(weights[name], bits, group_size, gen)
    twin = {k: (dequantize(v, torch.float32) if isinstance(v, QuantizedWeight) else v) for k, v in weights.items()}
    Model = type(dense)
    quantized, reference = Model(dense.config, weights, dense.ops), Model(dense.config, twin, dense.ops)
    grid = torch.tensor([[1, 4, 6]])
    inputs = dict(input_ids=torch.tensor([[1, 151652] + [151655] * 6 + [151653, 2]]),
                  pixel_values=torch.randn(24, 1176), image_grid_thw=grid)
    a, b = quantized(**inputs).logits, reference(**inputs).logits
    assert float((a - b).norm() / b.norm()) < 1e-5


def test_repr_counts_quantized_parameters(tiny_checkpoints):
    dense = qwen2vl_fast.load(tiny_checkpoints["tiny-qwen2-vl"], dtype=torch.float32)
    weights = dict(dense.weights)
    name = "model.layers.0.mlp.down_proj.weight"
    weights[name] = random_quantized(weights[name], 4, 32, torch.Generator().manual_seed(1))
    assert repr(type(dense)(dense.config, weights, dense.ops)) == repr(dense)
