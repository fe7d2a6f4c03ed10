"""Triton M-RoPE (kernels/mrope.py) against the references: ops.decoding.rope_kv_write fed by
ops.rotary.mrope_cos_sin, ops.rotary.apply_rotary, ops.rotary.mrope_cos_sin.

rope_kv_write rotates q and k in place inside the qkv projection output and writes rotated k and v to the cache
rows [slot, position]. It emulates the reference's dtype arithmetic (each product and the sum rounded), so it
must be bit-identical in fp32 and fp16 (bf16 on CUDA): checked with torch.equal, together with the aliasing, the
untouched v columns and every cache cell outside the written (slot, position) pairs (sentinel-filled).

The fused entry point mrope_kv_write computes cos/sin in the kernel. Its tables come from the kernel's libm
(libdevice on CUDA, like torch's; numpy under the interpreter, 1 fp32 ulp off torch's SLEEF on ~15% of angles),
so it is checked in two steps: it equals rope_kv_write on tables made with the kernel's libm (`kernel_tables`),
and those tables are within 1 ulp of the model dtype of mrope_cos_sin's.

Shapes: Qwen2-VL-2B (12 q / 2 kv heads), 7B (28 / 4), head_dim 128, sections [16, 24, 24]; head_dim 64 and the
tiny preset's 16 with [2, 3, 3]; odd token counts. On the CPU this runs under the Triton interpreter.
"""

import numpy as np
import pytest
import torch
from conftest import TEST_DEVICE, float_dtypes

from qwen2vl_fast import ops
from qwen2vl_fast.ops import decoding as dec
from qwen2vl_fast.ops import rotary as ref

K = pytest.importorskip("qwen2vl_fast.kernels.mrope", reason="triton is not installed")

from helpers_triton import ptx_for_sm90  # noqa: E402

DTYPES = [pytest.param(dt, id=str(dt).split(".")[-1]) for dt, _, _ in float_dtypes(TEST_DEVICE)]
# q heads, kv heads, head_dim, mrope section
CONFIGS = [pytest.param(12, 2, 128, (16, 24, 24), id="2B"), pytest.param(28, 4, 128, (16, 24, 24), id="7B"),
           pytest.param(8, 2, 64, (8, 12, 12), id="d64"), pytest.param(4, 2, 16, (2, 3, 3), id="tiny")]
SENTINEL = -77.0  # exact in every dtype; no rotated value is ever this
MAX_BATCH, MAX_LEN = 6, 40


def inv_freq_for(d, device):
    """transformers' inv_freq: 1 / 1e6 ** (arange(0, D, 2) / D), fp32."""
    return (1.0 / 1e6 ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)).to(device)


def qkv_views(t, hq, hkv, d, dtype, device):
    """One (T, (Hq + 2 Hkv) D) projection output and its q, k, v views (T, H, D), as language.py splits it."""
    qkv = (torch.randn(t, (hq + 2 * hkv) * d, device=device) * 2).to(dtype)
    q, k, v = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
    return qkv, q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)


def position_ids_for(t, kind, device):
    """(3, T) M-RoPE ids. "vision": distinct T/H/W rows up to 40k (long-range angles: range reduction);
    "text": one row on all three axes (text tokens, decode), as a stride-0 expand like language.decode."""
    if kind == "vision":
        return torch.randint(0, 40000, (3, t), device=device)
    return (torch.randint(0, 40000, (1, t), device=device)).expand(3, t)


def cache_rows(t, device):
    """Distinct (slot, position) pairs scattered over the cache: non-consecutive slots and positions."""
    cells = torch.randperm(MAX_BATCH * MAX_LEN, device=device)[:t]
    return cells // MAX_LEN, cells % MAX_LEN


def sentinel_caches(hkv, d, dtype, device):
    return [torch.full((MAX_BATCH, MAX_LEN, hkv, d), SENTINEL, dtype=dtype, device=device) for _ in range(2)]


