"""Triton vision rotary (kernels/rotary.py) against the reference qwen2vl_fast.ops.rotary.vision_rotary.

The kernel rotates q and k in place inside the fused qkv buffer and returns views of it: checked are the
values (same fp32 math and one rounding as the reference: near-exact in every dtype), that v and any columns
past 3*H*D are untouched, and that q, k, v alias qkv. head_dim 80 (D/2 = 40, not a power of 2) with 16 heads
is the real Qwen2-VL / Qwen2.5-VL ViT shape. On the CPU this runs under the Triton interpreter.
"""

import math

import pytest
import torch
from conftest import TEST_DEVICE, float_dtypes

from qwen2vl_fast import ops
from qwen2vl_fast.ops import rotary as ref

K = pytest.importorskip("qwen2vl_fast.kernels.rotary", reason="triton is not installed")

DTYPES = [pytest.param(dt, atol, rtol, id=str(dt).split(".")[-1]) for dt, atol, rtol in float_dtypes(TEST_DEVICE)]
# S, heads, head_dim: odd token counts, small and large head dims, then the real ViT (16 heads of 80)
SHAPES = [(1, 16, 80), (37, 16, 80), (257, 16, 80), (3, 2, 16), (5, 4, 32), (7, 3, 128), (13, 1, 80)]

from helpers_triton import ptx_for_sm90


def tables(s, d, device, real=True):
    """cos/sin (S, D) fp32: the real layout (angles repeated over the halves, as positions.py builds them) or
    independent random values in every column (so a kernel mixing up the halves' tables cannot pass)."""
    if real:
        inv_freq = 1.0 / 10000 ** (torch.arange(0, d // 2, 2, dtype=torch.float32, device=device) / (d // 2))
        pos = torch.randint(0, 64, (s, 2), device=device).float()
        freqs = torch.cat([pos[:, :1] * inv_freq, pos[:, 1:] * inv_freq], dim=-1)  # 2D: (h, w) halves
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()
    theta = torch.rand(s, d, device=device) * 2 * math.pi
    return theta.cos() * 1.3, theta.sin() * 0.7


# every shape on the real tables, the short ones on random tables too (the interpreter is slow)
CASES = [(s, h, d, real) for s, h, d in SHAPES for real in (True, False) if real or s <= 64]


@pytest.mark.parametrize("s, h, d, real", CASES)
@pytest.mark.parametrize("dtype", [p.values[0] for p in DTYPES], ids=[p.id for p in DTYPES])
def test_vision_rotary_matches_reference_in_place(triton_device, s, h, d, dtype, real):
    qkv = (torch.randn(s, 3 * h * d, device=triton_device) * 2).to(dtype)
    cos, sin = tables(s, d, triton_device, real)
    q_ref, k_ref, v_ref = ref.vision_rotary(qkv, cos, sin, h)
    v_before = qkv[:, 2 * h * d:].clone()
    buf = qkv.clone()
    q, k, v = K.vision_rotary(buf, cos, sin, h)

    assert q.shape == k.shape == v.shape == (s, h, d) and q.dtype == dtype
    # Views of the buffer, in its q | k | v column order.
    esz = buf.element_size()
    assert [t.data_ptr() for t in (q, k, v)] == [buf.data_ptr() + i * h * d * esz for i in range(3)]
    assert torch.equal(buf[:, 2 * h * d:], v_before), "v must be untouched"
    assert torch.equal(v, v_ref)
    assert torch.equal(buf[:, :h * d].view(s, h, d), q)
    # Same fp32 operations (no FMA contraction), one rounding: bit-identical to the reference.
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref), (
        f"max diff q {(q.float() - q_ref.float()).abs().max():.3e}, k {(k.float() - k_ref.float()).abs().max():.3e}")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_row_strided_qkv_leaves_other_columns_alone(triton_device, dtype, atol, rtol):
    """qkv as a column slice of a wider buffer: rows read through the row stride, nothing else written."""
    s, h, d = 9, 4, 80
    big = torch.randn(s, 3 * h * d + 24, device=triton_device).to(dtype)
    before = big.clone()
    qkv = big[:, 8:8 + 3 * h * d]
    cos, sin = tables(s, d, triton_device, real=False)
    q_ref, k_ref, _ = ref.vision_rotary(qkv.clone(), cos, sin, h)
    q, k, v = K.vision_rotary(qkv, cos, sin, h)
    assert torch.equal(big[:, :8], before[:, :8]) and torch.equal(big[:, 8 + 3 * h * d:], before[:, 8 + 3 * h * d:])
    assert torch.equal(v, before[:, 8 + 2 * h * d:8 + 3 * h * d].view(s, h, d))
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=atol, rtol=rtol)
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(k, k_ref, **tol)


