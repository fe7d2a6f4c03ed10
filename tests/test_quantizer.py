"""RTN and GPTQ quantizers (qwen2vl_fast.quant.quantizer): validity of the QuantizedWeight they produce, the
RTN error bound, GPTQ against RTN on correlated calibration data, GPTQ against a direct (non-Cholesky)
implementation of the same update rule, act-order permutation semantics and determinism.  CPU only."""

import pytest
import torch

from qwen2vl_fast.errors import InputError
from qwen2vl_fast.quant.quantizer import HessianAccumulator, collect_hessian, quantize_gptq, quantize_rtn
from qwen2vl_fast.quant.weight import QuantizedWeight, dequantize, unpack_int32

N, K = 64, 256


def _layer(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen)
    # correlated calibration inputs: X = Z @ A with a random mixing A, so H is far from diagonal; a per-input
    # scale spread makes diag(H) uneven (what act_order exploits)
    a = torch.randn(K, K, generator=gen) / K**0.5 + 0.3 * torch.eye(K)
    spread = torch.exp(torch.randn(K, generator=gen))
    x = (torch.randn(2048, K, generator=gen) @ a) * spread
    return w, x


@pytest.fixture(scope="module")
def layer():
    w, x = _layer()
    return w, x, collect_hessian([x[:1000], x[1000:]])


