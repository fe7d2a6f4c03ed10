"""The fused decode step (kernels/llm_attention.py, `rope_decode_attention`): rotary of q and of the new k, the
cache write of k and v at position lengths - 1, split-K attention and the in-launch merge of the splits, in ONE
Triton launch, against its reference (ops.decoding: rope_kv_write's reference, then decode_attention's).

Inputs are what language.py passes: q, k, v strided views of one fused (B, (Hq + 2 Hkv) D) qkv output, cos/sin
(B, D) in the model dtype, a (max_batch, max_len, Hkv, D) cache read through slots. GQA ratios 1, 2, 6 (the 2B:
12/2), 7 (the 7B: 28/4), 8; head_dim 64 and 128; lengths 1, BLOCK_N - 1, BLOCK_N, BLOCK_N + 1, long, mixed per
row; CUDA-graph padding rows (length 1 on spare slots). The cache holds NaN past every row's keys, in the unused
rows and AT the write position (the kernel must write the new key before reading it); outputs and workspaces are
NaN-filled (`_empty`): every output row written, no unwritten workspace row read. Checked: the output (fp32:
within 1e-5 of the reference and of float64; fp16: DESIGN.md's 2x-torch-error rule against float64), the whole
caches bit for bit against the reference's writes, bitwise determinism whichever program of a group arrives last
(the grid's split order reversed), the ticket counters back at zero, one kernel launch per call. On the CPU this
runs under the Triton interpreter (fp32 / fp16), so shapes stay small.
"""

import pytest
import torch
from conftest import TEST_DEVICE, float_dtypes

from qwen2vl_fast.ops import get_op, resolve

K = pytest.importorskip("qwen2vl_fast.kernels.llm_attention", reason="triton is not installed")

DTYPES = [pytest.param(dt, id=str(dt).split(".")[-1]) for dt, _, _ in float_dtypes(TEST_DEVICE)]
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
LOW_PRECISION_ATOL = 1e-3
reference = get_op("rope_decode_attention").reference
rope_reference = get_op("rope_kv_write").reference
decode_reference = get_op("decode_attention").reference


def block_n(dtype):
    return K.pick_decode_config(dtype).block_n


def inputs(hq, hkv, d, lengths, slots, dtype, device, max_batch, max_len, poison=True):
    """q, k, v (views of one qkv buffer), cos, sin (B, D) of positions lengths - 1 (+ a rope delta), the caches:
    random, with NaN (poison) past each row's first lengths - 1 keys (the write position included) and in every
    row no slot uses."""
    b = len(lengths)
    qkv = (torch.randn(b, (hq + 2 * hkv) * d, device=device) * 1.5).to(dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(b, hq, d), k.view(b, hkv, d), v.view(b, hkv, d)
    pos = torch.tensor(lengths, device=device, dtype=torch.float32) - 1 + 37.0
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    ang = pos[:, None] * inv_freq[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype)
    kc = (torch.randn(max_batch, max_len, hkv, d, device=device) * 1.5).to(dtype)
    vc = (torch.randn(max_batch, max_len, hkv, d, device=device) * 1.5).to(dtype)
    if poison:
        valid = torch.zeros(max_batch, max_len, dtype=torch.bool, device=device)
        for s, n in zip(slots, lengths):
            valid[s, :n - 1] = True
        kc = kc.masked_fill(~valid[:, :, None, None], float("nan"))
        vc = vc.masked_fill(~valid[:, :, None, None], float("nan"))
    slots_t = torch.tensor(slots, dtype=torch.long, device=device)
    lengths_t = torch.tensor(lengths, dtype=torch.long, device=device)
    return q, k, v, cos, sin, kc, vc, slots_t, lengths_t


def run_reference(q, k, v, cos, sin, kc, vc, slots, lengths, scale):
    """The reference on copies of the caches: (out, rotated q, k cache, v cache). Its decode step reads the written
    caches with NaN zeroed (the reference multiplies masked probabilities, 0, by every value: 0 * NaN is NaN)."""
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_rot, _ = rope_reference(q, k, v, cos, sin, kc_ref, vc_ref, slots, lengths - 1)
    out = decode_reference(q_rot, kc_ref.nan_to_num(), vc_ref.nan_to_num(), slots, lengths, scale)
    return out, q_rot, kc_ref, vc_ref


def decode_f64(q, k_cache, v_cache, slots, lengths, scale):
    """Only the valid keys of each row, in float64."""
    rep = q.shape[1] // k_cache.shape[2]
    out = []
    for i, (slot, n) in enumerate(zip(slots.tolist(), lengths.tolist())):
        ks = k_cache[slot, :n].double().repeat_interleave(rep, 1)
        vs = v_cache[slot, :n].double().repeat_interleave(rep, 1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[i].double(), ks) * scale, dim=-1)
        out.append(torch.einsum("hn,nhd->hd", p, vs))
    return torch.stack(out)


