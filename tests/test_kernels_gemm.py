"""kernels/gemm.py (linear, linear_act, linear_swiglu) and the Triton merger against the op references, on the
CPU under the Triton interpreter (small shapes) or on a GPU: odd shapes, real-width slices, every epilogue, with
and without bias, leading dims, strided rows; outputs are allocated NaN-filled so unwritten elements show.

Tolerances: fp32 tight (summation order only: rtol 1e-4); fp16/bf16 by the DESIGN rule, error against an fp32
reference within twice PyTorch's own low-precision error plus atol (our epilogue rounds once, the reference
rounds the GEMM output before the activation)."""

from __future__ import annotations

import pytest
import torch

from conftest import float_dtypes
from qwen2vl_fast.ops import get_op, resolve

gemm = pytest.importorskip("qwen2vl_fast.kernels.gemm")

DTYPES = [pytest.param(d, atol, id=str(d).split(".")[-1]) for d, atol, _ in float_dtypes("cpu")]
EPILOGUES = ["none", "quick_gelu", "gelu", "swiglu"]
# (M, K, N): N is the output width (I for swiglu: odd 5 / 37 included); K tails 17, 1176 (= 18 * 64 + 24), 70
ODD_SHAPES = [(1, 17, 5), (3, 1176, 96), (37, 64, 100), (130, 17, 37), (130, 1176, 5), (37, 70, 96)]
# Real reduction lengths with a few output columns: qkv/fc1/gate_up (K 1280), fc2/merger (5120), Qwen2.5 down (3420)
REAL_SLICES = [(64, 1280, 64), (16, 3420, 64), (20, 5120, 48)]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    def nan_empty(*shape, dtype=None, device=None):
        return torch.full(*shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(gemm, "_empty", nan_empty)


def ref_fn(epilogue):
    if epilogue == "swiglu":
        return get_op("linear_swiglu").reference
    if epilogue == "none":
        return get_op("linear").reference
    return lambda x, w, b: get_op("linear_act").reference(x, w, b, epilogue)


def ours(epilogue, x, w, b):
    if epilogue == "swiglu":
        return gemm.linear_swiglu(x, w, b)
    if epilogue == "none":
        return gemm.linear(x, w, b)
    return gemm.linear_act(x, w, b, epilogue)


def make(shape_mkn, epilogue, dtype, device, bias=True, lead=None):
    m, k, n = shape_mkn
    rows = 2 * n if epilogue == "swiglu" else n
    x = torch.randn(*(lead or (m,)), k, device=device).to(dtype)
    w = (torch.randn(rows, k, device=device) * k ** -0.5).to(dtype)
    b = (torch.randn(rows, device=device) * 0.5).to(dtype) if bias else None
    return x, w, b


def check(out, x, w, b, epilogue, dtype, atol):
    """Shape, dtype, finiteness, then the tolerance of the dtype (see the module docstring)."""
    f = ref_fn(epilogue)
    expected_n = w.shape[0] // 2 if epilogue == "swiglu" else w.shape[0]
    assert out.shape == (*x.shape[:-1], expected_n) and out.dtype == dtype
    assert torch.isfinite(out).all()
    up = lambda t: None if t is None else t.float()  # noqa: E731
    ref32 = f(up(x), up(w), up(b))
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref32, rtol=1e-4, atol=1e-5)
        return
    ref_lp = f(x, w, b)
    err, torch_err = (out.float() - ref32).abs().max().item(), (ref_lp.float() - ref32).abs().max().item()
    assert err <= 2 * torch_err + atol, f"error {err:.3g} > 2 * torch's {torch_err:.3g} + {atol}"


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_odd_shapes(triton_device, shape, epilogue, bias, dtype, atol):
    x, w, b = make(shape, epilogue, dtype, triton_device, bias)
    check(ours(epilogue, x, w, b), x, w, b, epilogue, dtype, atol)