def kernel_tables(position_ids, inv_freq, section, dtype):
    """cos/sin (T, D) as the kernel computes them: the reference's fp32 angles, the kernel's libm (numpy's float32
    cos/sin under the interpreter, which tl.cos runs; libdevice on CUDA, which torch's CUDA cos uses), rounded."""
    axis = torch.repeat_interleave(torch.arange(3), torch.tensor(section)).to(position_ids.device)
    ang = position_ids.float()[axis].T * inv_freq  # (T, D/2), exactly the reference's products
    if ang.device.type == "cpu":
        c, s = torch.from_numpy(np.cos(ang.numpy())), torch.from_numpy(np.sin(ang.numpy()))
    else:
        c, s = ang.cos(), ang.sin()
    return torch.cat((c, c), -1).to(dtype), torch.cat((s, s), -1).to(dtype)


def reference_tables(position_ids, inv_freq, section, dtype):
    cos, sin = ref.mrope_cos_sin(position_ids.unsqueeze(1), inv_freq, section, dtype)
    return cos[0], sin[0]


def ulps(a, b):
    """Distance in units in the last place between same-dtype float tensors (sign-magnitude bits, ordered)."""
    itype, bits = (torch.int32, 32) if a.dtype == torch.float32 else (torch.int16, 16)

    def ordered(x):
        i = x.contiguous().view(itype).long()
        mag = i & (2 ** (bits - 1) - 1)
        return torch.where(i < 0, -mag, mag)
    return (ordered(a) - ordered(b)).abs()


def check_write(launch, t, hq, hkv, d, dtype, device, cos, sin):
    """Run `launch(q, k, v, k_cache, v_cache, slots, positions)` on fresh qkv views and sentinel caches and check
    everything against the reference rope_kv_write on the same cos/sin."""
    qkv, q, k, v = qkv_views(t, hq, hkv, d, dtype, device)
    before = qkv.clone()
    slots, positions = cache_rows(t, device)
    kc_ref, vc_ref = sentinel_caches(hkv, d, dtype, device)
    q_ref, k_ref = dec.rope_kv_write(q, k, v, cos, sin, kc_ref, vc_ref, slots, positions)  # does not mutate q/k
    assert torch.equal(qkv, before)
    kc, vc = sentinel_caches(hkv, d, dtype, device)

    q_out, k_out = launch(q, k, v, kc, vc, slots, positions)

    # In place: the returned tensors are the input views, rotated inside the qkv buffer; v untouched.
    assert q_out is q and k_out is k
    assert torch.equal(qkv[:, (hq + hkv) * d:], before[:, (hq + hkv) * d:]), "v must be untouched"
    assert torch.equal(qkv[:, :hq * d].view(t, hq, d), q_ref) and torch.equal(qkv[:, hq * d:(hq + hkv) * d].view(
        t, hkv, d), k_ref)
    # Bit-identical to the reference, caches included (and cells outside the written pairs still the sentinel).
    assert torch.equal(q_out, q_ref), f"q max diff {(q_out.float() - q_ref.float()).abs().max():.3e}"
    assert torch.equal(k_out, k_ref), f"k max diff {(k_out.float() - k_ref.float()).abs().max():.3e}"
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    written = torch.zeros(MAX_BATCH, MAX_LEN, dtype=torch.bool, device=device)
    written[slots, positions] = True
    assert (kc[~written] == SENTINEL).all() and (vc[~written] == SENTINEL).all()
    assert torch.equal(vc[slots, positions], before[:, (hq + hkv) * d:].view(t, hkv, d))


