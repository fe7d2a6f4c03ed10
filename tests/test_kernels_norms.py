"""Triton norm kernels (kernels/norms.py) against the references in qwen2vl_fast.ops.norms.

fp32: near-exact (RMSNorm within a couple of ulps: only the sum's order differs from torch's); fp16 (bf16 on
CUDA): DESIGN.md's rule, error vs the fp32 reference <= 2x torch's own low-precision error + a small
tolerance. The fused residual sum must be bit-identical in every dtype. Outputs are NaN-poisoned buffers
passed as `out=`; the custom-op path (no `out=`) is checked as well. On the CPU this runs under the Triton
interpreter, so shapes stay at a few hundred rows.
"""


import pytest
import torch
from conftest import TEST_DEVICE, float_dtypes

from qwen2vl_fast import ops
from qwen2vl_fast.ops import norms as ref

K = pytest.importorskip("qwen2vl_fast.kernels.norms", reason="triton is not installed")

DTYPES = [pytest.param(dt, atol, rtol, id=str(dt).split(".")[-1]) for dt, atol, rtol in float_dtypes(TEST_DEVICE)]
# leading shape, width: odd rows and widths, then the models' widths (ViT 1280, LLM 1536 / 2048 / 3584 / 8192)
SHAPES = [((1,), 17), ((3,), 100), ((9,), 1000), ((2, 3), 33), ((37,), 1280), ((200,), 1280), ((5,), 1536),
          ((3, 5), 2048), ((7,), 3584), ((2,), 8192)]
EPS = 1e-6

from helpers_triton import ptx_for_sm90


def make(lead, n, dtype, device, scale=3.0):
    return (torch.randn(*lead, n, device=device) * scale + 0.5).to(dtype)


def poisoned(like):
    return torch.full_like(like, float("nan"), memory_format=torch.contiguous_format)


def assert_within_torch_error(ours, torch_lp, ref32, atol, rtol):
    """DESIGN.md: |ours - ref32| <= 2 |torch_lp - ref32| + atol + rtol |ref32|, elementwise, and the max error
    within twice torch's max error."""
    assert ours.shape == ref32.shape and ours.dtype == torch_lp.dtype
    assert torch.isfinite(ours).all()
    err, err_pt = (ours.double() - ref32.double()).abs(), (torch_lp.double() - ref32.double()).abs()
    bound = 2 * err_pt + atol + rtol * ref32.double().abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max():.3e}, ours {err.max():.3e}, torch {err_pt.max():.3e}"
    assert err.max() <= 2 * err_pt.max() + atol


def interpreter_cheap(x):
    """Whether to run the custom-op path too (the interpreter is slow: skip the repeat on the largest shapes)."""
    return x.device.type == "cuda" or x.numel() <= 1 << 17


def check(ours, dtype, torch_lp, ref32, atol, rtol, fp32_tol):
    if dtype == torch.float32:
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, torch_lp, **fp32_tol)
    else:
        assert_within_torch_error(ours, torch_lp, ref32, atol, rtol)
        # Same rounding steps as torch (RMSNorm rounds before the weight): close to torch's result too.
        torch.testing.assert_close(ours, torch_lp, atol=atol, rtol=rtol)