@pytest.mark.parametrize("shape", REAL_SLICES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_real_width_slices(triton_device, shape, epilogue, dtype, atol):
    x, w, b = make(shape, epilogue, dtype, triton_device)
    check(ours(epilogue, x, w, b), x, w, b, epilogue, dtype, atol)


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_leading_dims(triton_device, epilogue, dtype, atol):
    x, w, b = make((0, 64, 33), epilogue, dtype, triton_device, lead=(2, 5))
    check(ours(epilogue, x, w, b), x, w, b, epilogue, dtype, atol)


@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_strided_rows(triton_device, dtype, atol):
    """x a column slice of a wider buffer (row stride 77 != K): read in place, no copy needed."""
    big = torch.randn(37, 77, device=triton_device).to(dtype)
    x = big[:, 3:67]
    w = (torch.randn(40, 64, device=triton_device) * 0.125).to(dtype)
    b = torch.randn(40, device=triton_device).to(dtype)
    for epilogue in ("none", "gelu"):
        check(ours(epilogue, x, w, b), x, w, b, epilogue, dtype, atol)


@pytest.mark.parametrize("epilogue", ["none", "swiglu"])
def test_many_small_tiles_grouped_order(triton_device, epilogue):
    """A forced 16x16x16 tile over a 9x7 tile grid with GROUP_M = 2 (the last group partial): every tile is
    visited exactly once (NaN-poisoned output fully written, values right)."""
    x, w, b = make((130, 70, 100), epilogue, torch.float32, triton_device)
    cfg = gemm.GemmConfig(16, 16, 16, 2, 4, 1)
    out = gemm.gemm(x, w, b, epilogue, config=cfg)
    check(out, x, w, b, epilogue, torch.float32, 0.0)


def test_config_table():
    bf16 = torch.bfloat16
    assert gemm.pick_config(4096, 3840, 1280, bf16)[:3] == (128, 256, 64)
    assert gemm.pick_config(4096, 1280, 5120, bf16)[:3] == (128, 128, 64)
    assert gemm.pick_config(4096, 5120, 1280, bf16, "quick_gelu")[:5] == (128, 128, 64, 8, 8)  # 128x256 spills
    assert gemm.pick_config(4096, 3420, 1280, bf16, "swiglu")[:5] == (128, 128, 64, 8, 8)
    assert gemm.pick_config(64, 3584, 3584, bf16)[:2] == (64, 128)
    assert gemm.pick_config(1, 3584, 3584, bf16).block_n == 32  # 56 tiles of 64 would leave SMs idle
    assert gemm.pick_config(1, 152064, 3584, bf16).block_n == 64
    assert gemm.pick_config(3, 5, 17, torch.float32)[:3] == (16, 16, 32)  # shrunk to the problem
    assert gemm._stride_align(3420, 3420, 1280) == 4 and gemm._stride_align(1280, 5120) == 16


def test_bad_arguments(triton_device):
    x = torch.randn(3, 8, device=triton_device)
    w = torch.randn(5, 8, device=triton_device)
    with pytest.raises(ValueError, match="act must be one of"):
        gemm.linear_act(x, w, None, "relu")
    with pytest.raises(ValueError, match="even row count"):
        gemm.gemm(x, w, None, "swiglu")
    with pytest.raises(TypeError, match="share a dtype"):
        gemm.gemm(x, w.half())
    with pytest.raises(ValueError, match="do not match"):
        gemm.gemm(x, torch.randn(5, 9, device=triton_device))


def test_custom_op_traces_as_one_node(triton_device):
    """register_fake gives torch.compile the output shape without running the kernel (R6)."""
    x, w, b = make((0, 32, 24), "swiglu", torch.float32, triton_device, lead=(2, 3))
    compiled = torch.compile(lambda x, w, b: gemm.linear_swiglu(x, w, b) + 1, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b), gemm.linear_swiglu(x, w, b) + 1)
    torch.library.opcheck(torch.ops.qwen2vl_fast.linear_triton.default, (x, w, b, "gelu"),
                          test_utils=("test_schema", "test_faketensor"))


# -------------------------------------------------------------------------------------------- merger
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_merger(triton_device, norm, dtype, atol):
    """LayerNorm (Qwen2-VL) / RMSNorm (Qwen2.5-VL) + fc1 + exact GELU + fc2 on 4 * 9 tokens of width 32."""
    e, out_dim, dev = 32, 40, triton_device
    x = torch.randn(36, e, device=dev).to(dtype)
    ln_w = (1 + 0.1 * torch.randn(e, device=dev)).to(dtype)
    ln_b = (0.1 * torch.randn(e, device=dev)).to(dtype) if norm == "layer_norm" else None
    fc1_w = (torch.randn(4 * e, 4 * e, device=dev) * (4 * e) ** -0.5).to(dtype)
    fc1_b = (0.1 * torch.randn(4 * e, device=dev)).to(dtype)
    fc2_w = (torch.randn(out_dim, 4 * e, device=dev) * (4 * e) ** -0.5).to(dtype)
    fc2_b = (0.1 * torch.randn(out_dim, device=dev)).to(dtype)
    args = (x, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b)
    out = resolve("triton", dev).merger(*args, 1e-6)
    op = get_op("merger").reference
    ref32 = op(*[None if a is None else a.float() for a in args], 1e-6)
    assert out.shape == (9, out_dim) and out.dtype == dtype and torch.isfinite(out).all()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref32, rtol=1e-4, atol=1e-5)
    else:
        err = (out.float() - ref32).abs().max().item()
        torch_err = (op(*args, 1e-6).float() - ref32).abs().max().item()
        assert err <= 2 * torch_err + atol


def test_registry_picks_triton(triton_device):
    chosen = resolve("triton", triton_device).chosen
    for name in ("linear", "linear_act", "linear_swiglu", "merger"):
        assert chosen[name] == "triton", name