def _check_valid(qw: QuantizedWeight, bits, group_size, sym, n=N, k=K):
    assert isinstance(qw, QuantizedWeight)
    assert qw.qweight.dtype == torch.int32 and qw.qweight.shape == (k * bits // 32, n)
    assert qw.bits == bits and qw.group_size == group_size
    assert qw.in_features == k and qw.out_features == n
    g = k if group_size == -1 else group_size
    assert qw.scales.shape == qw.zeros.shape == (k // g, n)
    assert (qw.scales > 0).all()
    q = unpack_int32(qw.qweight, bits)
    assert q.min() >= 0 and q.max() < 2**bits
    z = qw.zeros.float()
    assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 2**bits - 1
    if sym:
        assert (z == 2 ** (bits - 1)).all()
    if qw.perm is not None:
        assert qw.perm.dtype == torch.int64 and qw.perm.shape == (k,)
        assert torch.equal(torch.sort(qw.perm).values, torch.arange(k))


def _out_err(x, w, wq):
    return (x @ w.t() - x @ wq.t()).norm().item()


# ---------------------------------------------------------------------------------------------------- RTN

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [128, 64, 32, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_round_trip_within_half_scale(bits, group_size, sym):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(1)) * 0.05
    w[3, :40] = 0.0  # an all-zero group (for group 32) and a zero-heavy one
    w[5] += 0.2  # an all-positive row: the range must still hold 0
    qw = quantize_rtn(w, bits, group_size, sym)
    _check_valid(qw, bits, group_size, sym)
    assert qw.perm is None
    g = K if group_size == -1 else group_size
    scale_per_elem = qw.scales.float().repeat_interleave(g, dim=0).t()  # (N, K)
    err = (dequantize(qw, torch.float32) - w).abs()
    assert (err <= scale_per_elem / 2 * (1 + 1e-5) + 1e-7).all()
    assert torch.equal(dequantize(qw, torch.float32)[3, :40], torch.zeros(40))  # 0 is always exact


def test_rtn_conventions():
    # one group [-1, 0, 2] -> asym: s = 3/15, z = round(1/0.2) = 5; sym: a = 2, s = 4/15, z = 8
    w = torch.tensor([[-1.0, 0.0, 2.0, 0.6, 0.0, 0.0, 0.0, 0.0]])
    qa = quantize_rtn(w, 4, -1, sym=False)
    assert qa.scales.item() == pytest.approx(0.2) and qa.zeros.item() == 5
    qs = quantize_rtn(w, 4, -1, sym=True)
    assert qs.scales.item() == pytest.approx(4 / 15) and qs.zeros.item() == 8
    assert unpack_int32(qa.qweight, 4)[:, 0].tolist() == [0, 5, 15, 8, 5, 5, 5, 5]


def test_rtn_keeps_dtype_and_is_exact_in_it():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    qw = quantize_rtn(w, 4, 64)
    assert qw.scales.dtype == qw.zeros.dtype == torch.bfloat16
    scale = qw.scales.float().repeat_interleave(64, dim=0).t()
    assert ((dequantize(qw, torch.float32) - w.float()).abs() <= scale / 2 * (1 + 1e-5)).all()


# --------------------------------------------------------------------------------------------------- GPTQ

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [64, -1])
def test_gptq_beats_rtn(layer, bits, sym, act_order, group_size):
    w, x, h = layer
    rtn = quantize_rtn(w, bits, group_size, sym)
    qw = quantize_gptq(w, h, bits, group_size, sym, act_order=act_order)
    _check_valid(qw, bits, group_size, sym)
    assert (qw.perm is not None) == act_order
    e_rtn = _out_err(x, w, dequantize(rtn, torch.float32))
    e_gptq = _out_err(x, w, dequantize(qw, torch.float32))
    assert e_gptq < 0.85 * e_rtn, (e_gptq, e_rtn)


def test_gptq_act_order_helps_on_uneven_hessian(layer):
    w, x, h = layer
    plain = _out_err(x, w, dequantize(quantize_gptq(w, h, 4, 64), torch.float32))
    ordered = _out_err(x, w, dequantize(quantize_gptq(w, h, 4, 64, act_order=True), torch.float32))
    assert ordered < plain


def test_gptq_act_order_perm_semantics(layer):
    w, _, h = layer
    qw = quantize_gptq(w, h, 8, 64, act_order=True)
    assert torch.equal(qw.perm, torch.argsort(torch.diagonal(h), descending=True, stable=True))
    # stored row i holds original input perm[i]: dequantizing without un-permuting gives w[:, perm]
    raw = QuantizedWeight(qw.qweight, qw.scales, qw.zeros, qw.bits, qw.group_size, None)
    dense = dequantize(qw, torch.float32)
    assert torch.equal(dequantize(raw, torch.float32), dense[:, qw.perm])
    # 8-bit: the dequantized weight is close to the original in the original column order
    assert (dense - w).abs().max() < 0.1
    # the runtime convention: x[:, perm] @ raw^T == x @ dense^T
    xx = torch.randn(5, K)
    torch.testing.assert_close(xx[:, qw.perm] @ dequantize(raw, torch.float32).t(), xx @ dense.t())


def _gptq_direct(w, h, bits, group_size, sym, damp=0.01):
    """The paper's update written directly with the full inverse Hessian (OBQ-style elimination, one column
    at a time, no Cholesky, no blocks); group parameters from the current weights at each group's start."""
    from qwen2vl_fast.quant.quantizer import _params, _quant

    w = w.double().clone()
    h = h.double().clone()
    k = h.shape[0]
    g = k if group_size == -1 else group_size
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    out = torch.zeros_like(w)
    for c in range(k):
        if c % g == 0:
            scale, zero = _params(w[:, c:c + g].float(), bits, sym, torch.float32)
            scale, zero = scale.double(), zero.double()
        q = _quant(w[:, c], scale, zero, 2**bits - 1)
        out[:, c] = (q - zero) * scale
        e = (w[:, c] - out[:, c]) / hinv[c, c]
        w[:, c + 1:] -= e[:, None] * hinv[c, c + 1:][None, :]
        hinv -= torch.outer(hinv[:, c], hinv[c, :]) / hinv[c, c]
    return out.float()


@pytest.mark.parametrize("group_size,sym", [(-1, False), (32, False), (32, True)])
def test_gptq_matches_direct_update(group_size, sym):
    gen = torch.Generator().manual_seed(3)
    n, k = 8, 64
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(512, k, generator=gen) @ (torch.randn(k, k, generator=gen) / k**0.5 + 0.3 * torch.eye(k))
    h = collect_hessian([x])
    ref = _gptq_direct(w, h, 8, group_size, sym)
    # block 16 < group 32: groups span blocks, exercising the pending-update path of the group parameters
    got = dequantize(quantize_gptq(w, h, 8, group_size, sym, block_size=16), torch.float32)
    scale = (w.max() - w.min()).item() / 255
    close = (got - ref).abs() <= 1e-4
    # rare ties can round a value to the neighbouring level; everything else must agree
    assert close.float().mean() > 0.98
    assert ((got - ref).abs() <= 2.5 * scale).all()


def test_gptq_block_size_does_not_change_result(layer):
    w, x, h = layer
    a = dequantize(quantize_gptq(w, h, 4, 64, block_size=128), torch.float32)
    b = dequantize(quantize_gptq(w, h, 4, 64, block_size=32), torch.float32)
    c = dequantize(quantize_gptq(w, h, 4, 64, block_size=48), torch.float32)  # groups straddle blocks
    for other in (b, c):
        assert ((a - other).abs() > 1e-4).float().mean() < 0.01
        assert abs(_out_err(x, w, a) - _out_err(x, w, other)) < 0.02 * _out_err(x, w, a)


def test_gptq_deterministic(layer):
    w, _, h = layer
    a = quantize_gptq(w, h, 4, 64, act_order=True)
    b = quantize_gptq(w.clone(), h.clone(), 4, 64, act_order=True)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
    assert torch.equal(a.zeros, b.zeros) and torch.equal(a.perm, b.perm)
    r1, r2 = quantize_rtn(w, 4, 64), quantize_rtn(w, 4, 64)
    assert torch.equal(r1.qweight, r2.qweight) and torch.equal(r1.scales, r2.scales)


def test_gptq_does_not_modify_inputs(layer):
    w, _, h = layer
    w0, h0 = w.clone(), h.clone()
    quantize_gptq(w, h, 4, 64, act_order=True)
    assert torch.equal(w, w0) and torch.equal(h, h0)


def test_gptq_dead_inputs_and_singular_hessian():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(16, 64, generator=gen)
    x = torch.randn(32, 64, generator=gen)  # fewer tokens than inputs: H is singular without damping
    x[:, 5] = 0.0  # an input that never fires
    h = collect_hessian([x])
    qw = quantize_gptq(w, h, 4, 32)
    _check_valid(qw, 4, 32, False, n=16, k=64)
    assert (dequantize(qw, torch.float32)[:, 5] == 0).all()
    assert torch.isfinite(dequantize(qw, torch.float32)).all()


def test_gptq_bfloat16_weight(layer):
    w, x, h = layer
    qw = quantize_gptq(w.to(torch.bfloat16), h, 4, 128)
    assert qw.scales.dtype == torch.bfloat16
    assert _out_err(x, w, dequantize(qw, torch.float32)) < _out_err(x, w, dequantize(quantize_rtn(w, 4, 128),
                                                                                     torch.float32))


# ------------------------------------------------------------------------------------------------ Hessian

def test_collect_hessian():
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(10, 32, generator=gen), torch.randn(2, 3, 32, generator=gen)]
    h = collect_hessian(xs)
    x = torch.cat([xs[0], xs[1].reshape(-1, 32)]).double()
    torch.testing.assert_close(h, (2 * x.t() @ x / x.shape[0]).float())
    acc = HessianAccumulator(32)
    for t in xs:
        acc.add(t)
    assert acc.tokens == 16 and torch.equal(acc.hessian, h)
    with pytest.raises(InputError):
        acc.add(torch.randn(3, 31))
    with pytest.raises(InputError):
        collect_hessian([])


def test_bad_arguments():
    w = torch.randn(8, 64)
    with pytest.raises(InputError):
        quantize_rtn(w, 3, 32)
    with pytest.raises(InputError):
        quantize_rtn(w, 4, 48)
    with pytest.raises(InputError):
        quantize_rtn(w[0], 4, 32)
    with pytest.raises(InputError):
        quantize_gptq(w, torch.eye(32), 4, 32)
    with pytest.raises(InputError):
        quantize_rtn(torch.randn(8, 12), 4, -1)  # 12 is not a multiple of 8