@pytest.mark.parametrize("kind", ["vision", "text"])
@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("hq, hkv, d, section", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_kv_write_bit_identical_in_place(triton_device, dtype, hq, hkv, d, section, t, kind):
    pid = position_ids_for(t, kind, triton_device)
    cos, sin = reference_tables(pid, inv_freq_for(d, triton_device), section, dtype)
    check_write(lambda q, k, v, kc, vc, s, p: K.rope_kv_write(q, k, v, cos, sin, kc, vc, s, p),
                t, hq, hkv, d, dtype, triton_device, cos, sin)


@pytest.mark.parametrize("kind", ["vision", "text"])
@pytest.mark.parametrize("t", [1, 33])
@pytest.mark.parametrize("hq, hkv, d, section", CONFIGS[1:])  # the 2B's 12 heads add nothing here
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_entry_point_equals_the_table_entry_point(triton_device, dtype, hq, hkv, d, section, t, kind):
    """mrope_kv_write(position_ids) == rope_kv_write(cos/sin of those ids, with the kernel's libm), bit for bit."""
    pid, inv_freq = position_ids_for(t, kind, triton_device), inv_freq_for(d, triton_device)
    cos, sin = kernel_tables(pid, inv_freq, section, dtype)
    check_write(lambda q, k, v, kc, vc, s, p: K.mrope_kv_write(q, k, v, pid, inv_freq, section, kc, vc, s, p),
                t, hq, hkv, d, dtype, triton_device, cos, sin)


@pytest.mark.parametrize("hq, hkv, d, section", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mrope_cos_sin_within_one_ulp_of_the_reference(triton_device, dtype, hq, hkv, d, section):
    """The tables (Triton op and the fused kernel's, see kernel_tables) vs mrope_cos_sin: the same fp32 angles,
    cos/sin 1 fp32 ulp apart at most (libm), so at most 1 ulp of the model dtype after the rounding; and the
    Triton op equals the kernel's tables exactly (the same trig as the fused kernel)."""
    inv_freq = inv_freq_for(d, triton_device)
    pid = torch.cat([position_ids_for(40, "vision", triton_device), position_ids_for(24, "text", triton_device)], 1)
    pid3 = pid.view(3, 2, 32)  # (3, B, L)
    cos, sin = K.mrope_cos_sin(pid3, inv_freq, section, dtype)
    cos_ref, sin_ref = ref.mrope_cos_sin(pid3, inv_freq, section, dtype)
    assert cos.shape == cos_ref.shape == (2, 32, d) and cos.dtype == dtype
    kc, ks = kernel_tables(pid, inv_freq, section, dtype)
    assert torch.equal(cos.reshape(64, d), kc) and torch.equal(sin.reshape(64, d), ks)
    assert ulps(cos, cos_ref).max() <= 1 and ulps(sin, sin_ref).max() <= 1
    if triton_device.type == "cuda":  # libdevice cosf/sinf == torch's CUDA cos/sin (to confirm on the GPU)
        assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)
    # decode's layout: one row of ids expanded to the three axes (stride 0)
    rows = torch.randint(0, 5000, (5,), device=triton_device).view(1, 1, -1).expand(3, 1, -1)
    got, exp = K.mrope_cos_sin(rows, inv_freq, section, dtype), ref.mrope_cos_sin(rows, inv_freq, section, dtype)
    assert ulps(got[0], exp[0]).max() <= 1 and ulps(got[1], exp[1]).max() <= 1


@pytest.mark.parametrize("hq, hkv, d, section", CONFIGS[1:])
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_rotary_bit_identical_and_inputs_untouched(triton_device, dtype, hq, hkv, d, section):
    """The cache-less forward's rotary: (B, L, H, D) views of a qkv buffer in, new tensors out."""
    b, L = 2, 5
    qkv = (torch.randn(b, L, (hq + 2 * hkv) * d, device=triton_device) * 2).to(dtype)
    before = qkv.clone()
    q = qkv[..., :hq * d].view(b, L, hq, d)
    k = qkv[..., hq * d:(hq + hkv) * d].view(b, L, hkv, d)
    pid = torch.randint(0, 3000, (3, b, L), device=triton_device)
    cos, sin = ref.mrope_cos_sin(pid, inv_freq_for(d, triton_device), section, dtype)
    q_ref, k_ref = ref.apply_rotary(q, k, cos, sin)
    q_out, k_out = K.apply_rotary(q, k, cos, sin)
    assert torch.equal(qkv, before)
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.is_contiguous()
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_tables_and_strided_indices(triton_device, dtype):
    """cos/sin with different values in the two halves (a kernel using the wrong half's table fails), slots and
    positions as strided int32 views, k/v heads from separate buffers."""
    t, hq, hkv, d = 9, 4, 2, 32
    theta = torch.rand(t, d, device=triton_device) * 6.3
    cos, sin = (theta.cos() * 1.3).to(dtype), (theta.sin() * 0.7).to(dtype)
    slots, positions = cache_rows(t, triton_device)
    idx = torch.stack([slots, positions, slots], 1).int()
    s_view, p_view = idx[:, 0], idx[:, 1]
    assert s_view.stride(0) == 3
    q = (torch.randn(t, hq, d, device=triton_device) * 2).to(dtype)
    k = torch.randn(t, hkv, 2 * d, device=triton_device).to(dtype)[..., :d]
    v = torch.randn(t, hkv, d, device=triton_device).to(dtype)
    kc_ref, vc_ref = sentinel_caches(hkv, d, dtype, triton_device)
    q_ref, k_ref = dec.rope_kv_write(q, k, v, cos, sin, kc_ref, vc_ref, slots, positions)
    kc, vc = sentinel_caches(hkv, d, dtype, triton_device)
    q_out, k_out = K.rope_kv_write(q, k, v, cos, sin, kc, vc, s_view, p_view)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


def test_out_of_range_rows_are_not_written(triton_device):
    """A slot or position outside the cache is skipped on the device (no host check, no wild write)."""
    t, hq, hkv, d = 4, 2, 1, 16
    _, q, k, v = qkv_views(t, hq, hkv, d, torch.float32, triton_device)
    cos, sin = reference_tables(position_ids_for(t, "text", triton_device), inv_freq_for(d, triton_device),
                                (2, 3, 3), torch.float32)
    kc, vc = sentinel_caches(hkv, d, torch.float32, triton_device)
    slots = torch.tensor([0, -1, MAX_BATCH, 2], device=triton_device)
    positions = torch.tensor([MAX_LEN, 3, 3, 5], device=triton_device)
    K.rope_kv_write(q, k, v, cos, sin, kc, vc, slots, positions)
    written = (kc != SENTINEL).any(-1).any(-1).nonzero().tolist()
    assert written == [[2, 5]] and (vc != SENTINEL).any(-1).any(-1).nonzero().tolist() == [[2, 5]]


def test_zero_tokens(triton_device):
    d = 16
    e = torch.empty(0, 2, d, device=triton_device)
    kc, vc = sentinel_caches(2, d, torch.float32, triton_device)
    idx = torch.empty(0, dtype=torch.long, device=triton_device)
    q, k = K.rope_kv_write(e, e, e, torch.empty(0, d, device=triton_device), torch.empty(0, d, device=triton_device),
                           kc, vc, idx, idx)
    assert q.shape == (0, 2, d) and (kc == SENTINEL).all()
    K.mrope_kv_write(e, e, e, torch.empty(3, 0, dtype=torch.long, device=triton_device),
                     inv_freq_for(d, triton_device), (2, 3, 3), kc, vc, idx, idx)
    cos, _ = K.mrope_cos_sin(torch.empty(3, 1, 0, dtype=torch.long, device=triton_device),
                             inv_freq_for(d, triton_device), (2, 3, 3), torch.float16)
    assert cos.shape == (1, 0, d)


def test_bad_arguments_raise(triton_device):
    t, hq, hkv, d, dev = 3, 4, 2, 16, triton_device
    _, q, k, v = qkv_views(t, hq, hkv, d, torch.float32, dev)
    cos, sin = torch.ones(t, d, device=dev), torch.zeros(t, d, device=dev)
    kc, vc = sentinel_caches(hkv, d, torch.float32, dev)
    s, p = cache_rows(t, dev)
    with pytest.raises(ValueError, match="cos must be"):
        K.rope_kv_write(q, k, v, cos[:, :8], sin, kc, vc, s, p)
    with pytest.raises(TypeError, match="cos must be torch.float32"):
        K.rope_kv_write(q, k, v, cos.half(), sin, kc, vc, s, p)
    with pytest.raises(ValueError, match="k_cache must be"):
        K.rope_kv_write(q, k, v, cos, sin, kc[:, :, :1], vc, s, p)
    with pytest.raises(ValueError, match="slots must be"):
        K.rope_kv_write(q, k, v, cos, sin, kc, vc, s.float(), p)
    with pytest.raises(ValueError, match="positions must be"):
        K.rope_kv_write(q, k, v, cos, sin, kc, vc, s, p[:2])
    with pytest.raises(ValueError, match="v must be"):
        K.rope_kv_write(q, k, v[:, :1], cos, sin, kc, vc, s, p)
    with pytest.raises(ValueError, match="contiguous last dim"):
        K.rope_kv_write(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, cos, sin, kc, vc, s, p)
    with pytest.raises(ValueError, match="does not cover 8 frequencies"):
        K.mrope_kv_write(q, k, v, torch.zeros(3, t, dtype=torch.long, device=dev), inv_freq_for(d, dev), (2, 3, 4),
                         kc, vc, s, p)
    with pytest.raises(ValueError, match="position_ids must be"):
        K.mrope_kv_write(q, k, v, torch.zeros(3, t + 1, dtype=torch.long, device=dev), inv_freq_for(d, dev),
                         (2, 3, 3), kc, vc, s, p)
    with pytest.raises(ValueError, match="inv_freq must be"):
        K.mrope_kv_write(q, k, v, torch.zeros(3, t, dtype=torch.long, device=dev), inv_freq_for(d, dev).half(),
                         (2, 3, 3), kc, vc, s, p)
    with pytest.raises(ValueError, match="does not cover"):
        K.mrope_cos_sin(torch.zeros(3, 1, 2, dtype=torch.long, device=dev), torch.ones(8, device=dev), [2, 3, 4],
                        torch.float32)


def test_launch_never_syncs_with_the_host(triton_device, monkeypatch):
    """Decode runs inside CUDA graphs: after a warm-up (compile), a launch must not read any tensor value on the
    host (Tensor.item / tolist / __bool__ / __int__ / __float__ raise; on CUDA, sync debug mode errors too)."""
    t, hq, hkv, d, section = 5, 4, 2, 16, (2, 3, 3)
    pid, inv_freq = position_ids_for(t, "text", triton_device), inv_freq_for(d, triton_device)
    cos, sin = reference_tables(pid, inv_freq, section, torch.float32)
    kc, vc = sentinel_caches(hkv, d, torch.float32, triton_device)
    s, p = cache_rows(t, triton_device)

    def launch_all():
        _, q, k, v = qkv_views(t, hq, hkv, d, torch.float32, triton_device)
        K.rope_kv_write(q, k, v, cos, sin, kc, vc, s, p)
        K.mrope_kv_write(q, k, v, pid, inv_freq, section, kc, vc, s, p)
        K.mrope_cos_sin(pid.unsqueeze(1), inv_freq, section, torch.float32)
        K.apply_rotary(q.unsqueeze(0), k.unsqueeze(0), cos.unsqueeze(0), sin.unsqueeze(0))

    launch_all()
    if triton_device.type == "cuda":
        torch.cuda.synchronize()

    def host_read(*args, **kwargs):
        raise AssertionError("host sync in a launch")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    if triton_device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        launch_all()
    finally:
        if triton_device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)