@pytest.mark.parametrize("lead, n", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_rms_norm(triton_device, lead, n, dtype, atol, rtol):
    x, w = make(lead, n, dtype, triton_device), (torch.rand(n, device=triton_device) * 2).to(dtype)
    out = K.rms_norm(x, w, EPS, out=poisoned(x))
    expected = ref.rms_norm(x, w, EPS)
    # fp32: torch sums x^2 in another order, so a row's rstd (and all its outputs) may differ by an ulp.
    check(out, dtype, expected, ref.rms_norm(x.float(), w.float(), EPS), atol, rtol, dict(atol=1e-6, rtol=1e-6))
    if interpreter_cheap(x):  # the custom-op path: the same kernel
        assert torch.equal(K.rms_norm(x, w, EPS), out)


@pytest.mark.parametrize("lead, n", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_layer_norm(triton_device, lead, n, dtype, atol, rtol):
    x = make(lead, n, dtype, triton_device)
    w, b = make((), n, dtype, triton_device, 1.0), make((), n, dtype, triton_device, 1.0)
    out = K.layer_norm(x, w, b, EPS, out=poisoned(x))
    check(out, dtype, ref.layer_norm(x, w, b, EPS), ref.layer_norm(x.float(), w.float(), b.float(), EPS),
          atol, rtol, dict(atol=1e-5, rtol=1e-5))
    if interpreter_cheap(x):
        assert torch.equal(K.layer_norm(x, w, b, EPS), out)


@pytest.mark.parametrize("lead, n", [((3,), 100), ((37,), 1280), ((2, 5), 3584)])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_layer_norm_without_bias(triton_device, lead, n, dtype, atol, rtol):
    x, w = make(lead, n, dtype, triton_device), make((), n, dtype, triton_device, 1.0)
    check(K.layer_norm(x, w, None, EPS), dtype, ref.layer_norm(x, w, None, EPS),
          ref.layer_norm(x.float(), w.float(), None, EPS), atol, rtol, dict(atol=1e-5, rtol=1e-5))


@pytest.mark.parametrize("lead, n", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_add_rms_norm(triton_device, lead, n, dtype, atol, rtol):
    x, r = make(lead, n, dtype, triton_device), make(lead, n, dtype, triton_device)
    w, r_before = (torch.rand(n, device=triton_device) * 2).to(dtype), r.clone()
    out, res = K.add_rms_norm(x, r, w, EPS, out=poisoned(x), residual_out=poisoned(x))
    exp_out, exp_res = ref.add_rms_norm(x, r, w, EPS)
    assert torch.equal(res, exp_res), "the residual sum must be rounded exactly like torch's"
    assert torch.equal(r, r_before), "residual must not be modified"
    check(out, dtype, exp_out, ref.rms_norm(exp_res.float(), w.float(), EPS), atol, rtol, dict(atol=1e-6, rtol=1e-6))
    if interpreter_cheap(x):
        out2, res2 = K.add_rms_norm(x, r, w, EPS)
        assert torch.equal(out2, out) and torch.equal(res2, res)


@pytest.mark.parametrize("lead, n", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_add_layer_norm(triton_device, lead, n, dtype, atol, rtol):
    x, r = make(lead, n, dtype, triton_device), make(lead, n, dtype, triton_device)
    w, b = make((), n, dtype, triton_device, 1.0), make((), n, dtype, triton_device, 1.0)
    out, res = K.add_layer_norm(x, r, w, b, EPS, out=poisoned(x), residual_out=poisoned(x))
    exp_out, exp_res = ref.add_layer_norm(x, r, w, b, EPS)
    assert torch.equal(res, exp_res)
    check(out, dtype, exp_out, ref.layer_norm(exp_res.float(), w.float(), b.float(), EPS), atol, rtol,
          dict(atol=1e-5, rtol=1e-5))
    if interpreter_cheap(x):
        out2, res2 = K.add_layer_norm(x, r, w, b, EPS)
        assert torch.equal(out2, out) and torch.equal(res2, res)


def test_row_strided_and_non_mergeable_inputs(triton_device):
    """Rows read through a row stride (a column slice of a wider buffer); a permuted 3D input (leading dims
    that cannot merge) is copied once and still right."""
    n = 100
    big = torch.randn(37, 160, device=triton_device)
    x, w, b = big[:, 7:7 + n], torch.randn(n, device=triton_device), torch.randn(n, device=triton_device)
    r = torch.randn(37, 2 * n, device=triton_device)[:, n:]
    torch.testing.assert_close(K.rms_norm(x, w, EPS), ref.rms_norm(x, w, EPS), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(K.layer_norm(x, w, b, EPS), ref.layer_norm(x, w, b, EPS), atol=1e-5, rtol=1e-5)
    out, res = K.add_rms_norm(x, r, w, EPS)
    exp_out, exp_res = ref.add_rms_norm(x, r, w, EPS)
    assert torch.equal(res, exp_res) and out.is_contiguous()
    torch.testing.assert_close(out, exp_out, atol=1e-6, rtol=1e-6)
    x3 = torch.randn(5, 3, n, device=triton_device).transpose(0, 1)
    torch.testing.assert_close(K.layer_norm(x3, w, b, EPS), ref.layer_norm(x3, w, b, EPS), atol=1e-5, rtol=1e-5)


def test_zero_rows(triton_device):
    x, w = torch.empty(0, 64, device=triton_device), torch.ones(64, device=triton_device)
    assert K.rms_norm(x, w, EPS).shape == (0, 64)
    out, res = K.add_layer_norm(x, x, w, w, EPS)
    assert out.shape == res.shape == (0, 64)


def test_bad_arguments_raise(triton_device):
    x = torch.randn(4, 64, device=triton_device)
    w = torch.ones(64, device=triton_device)
    with pytest.raises(ValueError, match="weight"):
        K.rms_norm(x, torch.ones(65, device=triton_device), EPS)
    with pytest.raises(ValueError, match="weight"):
        K.rms_norm(x, w.half(), EPS)
    with pytest.raises(ValueError, match="contiguous last dim"):
        K.rms_norm(torch.randn(64, 4, device=triton_device).t(), w, EPS)
    with pytest.raises(ValueError, match="residual must match"):
        K.add_rms_norm(x, torch.randn(4, 64, device=triton_device).half(), w, EPS)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        K.layer_norm(x.double(), w.double(), None, EPS)
    with pytest.raises(ValueError, match="outside"):
        K.rms_norm(torch.randn(1, K.MAX_WIDTH + 1, device=triton_device),
                   torch.ones(K.MAX_WIDTH + 1, device=triton_device), EPS)
    with pytest.raises(ValueError, match="out must be"):
        K.rms_norm(x, w, EPS, out=torch.empty(4, 63, device=triton_device))


def test_custom_ops_pass_opcheck(triton_device):
    """Schema, fake (meta) implementation and AOT dispatch are consistent: torch.compile / CUDA graphs see one
    node per call."""
    x, r = torch.randn(3, 17, device=triton_device), torch.randn(3, 17, device=triton_device)
    w, b = torch.randn(17, device=triton_device), torch.randn(17, device=triton_device)
    q = torch.ops.qwen2vl_fast
    torch.library.opcheck(q.layer_norm_triton.default, (x, w, b, EPS))
    torch.library.opcheck(q.rms_norm_triton.default, (x, w, EPS))
    torch.library.opcheck(q.add_layer_norm_triton.default, (x, r, w, None, EPS))
    torch.library.opcheck(q.add_rms_norm_triton.default, (x, r, w, EPS))


def test_compiles_as_one_node(triton_device):
    x, r, w = (torch.randn(5, 40, device=triton_device), torch.randn(5, 40, device=triton_device),
               torch.randn(40, device=triton_device))

    def f(x, r, w):
        h, r2 = K.add_rms_norm(x, r, w, EPS)
        return h * 2, r2

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, r, w)
    exp = ref.add_rms_norm(x, r, w, EPS)
    torch.testing.assert_close(got[0], exp[0] * 2, atol=1e-6, rtol=1e-6)
    assert torch.equal(got[1], exp[1])


def test_registry_picks_triton(triton_device):
    table = ops.resolve("triton", triton_device)
    names = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
    assert all(table.chosen[n] == "triton" for n in names), table.chosen
    if triton_device.type == "cpu":  # the interpreter is for tests: auto never picks it
        assert all(ops.resolve("auto", "cpu").chosen[n] == "torch" for n in names)
    x, r, w = (torch.randn(3, 1280, device=triton_device), torch.randn(3, 1280, device=triton_device),
               torch.randn(1280, device=triton_device))
    out, res = table.add_rms_norm(x, r, w, EPS)
    exp_out, exp_res = ref.add_rms_norm(x, r, w, EPS)
    assert torch.equal(res, exp_res)
    torch.testing.assert_close(out, exp_out, atol=1e-6, rtol=1e-6)


def test_compiles_for_hopper_with_vector_loads(tmp_path):
    """The real launch configs (ViT 1280, LLM 3584 and 8192) compile for sm_90 in bf16 and move rows with
    16-byte loads and stores."""
    ptr = "*bf16"
    sig = {"X": ptr, "x_stride": "i32", "R": ptr, "r_stride": "i32", "W": ptr, "B": ptr, "Y": ptr, "y_stride": "i32",
           "RES": ptr, "res_stride": "i32", "n_rows": "i32", "N": "i32", "eps": "fp32", "IS_RMS": "constexpr",
           "HAS_RESIDUAL": "constexpr", "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    aligned = ["X", "x_stride", "R", "r_stride", "W", "B", "Y", "y_stride", "RES", "res_stride", "N"]
    jobs = []
    for n, is_rms, has_residual in ((1280, False, True), (1280, False, False), (3584, True, True), (8192, True, False)):
        block_m, block_n, num_warps = K._launch_config(n)
        consts = dict(IS_RMS=is_rms, HAS_RESIDUAL=has_residual, HAS_BIAS=not is_rms, BLOCK_M=block_m, BLOCK_N=block_n)
        jobs.append([K.__name__, "_norm_kernel", sig, consts, num_warps, aligned])
    for ptx in ptx_for_sm90(jobs, tmp_path):
        assert "ld.global.v4" in ptx and "st.global.v4" in ptx
