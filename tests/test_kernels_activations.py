"""Triton activations (kernels/activations.py) against the references in qwen2vl_fast.ops.activations.

fp32: within a few ulps (exp/erf implementations differ); fp16 (bf16 on CUDA): DESIGN.md's rule, error vs the
fp32 reference <= 2x torch's own fp16 error + a small tolerance, elementwise. The kernels compute in fp32 and
round once, so they are usually *more* accurate than torch, which rounds after every op in 16-bit. Outputs are
NaN-poisoned buffers passed as `out=`; the custom-op path is checked as well. On the CPU this runs under the
Triton interpreter, so shapes stay small.
"""


import pytest
import torch
from conftest import TEST_DEVICE, float_dtypes

from qwen2vl_fast import ops
from qwen2vl_fast.ops import activations as ref

K = pytest.importorskip("qwen2vl_fast.kernels.activations", reason="triton is not installed")

DTYPES = [pytest.param(dt, atol, rtol, id=str(dt).split(".")[-1]) for dt, atol, rtol in float_dtypes(TEST_DEVICE)]
# odd sizes (including a tail smaller than a block), then the ViT MLP (1280 -> 5120) and merger (5120) widths
SHAPES = [(17,), (3, 100), (37, 1000), (2, 3, 33), (37, 1280), (200, 5120)]
# (rows..., I): odd I, Qwen2.5-VL's ViT (I = 3420) and the 7B LLM (I = 18944)
SWIGLU_SHAPES = [(1, 17), (3, 100), (2, 5, 33), (37, 3420), (3, 18944)]

from helpers_triton import ptx_for_sm90


def assert_within_torch_error(ours, torch_lp, ref32, atol, rtol):
    """DESIGN.md: |ours - ref32| <= 2 |torch_lp - ref32| + atol + rtol |ref32|, elementwise."""
    assert ours.shape == ref32.shape and ours.dtype == torch_lp.dtype
    assert torch.isfinite(ours).all()
    err, err_pt = (ours.double() - ref32.double()).abs(), (torch_lp.double() - ref32.double()).abs()
    bound = 2 * err_pt + atol + rtol * ref32.double().abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max():.3e}, ours {err.max():.3e}, torch {err_pt.max():.3e}"


def check(ours, x_or_gu, name, atol, rtol):
    fn = getattr(ref, name)
    if ours.dtype == torch.float32:
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, fn(x_or_gu), atol=atol, rtol=rtol)
    else:
        assert_within_torch_error(ours, fn(x_or_gu), fn(x_or_gu.float()), atol, rtol)


@pytest.mark.parametrize("name", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_gelus(triton_device, name, shape, dtype, atol, rtol):
    x = (torch.randn(*shape, device=triton_device) * 3).to(dtype)
    out = getattr(K, name)(x, out=torch.full_like(x, float("nan")))
    check(out, x, name, atol, rtol)
    if x.numel() <= 1 << 17:  # the custom-op path: the same kernel (skipped on the largest interpreter shape)
        assert torch.equal(getattr(K, name)(x), out)


@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_silu_and_mul(triton_device, shape, dtype, atol, rtol):
    *lead, i = shape
    gu = (torch.randn(*lead, 2 * i, device=triton_device) * 3).to(dtype)
    out = K.silu_and_mul(gu, out=torch.full((*lead, i), float("nan"), dtype=dtype, device=triton_device))
    assert out.shape == (*lead, i)
    check(out, gu, "silu_and_mul", atol, rtol)
    assert torch.equal(K.silu_and_mul(gu), out)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_silu_and_mul_row_strided(triton_device, dtype, atol, rtol):
    """gate|up as a column slice of a wider buffer (rows read through the row stride, no copies)."""
    i = 100
    gu = (torch.randn(7, 2 * i + 30, device=triton_device) * 3).to(dtype)[:, 10:10 + 2 * i]
    check(K.silu_and_mul(gu), gu, "silu_and_mul", atol, rtol)


def test_empty_inputs(triton_device):
    assert K.gelu(torch.empty(0, 8, device=triton_device)).shape == (0, 8)
    assert K.silu_and_mul(torch.empty(0, 8, device=triton_device)).shape == (0, 4)


def test_bad_arguments_raise(triton_device):
    x = torch.randn(4, 64, device=triton_device)
    with pytest.raises(ValueError, match="contiguous"):
        K.quick_gelu(x.t())
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        K.gelu(x.double())
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\*I\)"):
        K.silu_and_mul(torch.randn(4, 63, device=triton_device))
    with pytest.raises(ValueError, match="contiguous last dim"):
        K.silu_and_mul(torch.randn(64, 4, device=triton_device).t())
    with pytest.raises(ValueError, match="out must be"):
        K.silu_and_mul(x, out=torch.empty(4, 64, device=triton_device))


def test_custom_ops_pass_opcheck(triton_device):
    x = torch.randn(3, 34, device=triton_device)
    q = torch.ops.qwen2vl_fast
    for op in (q.quick_gelu_triton, q.gelu_triton, q.silu_and_mul_triton):
        torch.library.opcheck(op.default, (x,))


def test_compiles_as_one_node(triton_device):
    gu = torch.randn(5, 2 * 40, device=triton_device)
    got = torch.compile(lambda t: K.gelu(K.silu_and_mul(t)), backend="aot_eager", fullgraph=True)(gu)
    torch.testing.assert_close(got, ref.gelu(ref.silu_and_mul(gu)), atol=1e-5, rtol=1e-5)


def test_registry_picks_triton(triton_device):
    names = ("quick_gelu", "gelu", "silu_and_mul")
    table = ops.resolve("triton", triton_device)
    assert all(table.chosen[n] == "triton" for n in names), table.chosen
    if triton_device.type == "cpu":
        assert all(ops.resolve("auto", "cpu").chosen[n] == "torch" for n in names)
    gu = torch.randn(3, 2 * 1280, device=triton_device)
    torch.testing.assert_close(table.silu_and_mul(gu), ref.silu_and_mul(gu), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(table.quick_gelu(gu), ref.quick_gelu(gu), atol=1e-5, rtol=1e-5)


def test_compiles_for_hopper_with_vector_loads(tmp_path):
    """Both kernels (both GELUs) compile for sm_90 in bf16 and stream with 16-byte loads and stores."""
    gelu_sig = {"X": "*bf16", "Y": "*bf16", "n": "i32", "QUICK": "constexpr", "BLOCK": "constexpr"}
    silu_sig = {"GU": "*bf16", "gu_stride": "i32", "Y": "*bf16", "y_stride": "i32", "I": "i32", "BLOCK": "constexpr"}
    jobs = [[K.__name__, "_gelu_kernel", gelu_sig, dict(QUICK=quick, BLOCK=K._BLOCK), K._NUM_WARPS, ["X", "Y", "n"]]
            for quick in (True, False)]
    jobs.append([K.__name__, "_silu_and_mul_kernel", silu_sig, dict(BLOCK=K._BLOCK), K._NUM_WARPS,
                 ["GU", "gu_stride", "Y", "y_stride", "I"]])
    for ptx in ptx_for_sm90(jobs, tmp_path):
        assert "ld.global.v4" in ptx and "st.global.v4" in ptx