def bits(t):
    """The raw bits (NaN payloads included): caches compare bit for bit."""
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def check_call(fn, args, scale):
    """Run fn(*args, scale) on copies of the caches; compare with the reference run on other copies."""
    q, k, v, cos, sin, kc, vc, slots, lengths = args
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    ref, q_rot, kc_ref, vc_ref = run_reference(q, k, v, cos, sin, kc, vc, slots, lengths, scale)
    kc_ours, vc_ours = kc.clone(), vc.clone()
    ours = fn(q, k, v, cos, sin, kc_ours, vc_ours, slots, lengths, scale)
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0), "q, k, v must not be modified"
    assert ours.shape == q.shape and ours.dtype == q.dtype and ours.is_contiguous()
    assert torch.isfinite(ours).all(), "rows left unwritten or NaN"
    assert torch.equal(bits(kc_ours), bits(kc_ref)) and torch.equal(bits(vc_ours), bits(vc_ref)), \
        "the caches differ from rope_kv_write's writes"
    ref64 = decode_f64(q_rot, kc_ref, vc_ref, slots, lengths, scale)
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours, ref, **FP32_TOL)
        torch.testing.assert_close(ours.double(), ref64, **FP32_TOL)
    else:
        err = (ours.double() - ref64).abs().max().item()
        err_pt = (ref.double() - ref64).abs().max().item()
        assert err <= 2 * err_pt + LOW_PRECISION_ATOL, f"ours {err:.3e} vs torch {ours.dtype} {err_pt:.3e}"
    return ours, kc_ours, vc_ours


def nan_empty(*args, **kwargs):
    return torch.full(*args, float("nan"), **kwargs)


def fused(**kw):
    return lambda *a: K.rope_decode_attention(*a, **kw)