def test_custom_ops_declare_their_mutations(triton_device):
    t, hq, hkv, d, dev = 3, 2, 1, 16, triton_device
    q, k, v = torch.randn(t, hq, d, device=dev), torch.randn(t, hkv, d, device=dev), torch.randn(t, hkv, d, device=dev)
    cos, sin = torch.randn(t, d, device=dev), torch.randn(t, d, device=dev)
    kc, vc = sentinel_caches(hkv, d, torch.float32, dev)
    s, p = cache_rows(t, dev)
    pid, inv_freq = position_ids_for(t, "vision", dev), inv_freq_for(d, dev)
    torch.library.opcheck(torch.ops.qwen2vl_fast.rope_kv_write_triton.default, (q, k, v, cos, sin, kc, vc, s, p))
    torch.library.opcheck(torch.ops.qwen2vl_fast.mrope_kv_write_triton.default,
                          (q, k, v, pid, inv_freq, [2, 3, 3], kc, vc, s, p))
    torch.library.opcheck(torch.ops.qwen2vl_fast.apply_rotary_triton.default,
                          (q.unsqueeze(0), k.unsqueeze(0), cos.unsqueeze(0), sin.unsqueeze(0)))
    torch.library.opcheck(torch.ops.qwen2vl_fast.mrope_cos_sin_triton.default,
                          (pid.unsqueeze(1), inv_freq, [2, 3, 3], torch.float16))