def test_zero_tokens(triton_device):
    q, k, v = K.vision_rotary(torch.empty(0, 3 * 2 * 16, device=triton_device),
                              torch.empty(0, 16, device=triton_device), torch.empty(0, 16, device=triton_device), 2)
    assert q.shape == (0, 2, 16)


def test_bad_arguments_raise(triton_device):
    s, h, d = 4, 2, 16
    qkv, (cos, sin) = torch.randn(s, 3 * h * d, device=triton_device), tables(s, d, triton_device)
    with pytest.raises(ValueError, match="not 3 \\* num_heads"):
        K.vision_rotary(qkv, cos, sin, 5)
    with pytest.raises(ValueError, match="cos must be"):
        K.vision_rotary(qkv, cos.half(), sin, h)
    with pytest.raises(ValueError, match="sin must be"):
        K.vision_rotary(qkv, cos, sin[:, :8], h)
    with pytest.raises(ValueError, match="must be even"):
        K.vision_rotary(torch.randn(s, 3 * h * 15, device=triton_device), cos[:, :15], sin[:, :15], h)
    with pytest.raises(ValueError, match="contiguous last dim"):
        K.vision_rotary(torch.randn(3 * h * d, s, device=triton_device).t(), cos, sin, h)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        K.vision_rotary(qkv.double(), cos, sin, h)


def test_custom_op_declares_its_mutation(triton_device):
    s, h, d = 3, 2, 16
    cos, sin = tables(s, d, triton_device, real=False)
    torch.library.opcheck(torch.ops.qwen2vl_fast.vision_rotary_triton.default,
                          (torch.randn(s, 3 * h * d, device=triton_device), cos, sin, h))


def test_compiles_as_one_node(triton_device):
    s, h, d = 5, 2, 16
    qkv = torch.randn(s, 3 * h * d, device=triton_device)
    cos, sin = tables(s, d, triton_device, real=False)

    def f(qkv, cos, sin):
        q, k, v = K.vision_rotary(qkv, cos, sin, h)
        return q * 2, k + 1, v

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(qkv.clone(), cos, sin)
    q_ref, k_ref, v_ref = ref.vision_rotary(qkv, cos, sin, h)
    torch.testing.assert_close(got[0], q_ref * 2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], k_ref + 1, atol=1e-6, rtol=1e-6)
    assert torch.equal(got[2], v_ref)


def test_registry_picks_triton(triton_device):
    table = ops.resolve("triton", triton_device)
    assert table.chosen["vision_rotary"] == "triton"
    if triton_device.type == "cpu":
        assert ops.resolve("auto", "cpu").chosen["vision_rotary"] == "torch"
    s, h, d = 11, 16, 80
    qkv, (cos, sin) = torch.randn(s, 3 * h * d, device=triton_device), tables(s, d, triton_device)
    q_ref, k_ref, _ = ref.vision_rotary(qkv, cos, sin, h)
    q, k, _ = table.vision_rotary(qkv.clone(), cos, sin, h)
    torch.testing.assert_close(q, q_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k, k_ref, atol=1e-6, rtol=1e-6)


def test_compiles_for_hopper_with_vector_loads(tmp_path):
    """head_dim 80 (D/2 = 40 in a 64-lane block) and 128 compile for sm_90 in bf16 with 16-byte loads and
    stores: HALF is a compile-time constant precisely so the 40-element halves stay vectorised."""
    sig = {"QKV": "*bf16", "qkv_stride": "i32", "COS": "*fp32", "cos_stride": "i32", "SIN": "*fp32",
           "sin_stride": "i32", "NUM_QK_HEADS": "i32", "HALF": "constexpr", "BLOCK_H": "constexpr",
           "BLOCK_HALF": "constexpr"}
    aligned = ["QKV", "qkv_stride", "COS", "cos_stride", "SIN", "sin_stride", "NUM_QK_HEADS"]
    jobs = [[K.__name__, "_vision_rotary_kernel", sig, dict(HALF=half, BLOCK_H=32, BLOCK_HALF=block), 4, aligned]
            for half, block in ((40, 64), (64, 64))]
    for ptx in ptx_for_sm90(jobs, tmp_path):
        assert "ld.global.v4" in ptx and "st.global.v4" in ptx