# (Hq, Hkv, D, lengths as functions of BLOCK_N, slots): odd GQA ratios and head dims, the real models' heads (2B:
# 12/2, 7B: 28/4 at D 128), lengths at and around the block, long ones, mixed rows, CUDA-graph padding rows
# (length 1 on the spare slots 5 and 6 of a 7-row cache).
MAX_BATCH, MAX_LEN = 7, 720
CASES = {
    "r1-d64": (3, 3, 64, lambda n: [1, n - 1, n], [2, 0, 4]),
    "r2-d128": (4, 2, 128, lambda n: [n + 1, 3 * n + 5], [1, 3]),
    "r6-2b": (12, 2, 128, lambda n: [n, 5 * n + 3, 200, 1], [3, 0, 2, 6]),
    "r7-7b": (28, 4, 128, lambda n: [1, n - 1, 2 * n, 150, 1], [4, 1, 0, 5, 6]),
    "r8-d64-long": (8, 1, 64, lambda n: [700], [2]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_composition(triton_device, monkeypatch, case, dtype):
    """The launcher's own split count (many splits at these batches), NaN-filled outputs and workspaces, NaN in
    the cache wherever a row must not read (and where it must write first)."""
    hq, hkv, d, lengths, slots = CASES[case]
    args = inputs(hq, hkv, d, lengths(block_n(dtype)), slots, dtype, triton_device, MAX_BATCH, MAX_LEN)
    assert K.decode_num_splits(len(slots), hkv, MAX_LEN, block_n(dtype)) > 1
    monkeypatch.setattr(K, "_empty", nan_empty)
    check_call(K.rope_decode_attention, args, d ** -0.5)


@pytest.mark.parametrize("splits", [1, 2, 5, 64], ids=["one", "two", "five", "64-mostly-empty"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forced_split_counts(triton_device, monkeypatch, splits, dtype):
    """NUM_SPLITS 1 (direct write: no workspace, no ticket), a few, and many more than any row has blocks."""
    n = block_n(dtype)
    args = inputs(12, 2, 128, [1, n, 4 * n + 7, 9 * n], [3, 0, 5, 1], dtype, triton_device, MAX_BATCH, MAX_LEN)
    monkeypatch.setattr(K, "_empty", nan_empty)
    check_call(fused(num_splits=splits), args, 0.088)


@pytest.mark.parametrize("merge_rows", [64, 8, 2], ids=["one-level", "two-level", "two-level-fan-in-1"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_order_independent_and_counters_zeroed(triton_device, monkeypatch, merge_rows, dtype):
    """The merge's result is bitwise the same whichever program of a group arrives last (the grid's split order
    reversed under the interpreter, which runs programs in grid order), run to run, with one and two merge levels
    (a small _MERGE_ROWS forces a small fan-in: many level-1 groups); the tickets are all zero afterwards."""
    monkeypatch.setattr(K, "_MERGE_ROWS", merge_rows)
    monkeypatch.setattr(K, "_empty", nan_empty)
    n = block_n(dtype)
    args = inputs(7, 1, 64, [11 * n + 3, 2, 5 * n], [0, 2, 1], dtype, triton_device, MAX_BATCH, MAX_LEN)
    outs = [check_call(fused(num_splits=16, _reverse=r), args, 0.125) for r in (False, True, False, True)]
    for out, kc, vc in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(bits(kc), bits(outs[0][1]))
    tickets = K._COUNTERS[torch.device(triton_device)]
    assert tickets.dtype == torch.int32 and int(tickets.abs().sum()) == 0


def test_merge_levels_are_what_the_docs_say():
    """FAN_IN partials per level-1 merge: 8 at the models' r = 6..8; a 1.6k context at batch 1 has 25 one-block
    splits per kv head, hence 4 level-1 groups and a level-2 merge of 4 partials."""
    assert K._MERGE_ROWS // 8 == 8
    assert -(-25 // (K._MERGE_ROWS // 8)) == 4


@pytest.fixture
def launches():
    """Wraps `run` of every kernel object in the kernel modules (what `kernel[grid](...)` calls, under the
    interpreter and on a GPU): yields the list of launched kernel names; unwrapped afterwards."""
    import importlib
    import pkgutil

    from triton.runtime.jit import KernelInterface

    import qwen2vl_fast.kernels as pkg

    launched, wrapped = [], []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name == "aot_sweep":
            continue
        module = importlib.import_module(f"qwen2vl_fast.kernels.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, KernelInterface) and "run" not in vars(obj) and obj not in wrapped:
                def run(*args, _orig=obj.run, _name=obj.fn.__name__, **kwargs):
                    launched.append(_name)
                    return _orig(*args, **kwargs)
                obj.run = run
                wrapped.append(obj)
    try:
        yield launched
    finally:
        for obj in wrapped:
            del obj.run


@pytest.mark.parametrize("splits", [None, 1], ids=["many-splits", "one-split"])
def test_exactly_one_kernel_launch_per_call(triton_device, launches, splits):
    """The Triton path of the op (the registered implementation and the launcher) launches one kernel per call,
    whatever the split count; the unfused path it replaces launched three (rope, split, reduce)."""
    from qwen2vl_fast.ops.decoding import rope_decode_attention_triton, rope_decode_attention_unfused

    args = inputs(12, 2, 64, [40, 3, 1], [0, 2, 1], torch.float32, triton_device, 4, 96, poison=False)
    launched = launches
    K.rope_decode_attention(*args, 0.1, num_splits=splits)
    assert launched == ["_rope_decode_kernel"]
    launched.clear()
    rope_decode_attention_triton(*args, 0.1)
    assert launched == ["_rope_decode_kernel"]
    launched.clear()
    rope_decode_attention_unfused(*[a.clone() for a in args], 0.1)
    assert launched == ["_rope_kernel", "_decode_split_kernel", "_decode_reduce_kernel"]


def test_fused_equals_the_unfused_triton_path(triton_device):
    """The registered `auto` variant (rope_kv_write's kernel + the split / reduce decode kernels): the same caches
    bit for bit, outputs within fp32 rounding."""
    from qwen2vl_fast.ops.decoding import rope_decode_attention_unfused

    args = inputs(28, 4, 128, [1, 50, 130], [1, 0, 2], torch.float32, triton_device, 3, 160)
    ours, kc, vc = check_call(K.rope_decode_attention, args, 0.09)
    q, k, v, cos, sin, kc0, vc0, slots, lengths = args
    kc2, vc2 = kc0.clone(), vc0.clone()
    other = rope_decode_attention_unfused(q.clone(), k.clone(), v, cos, sin, kc2, vc2, slots, lengths, 0.09)
    assert torch.equal(bits(kc2), bits(kc)) and torch.equal(bits(vc2), bits(vc))
    torch.testing.assert_close(ours, other, **FP32_TOL)


def test_strided_inputs_and_cache(triton_device):
    """Head-major q storage, cos / sin rows of a wider table, caches that are strided views of larger buffers."""
    b, hq, hkv, d = 3, 6, 2, 64
    q = torch.randn(hq, b, d, device=triton_device).transpose(0, 1)
    k = torch.randn(b, hkv, 2 * d, device=triton_device)[..., :d]
    v = torch.randn(b, hkv, d, device=triton_device)
    ang = torch.randn(b, d // 2, device=triton_device)
    cos = torch.cat([ang.cos(), ang.cos(), torch.zeros_like(ang)], -1)[:, :d]
    sin = torch.cat([ang.sin(), ang.sin(), torch.zeros_like(ang)], -1)[:, :d]
    kc = torch.randn(4, 100, hkv, 2 * d, device=triton_device)[..., d:]
    vc = torch.randn(4, 105, hkv, d, device=triton_device)[:, 5:]
    slots = torch.tensor([3, 0, 1], device=triton_device)
    lengths = torch.tensor([77, 100, 2], device=triton_device)
    check_call(K.rope_decode_attention, (q, k, v, cos, sin, kc, vc, slots, lengths), 0.1)


def test_edge_lengths(triton_device):
    """length 0 (never sent by the engine): output 0 and no write; a length past max_len: the row's max_len keys,
    the out-of-range write skipped (as rope_kv_write's kernel); other rows unaffected."""
    q, k, v, cos, sin, kc, vc, _, _ = inputs(4, 2, 64, [5, 5, 5], [0, 1, 2], torch.float32, triton_device, 3, 48,
                                             poison=False)
    slots = torch.tensor([0, 1, 2], device=triton_device)
    lengths = torch.tensor([0, 60, 7], device=triton_device)
    kc2, vc2 = kc.clone(), vc.clone()
    out = K.rope_decode_attention(q, k, v, cos, sin, kc2, vc2, slots, lengths, 0.125, num_splits=4)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(kc2[:2], kc[:2]) and torch.equal(vc2[:2], vc[:2])  # rows 0 and 1: nothing written
    q_rot, _ = rope_reference(q, k, v, cos, sin, kc.clone(), vc.clone(), slots, torch.zeros_like(lengths))
    torch.testing.assert_close(out[1].double(), decode_f64(q_rot[1:2], kc, vc, slots[1:2], torch.tensor([48]),
                                                           0.125)[0], **FP32_TOL)


# ------------------------------------------------------------------------------------------------ plumbing

def test_registered_and_dispatched(triton_device, tmp_path, monkeypatch):
    from qwen2vl_fast.ops.decoding import rope_decode_attention_triton

    monkeypatch.delenv("QWEN2VL_FAST_BACKEND", raising=False)
    monkeypatch.delenv("QWEN2VL_FAST_DISPATCH", raising=False)
    table = resolve("triton", triton_device)
    assert table.chosen["rope_decode_attention"] == "triton"
    assert table.rope_decode_attention is rope_decode_attention_triton
    assert resolve("torch", triton_device).rope_decode_attention is reference
    if triton_device.type != "cpu":
        return
    assert resolve("auto", "cpu").chosen["rope_decode_attention"] == "torch"  # the interpreter is never picked
    # the measured race (interpreted: tests of the dispatch) has the unfused Triton path as a candidate
    times = {"torch": 3.0, "triton": 2.0, "triton-unfused": 1.0}
    auto = resolve("auto", "cpu", cache_path=tmp_path / "d.json", interpreted=True,
                   timer=lambda op, backend, fn, a: times.get(backend, 5.0))
    op = auto.measured["rope_decode_attention"]
    assert set(op.fns) == {"torch", "triton", "triton-unfused"} and op.default == "triton"
    args = inputs(12, 2, 64, [9, 40], [1, 0], torch.float32, "cpu", 2, 64)
    ref, *_ = run_reference(*args, 0.125)
    got = auto.rope_decode_attention(*args, 0.125)
    (_, _, winner, _), = [r for r in auto.dispatch_report() if r[0] == "rope_decode_attention"]
    assert winner == "triton-unfused"  # measured fastest here (injected times): no choice by assumption
    torch.testing.assert_close(got, ref, **FP32_TOL)


def test_custom_op_traces_as_one_node(triton_device):
    """torch.compile sees the launch as one opaque node that mutates the caches (register_fake + mutates_args)."""
    args = inputs(4, 2, 64, [5, 63], [1, 0], torch.float32, triton_device, 2, 64, poison=False)
    q, k, v, cos, sin, kc, vc, slots, lengths = args
    ref, _, kc_ref, vc_ref = run_reference(*args, 0.125)
    op = torch.ops.qwen2vl_fast.llm_rope_decode_attention_triton
    compiled = torch.compile(op, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v, cos, sin, kc, vc, slots, lengths, 0.125, 3, 32, 16, 2, 1)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)  # the mutation reached the caller's caches
    torch.library.opcheck(op.default, (q, k, v, cos, sin, kc, vc, slots, lengths, 0.125, 3, 32, 16, 2, 1),
                          test_utils=("test_schema", "test_faketensor"))


def test_launch_does_not_sync(triton_device, monkeypatch):
    from test_kernels_llm_attention import no_host_sync

    args = inputs(12, 2, 64, [33, 2], [0, 1], torch.float32, triton_device, 2, 64, poison=False)
    expected = K.rope_decode_attention(*args, 0.125)  # warm-up: compiles, imports, allocates the counters
    with no_host_sync(monkeypatch):
        again = K.rope_decode_attention(*args, 0.125)
        via_ops = resolve("triton", triton_device).rope_decode_attention(*args, 0.125)
    assert torch.equal(again, expected) and torch.equal(via_ops, expected)


def test_rejects_bad_inputs(triton_device):
    q, k, v, cos, sin, kc, vc, slots, lengths = inputs(4, 2, 64, [3], [0], torch.float32, triton_device, 1, 8,
                                                       poison=False)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        K.rope_decode_attention(q[:, :3], k, v, cos, sin, kc, vc, slots, lengths, 0.1)
    with pytest.raises(ValueError, match="cos and sin"):
        K.rope_decode_attention(q, k, v, cos.half(), sin, kc, vc, slots, lengths, 0.1)
    with pytest.raises(ValueError, match="caches"):
        K.rope_decode_attention(q, k, v, cos, sin, kc[:, :, :1], vc, slots, lengths, 0.1)
    with pytest.raises(ValueError, match="integer"):
        K.rope_decode_attention(q, k, v, cos, sin, kc, vc, slots.float(), lengths, 0.1)


def test_decoder_runs_the_fused_op(tiny_checkpoints, triton_device, monkeypatch):
    """language.py's decode step calls ops.rope_decode_attention once per layer; with the Triton kernel behind it
    (the rest on the references) the engine generates the same greedy tokens as the all-torch engine."""
    from qwen2vl_fast.engine import Engine

    path = tiny_checkpoints["tiny-qwen2-vl"]
    engine = Engine.from_pretrained(path, device=triton_device, dtype=torch.float32, backend="torch",
                                    cuda_graphs=False, max_batch=2, max_len=256)
    chats = [[{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
             [{"role": "user", "content": [{"type": "text", "text": "Count to three, slowly."}]}]]
    expected = [c.token_ids for c in engine.generate(chats, max_new_tokens=4)]
    fast = get_op("rope_decode_attention").impls["triton"][0]
    calls = []

    def counted(*args):
        calls.append(args[0].shape[0])
        return fast(*args)
    table = engine.model.language_model.ops
    monkeypatch.setattr(table, "rope_decode_attention", counted)
    monkeypatch.setattr(table, "decode_attention", lambda *a: pytest.fail("the decoder called decode_attention"))
    assert [c.token_ids for c in engine.generate(chats, max_new_tokens=4)] == expected
    layers = engine.model.config.text.num_hidden_layers
    assert calls and len(calls) % layers == 0