def test_compiles_as_one_node_on_views_of_one_buffer(triton_device):
    """torch.compile functionalises the in-place op on q and k, two views of one qkv buffer."""
    t, hq, hkv, d, section = 5, 4, 2, 16, (2, 3, 3)
    pid, inv_freq = position_ids_for(t, "vision", triton_device), inv_freq_for(d, triton_device)
    cos, sin = reference_tables(pid, inv_freq, section, torch.float32)
    s, p = cache_rows(t, triton_device)

    def f(qkv, kc, vc):
        q, k, v = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
        q, k = K.rope_kv_write(q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d), cos, sin, kc, vc, s, p)
        return q * 2, k + 1

    qkv, q, k, v = qkv_views(t, hq, hkv, d, torch.float32, triton_device)
    kc_ref, vc_ref = sentinel_caches(hkv, d, torch.float32, triton_device)
    q_ref, k_ref = dec.rope_kv_write(q, k, v, cos, sin, kc_ref, vc_ref, s, p)
    kc, vc = sentinel_caches(hkv, d, torch.float32, triton_device)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(qkv, kc, vc)
    assert torch.equal(got[0], q_ref * 2) and torch.equal(got[1], k_ref + 1)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert torch.equal(qkv[:, :hq * d].view(t, hq, d), q_ref)  # the mutation reached the caller's buffer


