"""kernels/quant_gemm.py (weight-only 4/8-bit GEMM with fused dequantisation) against the reference op
quant_linear (x @ dequantize(w).T + b), on the CPU under the Triton interpreter (small shapes) or on a GPU:
bits 4 and 8, group sizes 32/64/128/-1 (and odd ones), act-order, bias, decode (M <= 16, split-K) and prefill
tiles, K and N not multiples of the tiles; outputs (and split-K partials) are allocated NaN-filled.

Tolerances: fp32 tight (the dequantised values are exact in fp32, only the summation order differs: rtol 1e-4, atol
1e-5 + 4 eps32 max sum_k |x w|);
fp16 by the DESIGN rule, error against the fp32 reference within twice PyTorch's own fp16 error plus atol."""

from __future__ import annotations

import pytest
import torch

from conftest import float_dtypes
from helpers_triton import ptx_for_sm90
from qwen2vl_fast.ops import get_op, resolve
from qwen2vl_fast.quant.weight import QuantizedWeight, pack_int32

qg = pytest.importorskip("qwen2vl_fast.kernels.quant_gemm")
ref_op = get_op("quant_linear").reference

DTYPES = [pytest.param(d, atol, id=str(d).split(".")[-1]) for d, atol, _ in float_dtypes("cpu")]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    def nan_empty(*shape, dtype=None, device=None):
        return torch.full(*shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(qg, "_empty", nan_empty)


def make_weight(k, n, bits, group_size, act_order, dtype, device):
    g = k if group_size == -1 else group_size
    q = torch.randint(0, 2 ** bits, (k, n))
    scales = torch.rand(k // g, n) * 0.04 + 0.01
    lo = 2 ** (bits - 2)  # zeros around 2^(bits-1), asymmetric, not always integral for 8 bits
    zeros = torch.randint(lo, 3 * lo, (k // g, n)).float()
    perm = torch.randperm(k) if act_order else None
    w = QuantizedWeight(pack_int32(q, bits), scales.to(dtype), zeros.to(dtype), bits, group_size, perm)
    return w.to(device)


def as_fp32(w: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(w.qweight, w.scales.float(), w.zeros.float(), w.bits, w.group_size, w.perm)


def check(out, x, w, b, dtype, atol):
    assert out.shape == (*x.shape[:-1], w.out_features) and out.dtype == dtype
    assert torch.isfinite(out).all()
    ref32 = ref_op(x.float(), as_fp32(w), None if b is None else b.float())
    if dtype == torch.float32:
        # summation-order error scales with sum_k |x w|, not with the (possibly cancelling) result
        w32 = ref_op(torch.eye(w.in_features, device=x.device), as_fp32(w), None).t()  # dense (N, K), input order
        bound = (x.float().abs() @ w32.abs().t()).max().item()
        torch.testing.assert_close(out, ref32, rtol=1e-4, atol=1e-5 + 4 * torch.finfo(torch.float32).eps * bound)
        return
    ref_lp = ref_op(x, w, b)
    err, torch_err = (out.float() - ref32).abs().max().item(), (ref_lp.float() - ref32).abs().max().item()
    assert err <= 2 * torch_err + atol, f"error {err:.3g} > 2 * torch's {torch_err:.3g} + {atol}"


def run_case(device, m, k, n, bits, group_size, act_order, bias, dtype, atol, config=None, lead=None):
    w = make_weight(k, n, bits, group_size, act_order, dtype, device)
    x = torch.randn(*(lead or (m,)), k, device=device).to(dtype)
    b = (torch.randn(n, device=device) * 0.5).to(dtype) if bias else None
    if config is None:
        out = qg.quant_linear(x, w, b)
    else:
        out = qg.quant_gemm(x, w.qweight, w.scales, w.zeros, w.bits, w.group_size, w.perm, b, config=config)
    check(out, x, w, b, dtype, atol)


# (M, act-order, bias): a decode batch (split-K) with act-order and bias, a prefill batch without
CASES = [pytest.param(3, True, True, id="m3-perm-bias"), pytest.param(33, False, False, id="m33-plain")]


@pytest.mark.parametrize("m, act_order, bias", CASES)
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_bits_and_groups(triton_device, bits, group_size, m, act_order, bias, dtype, atol):
    run_case(triton_device, m, 384, 200, bits, group_size, act_order, bias, dtype, atol)


@pytest.mark.parametrize("m", [1, 3, 16, 33, 200])
@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_batch_sizes(triton_device, m, dtype, atol):
    run_case(triton_device, m, 128, 72, 4, 64, True, True, dtype, atol)


@pytest.mark.parametrize("bits", [4, 8])
def test_leading_dims_and_other_flags(triton_device, bits):
    run_case(triton_device, None, 128, 72, bits, 32, False, True, torch.float32, 1e-5, lead=(2, 3))
    run_case(triton_device, 5, 128, 72, bits, 64, True, False, torch.float32, 1e-5)


@pytest.mark.parametrize("name, k, group_size, config", [
    # uneven split-K (the last split partly past K: masked tail), one scale row per step
    ("split-tail", 384, 64, qg.QuantGemmConfig(16, 32, 32, 1, 4, 1, split_k=5)),
    # a non power-of-two group neither dividing nor divided by BLOCK_K: per-row scale gather, K tail (200 % 32)
    ("gather", 200, 40, qg.QuantGemmConfig(16, 32, 32, 1, 4, 1, split_k=1)),
    # several groups per step (BLOCK_K 64, group 16), many small tiles over M and N, grouped launch order
    ("groups-per-step", 128, 16, qg.QuantGemmConfig(16, 16, 64, 2, 4, 1, split_k=1)),
    # split-K on a prefill-sized M with a K tail
    ("split-prefill", 200, 8, qg.QuantGemmConfig(32, 32, 16, 4, 4, 1, split_k=3)),
])
@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_forced_configs(triton_device, name, k, group_size, config, dtype, atol):
    m = 40 if name == "split-prefill" else 17 if name == "groups-per-step" else 2
    run_case(triton_device, m, k, 48, 4, group_size, True, True, dtype, atol, config=config)


def test_split_count_fills_the_sms():
    cfg = qg.pick_config(1, 3584, 3584, torch.float16, 128)
    assert (cfg.block_m, cfg.block_n, cfg.block_k) == (16, 128, 128)
    split = qg._split_count(1, 3584, 3584, cfg, torch.device("cpu"))  # 132 SMs assumed on the CPU
    assert 3584 // 128 % split == 0 and 28 * split >= 132
    assert qg._split_count(200, 3584, 3584, qg.pick_config(200, 3584, 3584, torch.float16, 128),
                           torch.device("cpu")) == 1
    assert qg.pick_config(1, 3584, 3584, torch.float16, 32).block_k == 32


def test_registry_picks_triton(triton_device):
    table = resolve("triton", triton_device)
    assert table.chosen["quant_linear"] == "triton"
    from qwen2vl_fast.ops.quant_linear import quant_linear_triton

    assert table.quant_linear is quant_linear_triton
    if triton_device.type == "cpu":
        assert resolve("auto", "cpu").chosen["quant_linear"] == "torch"
    w = make_weight(128, 72, 4, 32, True, torch.float32, triton_device)
    x = torch.randn(2, 128, device=triton_device)
    torch.testing.assert_close(table.quant_linear(x, w, None), ref_op(x, w, None), rtol=1e-4, atol=1e-5)


def test_compiles_for_hopper(tmp_path):
    """Decode (split-K partials) and prefill configs, 4 and 8 bit, compile for sm_90 in bf16; the reduce too."""
    sig = {"X": "*bf16", "QW": "*i32", "S": "*bf16", "Z": "*bf16", "B": "*bf16", "Y": "*fp32", "M": "i32",
           "N": "i32", "stride_xm": "i32", "stride_qk": "i32", "stride_sg": "i32", "stride_ym": "i32",
           "stride_ys": "i32"}
    names = ["K", "K_SPLIT", "BITS", "GROUP", "STRIDE_ALIGN", "HAS_BIAS", "PARTIAL", "INPUT_PRECISION",
             "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"]
    sig.update({n: "constexpr" for n in names})
    aligned = ["X", "QW", "S", "Z", "B", "Y", "N", "stride_xm", "stride_qk", "stride_sg", "stride_ym", "stride_ys"]
    jobs = []
    for bits, group, m, partial in [(4, 128, 1, True), (8, 32, 1, True), (4, 64, 256, False), (8, 3584, 256, False)]:
        cfg = qg.pick_config(m, 3584, 3584, torch.bfloat16, group)
        consts = dict(K=3584, K_SPLIT=512 if partial else 3584, BITS=bits, GROUP=group, STRIDE_ALIGN=16,
                      HAS_BIAS=True, PARTIAL=partial, INPUT_PRECISION="tf32", BLOCK_M=cfg.block_m,
                      BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)
        s = dict(sig, Y="*fp32" if partial else "*bf16")
        jobs.append([qg.__name__, "_quant_gemm_kernel", s, consts, cfg.num_warps, aligned])
    red_sig = {"P": "*fp32", "B": "*bf16", "Y": "*bf16", "total": "i32", "N": "i32", "SPLIT": "constexpr",
               "HAS_BIAS": "constexpr", "BLOCK": "constexpr"}
    jobs.append([qg.__name__, "_splitk_reduce_kernel", red_sig, dict(SPLIT=7, HAS_BIAS=True, BLOCK=1024), 4,
                 ["P", "B", "Y", "total", "N"]])
    for ptx in ptx_for_sm90(jobs, tmp_path)[:4]:
        assert "mma" in ptx  # tensor-core dot (mma.sync at M = 16, wgmma for the prefill tiles)