def test_registry_picks_triton(triton_device):
    names = ("rope_kv_write", "apply_rotary", "mrope_cos_sin")
    table = ops.resolve("triton", triton_device)
    assert all(table.chosen[n] == "triton" for n in names), table.chosen
    if triton_device.type == "cpu":  # the interpreter is for tests: auto never picks it
        assert all(ops.resolve("auto", "cpu").chosen[n] == "torch" for n in names)
    t, hq, hkv, d = 7, 12, 2, 128
    pid = position_ids_for(t, "vision", triton_device)
    cos, sin = reference_tables(pid, inv_freq_for(d, triton_device), (16, 24, 24), torch.float32)
    check_write(lambda q, k, v, kc, vc, s, p: table.rope_kv_write(q, k, v, cos, sin, kc, vc, s, p),
                t, hq, hkv, d, torch.float32, triton_device, cos, sin)


def test_engine_generates_the_same_tokens_with_the_triton_cache_write(tiny_checkpoints, triton_device, monkeypatch):
    """language.py's prefill on rope_kv_write's Triton kernel (in place on the qkv views; decode runs the fused
    rope_decode_attention op, whose reference composes rope_kv_write's), the rest on the references: the same
    greedy tokens as the all-torch engine (bit-identical rotary and cache)."""
    from qwen2vl_fast.engine import Engine

    path = tiny_checkpoints["tiny-qwen2.5-vl"]
    engine = Engine.from_pretrained(path, device=triton_device, dtype=torch.float32, backend="torch",
                                    cuda_graphs=False, max_batch=2, max_len=256)
    chats = [[{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
             [{"role": "user", "content": [{"type": "text", "text": "Count to three, slowly."}]}]]
    expected = [c.token_ids for c in engine.generate(chats, max_new_tokens=4)]
    fast = ops.get_op("rope_kv_write").impls["triton"][0]
    calls = []

    def counted(*args):
        calls.append(args[0].shape[0])
        return fast(*args)
    monkeypatch.setattr(engine.model.language_model.ops, "rope_kv_write", counted)
    assert [c.token_ids for c in engine.generate(chats, max_new_tokens=4)] == expected
    assert calls and max(calls) > 2  # the packed prefill and the decode steps both ran on the kernel


def test_compiles_for_hopper(tmp_path, monkeypatch):
    """Head_dim 128, the 7B's heads, compiled for sm_90 with the launcher's flags: 16-byte loads and stores of the
    halves; no FMA of any width in the rotation (with fusion on, LLVM narrows the rounded products to
    mul.rn.bf16 and fuses them with the add into fma.rn.bf16: one rounding fewer than torch); libdevice cos/sin in
    the fused variant (full range reduction, not the .approx instructions)."""
    import helpers_triton

    old = 'options={"num_warps": num_warps}'
    assert old in helpers_triton._SM90_COMPILER
    monkeypatch.setattr(helpers_triton, "_SM90_COMPILER", helpers_triton._SM90_COMPILER.replace(
        old, 'options={"num_warps": num_warps, **%r}' % K._FLAGS))
    ints = ["q_st", "q_sh", "k_st", "k_sh", "v_st", "v_sh", "qo_st", "qo_sh", "ko_st", "ko_sh", "cos_st", "sin_st",
            "pos_sa", "kc_sb", "kc_sl", "kc_sh", "vc_sb", "vc_sl", "vc_sh", "max_batch", "max_len", "NUM_Q_HEADS",
            "NUM_KV_HEADS"]
    names = list(K._rope_kernel.arg_names)
    unaligned = ("NUM_Q_HEADS", "NUM_KV_HEADS", "max_batch", "max_len")
    unit = {"pos_st": 1, "slots_st": 1, "positions_st": 1}  # stride-1 ints are specialised at a real launch
    consts = dict(HALF=64, BLOCK_HQ=32, BLOCK_HKV=4, BLOCK_HALF=64, S0=16, S01=40, WRITE_CACHE=True)
    jobs = []
    for dt, fused in (("bf16", False), ("fp16", False), ("fp32", False), ("bf16", True)):
        ptr = "*" + dt
        sig = {"Q": ptr, "K": ptr, "V": ptr, "QO": ptr, "KO": ptr, "COS": ptr, "SIN": ptr, "POS_IDS": "*i64",
               "INV_FREQ": "*fp32", "K_CACHE": ptr, "V_CACHE": ptr, "SLOTS": "*i64", "POSITIONS": "*i64",
               **{n: "i32" for n in ints}}
        sig = {n: sig.get(n, "constexpr") for n in names}
        aligned = [n for n in names if sig[n] != "constexpr" and n not in unaligned]
        jobs.append([K.__name__, "_rope_kernel", sig, {**unit, **consts, "FUSED": fused}, 4, aligned])
    *tables, fused = ptx_for_sm90(jobs, tmp_path)
    for ptx in (*tables, fused):
        assert "ld.global.v4" in ptx and "st.global.v4" in ptx
        assert "sin.approx" not in ptx and "cos.approx" not in ptx and ".ftz" not in ptx
    for ptx in tables:
        assert "fma." not in ptx and "mul.rn." in ptx  # separate, rounded multiplies and adds
    assert "__cudart_i2opi_f" in fused  # libdevice's Payne-Hanek table: full-range cos/sin
