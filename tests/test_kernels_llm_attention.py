"""Triton LLM attention (kernels/llm_attention.py): causal GQA prefill over packed prompts and split-K decode over
the KV cache, against the references in qwen2vl_fast.ops.decoding and float64 loops.

Inputs are what language.py passes: q, k, v strided views of one fused (T, (Hq + 2 Hkv) D) qkv output; decode
reads a (max_batch, max_len, Hkv, D) cache through slots. GQA ratios 1, 6, 7, 8 (12/2, 28/4, 8/1, 3/3), head dims
128 and 64 (80: the masked non-power-of-two path). Prompt lengths 1, 17, 100, 130
packed (not multiples of any block), decode contexts 1, 5, 63, 200, 513 (not multiples of the block or the split)
in non-contiguous slots. fp32: within 1e-5 of the reference and of float64; fp16 (bf16 on CUDA): DESIGN.md's
rule, max error vs float64 <= 2x torch's own low-precision max error + 1e-3. Masking: the cache holds random data
past every length and NaN in a second run (past each length, in unused rows, in the workspace and the output
buffers): the outputs must stay finite and bit-identical. On the CPU this runs under the Triton interpreter, so
shapes stay small.
"""

import pytest
import torch
from conftest import TEST_DEVICE, float_dtypes

from qwen2vl_fast.errors import BackendError
from qwen2vl_fast.ops import VarlenMeta, get_op, resolve

K = pytest.importorskip("qwen2vl_fast.kernels.llm_attention", reason="triton is not installed")

DTYPES = [pytest.param(dt, id=str(dt).split(".")[-1]) for dt, _, _ in float_dtypes(TEST_DEVICE)]
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
LOW_PRECISION_ATOL = 1e-3
prefill_reference = get_op("prefill_attention").reference
decode_reference = get_op("decode_attention").reference

# (Hq, Hkv, D): Qwen2-VL-2B (12/2, r = 6), Qwen2.5-VL-3B's r = 8 on one kv head, the 7B models' 28/4 (r = 7) at
# head_dim 64, and plain MHA (r = 1) at the odd head_dim 80. The interpreter's time grows with heads x tiles x
# blocks, so only the first case runs the full PROMPTS; the others run SHORT_PROMPTS.
HEADS = [(12, 2, 128), (8, 1, 128), (28, 4, 64), (3, 3, 80)]
HEAD_IDS = ["r6", "r8", "r7-28/4-d64", "r1-d80"]
PROMPTS = [1, 17, 100, 130]
SHORT_PROMPTS = [17, 1, 40]
CONTEXTS = [1, 5, 63, 200, 513]
SLOTS = [3, 0, 2, 5, 1]  # rows 4 and 6 of the cache are unused
MAX_BATCH, MAX_LEN = 7, 600


def qkv_views(t, hq, hkv, d, dtype, device, scale=1.5):
    """q (T, Hq, D), k, v (T, Hkv, D) as the model has them: views of one (T, (Hq + 2 Hkv) D) buffer."""
    qkv = (torch.randn(t, (hq + 2 * hkv) * d, device=device) * scale).to(dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    return q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)


def prefill_f64(q, k, v, lengths, scale):
    out, start, rep = [], 0, q.shape[1] // k.shape[1]
    for n in lengths:
        qs, ks, vs = (x[start:start + n].double().transpose(0, 1) for x in (q, k, v))  # (H, n, D)
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        s = (qs @ ks.transpose(1, 2) * scale).masked_fill(~torch.ones(n, n, dtype=torch.bool,
                                                                       device=q.device).tril(), float("-inf"))
        out.append((torch.softmax(s, dim=-1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(out)


def decode_f64(q, k_cache, v_cache, slots, lengths, scale):
    """Reads only the valid keys of each row: garbage past the lengths cannot reach it."""
    rep = q.shape[1] // k_cache.shape[2]
    out = []
    for i, (slot, n) in enumerate(zip(slots.tolist(), lengths.tolist())):
        ks = k_cache[slot, :n].double().repeat_interleave(rep, 1)  # (n, Hq, D)
        vs = v_cache[slot, :n].double().repeat_interleave(rep, 1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[i].double(), ks) * scale, dim=-1)
        out.append(torch.einsum("hn,nhd->hd", p, vs))
    return torch.stack(out)


def check(ours, lowp, ref64):
    """fp32: close to the reference (and to float64); 16-bit: DESIGN.md's 2x-torch-error rule vs float64."""
    assert ours.shape == ref64.shape and ours.is_contiguous()
    assert torch.isfinite(ours).all(), "rows left unwritten or NaN"
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours, lowp, **FP32_TOL)
        torch.testing.assert_close(ours.double(), ref64, **FP32_TOL)
    else:
        err = (ours.double() - ref64).abs().max().item()
        err_pt = (lowp.double() - ref64).abs().max().item()
        assert err <= 2 * err_pt + LOW_PRECISION_ATOL, f"ours {err:.3e} vs torch {ours.dtype} {err_pt:.3e}"


def nan_empty(*args, **kwargs):
    return torch.full(*args, float("nan"), **kwargs)


# ------------------------------------------------------------------------------------------------ prefill

@pytest.mark.parametrize("hq, hkv, d", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_matches_reference(triton_device, monkeypatch, hq, hkv, d, dtype):
    lengths = PROMPTS if (hq, hkv, d) == HEADS[0] else SHORT_PROMPTS
    meta = VarlenMeta.from_lengths(lengths, triton_device)
    q, k, v = qkv_views(sum(lengths), hq, hkv, d, dtype, triton_device)
    monkeypatch.setattr(K, "_empty", nan_empty)  # every output row must be written
    ours = K.prefill_attention(q, k, v, meta, d ** -0.5)
    check(ours, prefill_reference(q, k, v, meta, d ** -0.5), prefill_f64(q, k, v, lengths, d ** -0.5))


@pytest.mark.parametrize("config", ["_PREFILL_LONG", "_PREFILL_SHORT", "_PREFILL_FP32"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_every_launch_config(triton_device, monkeypatch, config, dtype):
    """Each tile shape of the config table, whatever dtype it is picked for here: with BLOCK_M 128 the 130-row
    prompt has a full tile (2 diagonal blocks, 1 below) and a 2-row tile 128 keys past its start."""
    monkeypatch.setattr(K, "pick_prefill_config", lambda *a: getattr(K, config))
    lengths, (hq, hkv, d) = [130, 1, 65], (2, 1, 128)
    meta = VarlenMeta.from_lengths(lengths, triton_device)
    q, k, v = qkv_views(sum(lengths), hq, hkv, d, dtype, triton_device)
    ours = K.prefill_attention(q, k, v, meta, 0.1)
    check(ours, prefill_reference(q, k, v, meta, 0.1), prefill_f64(q, k, v, lengths, 0.1))


def test_prefill_is_causal_and_stays_in_its_prompt(triton_device):
    """Changing the keys/values of rows lo.. changes no output row before lo and nothing in other prompts."""
    lengths, (hq, hkv, d) = [40, 90, 5], (4, 2, 64)
    meta = VarlenMeta.from_lengths(lengths, triton_device)
    qkv = torch.randn(sum(lengths), hq + 2 * hkv, d, device=triton_device)
    views = lambda x: (x[:, :hq], x[:, hq:hq + hkv], x[:, hq + hkv:])  # noqa: E731
    before = K.prefill_attention(*views(qkv), meta, 0.125)
    for lo, hi in ((60, 130), (10, 40)):  # the middle of prompt 2 (past a 32-row tile edge); prompt 1's tail
        changed = qkv.clone()
        changed[lo:hi, hq:] = torch.randn(hi - lo, 2 * hkv, d, device=triton_device)
        after = K.prefill_attention(*views(changed), meta, 0.125)
        assert torch.equal(after[:lo], before[:lo]) and torch.equal(after[hi:], before[hi:])
        assert not torch.equal(after[lo:hi], before[lo:hi])


def test_prefill_other_strides(triton_device):
    """Head-major q storage, k and v from different buffers: only the last-dim stride must be 1."""
    lengths, hq, hkv, d = [33, 3], 6, 2, 64
    meta = VarlenMeta.from_lengths(lengths, triton_device)
    q = torch.randn(hq, 36, d, device=triton_device).transpose(0, 1)
    k = torch.randn(36, hkv, 2 * d, device=triton_device)[..., :d]
    v = torch.randn(36, hkv, d, device=triton_device)
    check(K.prefill_attention(q, k, v, meta, 0.2), prefill_reference(q, k, v, meta, 0.2),
          prefill_f64(q, k, v, lengths, 0.2))


def test_plan_causal_tiles_cover_rows_once_inside_prompts():
    lengths = [1, 17, 100, 130, 64]
    tiles = torch.tensor(K.plan_causal_tiles(lengths, 64)).view(-1, 3)
    starts = torch.tensor([0] + lengths).cumsum(0).tolist()
    covered = torch.zeros(sum(lengths), dtype=torch.long)
    for row_lo, row_hi, seq in tiles.tolist():
        assert seq in starts and 0 < row_hi - row_lo <= 64 and (row_lo - seq) % 64 == 0  # aligned to its prompt
        assert row_hi <= starts[starts.index(seq) + 1]  # never crosses into the next prompt
        covered[row_lo:row_hi] += 1
    assert (covered == 1).all() and len(tiles) == 1 + 1 + 2 + 3 + 1
    spans = (tiles[:, 1] - tiles[:, 2]).tolist()
    assert spans == sorted(spans, reverse=True)  # longest causal key range first


def test_prefill_plan_is_memoised_and_second_call_does_not_sync(triton_device, monkeypatch):
    meta = VarlenMeta.from_lengths([20, 5], triton_device)
    q, k, v = qkv_views(25, 4, 2, 64, torch.float32, triton_device)
    first = K.prefill_attention(q, k, v, meta, 0.25)
    assert K.prepare(meta, triton_device) is K.prepare(meta, triton_device)
    monkeypatch.setattr(K, "plan_causal_tiles", lambda *a: pytest.fail("tile plan rebuilt for the same meta"))
    with no_host_sync(monkeypatch):
        again = K.prefill_attention(q, k, v, meta, 0.25)
    assert torch.equal(first, again)


# ------------------------------------------------------------------------------------------------ decode

def decode_inputs(hq, hkv, d, dtype, device, contexts=CONTEXTS, slots=SLOTS, poison=False):
    """q (B, Hq, D) and one layer's caches: random everywhere (garbage past the lengths is finite but wrong to
    read), or with NaN past each row's length and in every unused row (poison=True)."""
    kc = (torch.randn(MAX_BATCH, MAX_LEN, hkv, d, device=device) * 1.5).to(dtype)
    vc = (torch.randn(MAX_BATCH, MAX_LEN, hkv, d, device=device) * 1.5).to(dtype)
    q = (torch.randn(len(contexts), hq, d, device=device) * 1.5).to(dtype)
    slots_t = torch.tensor(slots, dtype=torch.long, device=device)
    lengths = torch.tensor(contexts, dtype=torch.long, device=device)
    if poison:
        valid = torch.zeros(MAX_BATCH, MAX_LEN, dtype=torch.bool, device=device)
        for s, n in zip(slots, contexts):
            valid[s, :n] = True
        kc = kc.masked_fill(~valid[:, :, None, None], float("nan"))
        vc = vc.masked_fill(~valid[:, :, None, None], float("nan"))
    return q, kc, vc, slots_t, lengths


@pytest.mark.parametrize("hq, hkv, d", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matches_reference(triton_device, monkeypatch, hq, hkv, d, dtype):
    """Contexts 1..513 in slots [3, 0, 2, 5, 1] of a 600-key cache: up to 10 splits of whole key blocks, dealt
    evenly (513 keys: its tail block alone in the last split; 5 and 1: one split, the rest empty). NaN-filled
    output and workspace: every row written, the empty splits' unwritten acc rows never read."""
    q, kc, vc, slots, lengths = decode_inputs(hq, hkv, d, dtype, triton_device)
    block_n = K.pick_decode_config(dtype).block_n
    assert K.decode_num_splits(len(CONTEXTS), hkv, MAX_LEN, block_n) == min(264 // (5 * hkv), 600 // block_n + 1)
    monkeypatch.setattr(K, "_empty", nan_empty)
    ours = K.decode_attention(q, kc, vc, slots, lengths, d ** -0.5)
    check(ours, decode_reference(q, kc, vc, slots, lengths, d ** -0.5),
          decode_f64(q, kc, vc, slots, lengths, d ** -0.5))


@pytest.mark.parametrize("splits, min_blocks", [(1, 1), (2, 4), (7, 1), (24, 1), (5, 3)],
                         ids=["single", "two", "7", "24-mostly-empty", "min-3-blocks"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_split_counts(triton_device, monkeypatch, splits, min_blocks, dtype):
    """Whatever the split count and minimum size: one split (the direct-write path, no reduce kernel), splits of
    uneven block counts, most splits empty, a minimum of several blocks per split."""
    monkeypatch.setattr(K, "decode_num_splits", lambda *a: splits)
    monkeypatch.setattr(K, "_MIN_SPLIT_BLOCKS", min_blocks)
    monkeypatch.setattr(K, "_empty", nan_empty)
    hq, hkv, d = 7, 1, 64
    q, kc, vc, slots, lengths = decode_inputs(hq, hkv, d, dtype, triton_device)
    ours = K.decode_attention(q, kc, vc, slots, lengths, 0.125)
    check(ours, decode_reference(q, kc, vc, slots, lengths, 0.125), decode_f64(q, kc, vc, slots, lengths, 0.125))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_ignores_nan_past_lengths_and_in_unused_rows(triton_device, dtype):
    """The same inputs with NaN everywhere a row must not read: bit-identical, finite outputs."""
    hq, hkv, d = 12, 2, 128
    q, kc, vc, slots, lengths = decode_inputs(hq, hkv, d, dtype, triton_device)
    valid = torch.zeros(MAX_BATCH, MAX_LEN, dtype=torch.bool, device=triton_device)
    for s, n in zip(SLOTS, CONTEXTS):
        valid[s, :n] = True
    kc_nan = kc.masked_fill(~valid[:, :, None, None], float("nan"))
    vc_nan = vc.masked_fill(~valid[:, :, None, None], float("nan"))
    clean = K.decode_attention(q, kc, vc, slots, lengths, 0.09)
    poisoned = K.decode_attention(q, kc_nan, vc_nan, slots, lengths, 0.09)
    assert torch.isfinite(poisoned).all() and torch.equal(poisoned, clean)


def test_decode_graph_padding_rows(triton_device):
    """What DecodeGraphs replays for 3 live rows in a bucket of 5: two padding rows on spare slots (4, 6) with
    length 1 (their position 0 was just written; the rest of those rows is NaN). All rows finite and right."""
    hq, hkv, d = 16, 2, 128
    contexts, slots = [200, 63, 5, 1, 1], [3, 0, 2, 4, 6]
    q, kc, vc, slots_t, lengths = decode_inputs(hq, hkv, d, torch.float32, triton_device, contexts, slots,
                                                poison=True)
    ours = K.decode_attention(q, kc, vc, slots_t, lengths, d ** -0.5)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), decode_f64(q, kc, vc, slots_t, lengths, d ** -0.5), **FP32_TOL)


def test_decode_strided_q_and_cache(triton_device):
    """q a view of the fused (B, (Hq + 2 Hkv) D) qkv output, caches strided views of larger buffers."""
    hq, hkv, d = 12, 2, 64
    qkv = torch.randn(3, (hq + 2 * hkv) * d, device=triton_device)
    q = qkv[:, :hq * d].view(3, hq, d)
    kc = torch.randn(MAX_BATCH, MAX_LEN, hkv, 2 * d, device=triton_device)[..., d:]
    vc = torch.randn(MAX_BATCH, MAX_LEN + 5, hkv, d, device=triton_device)[:, 5:]
    slots = torch.tensor([6, 1, 3], device=triton_device)
    lengths = torch.tensor([77, 600, 2], device=triton_device)
    check(K.decode_attention(q, kc, vc, slots, lengths, 0.1), decode_reference(q, kc, vc, slots, lengths, 0.1),
          decode_f64(q, kc, vc, slots, lengths, 0.1))


def test_decode_num_splits_depends_on_static_shapes_only():
    assert K.decode_num_splits(1, 2, 32768) == K._DECODE_TARGET_PROGRAMS // 2  # batch 1, 2B: a full GPU
    assert K.decode_num_splits(1, 2, 8192) == 8192 // 64  # at most one split per key block of the cache
    assert K.decode_num_splits(1, 2, 1000) == 16
    assert K.decode_num_splits(1, 2, 1000, block_n=32) == 32
    assert K.decode_num_splits(8, 4, 32768) == K._DECODE_TARGET_PROGRAMS // 32
    assert K.decode_num_splits(128, 4, 32768) == 1  # large batches: the direct-write path
    assert K.decode_num_splits(1, 8, 1) == 1


def live_splits(length, splits, block_n, min_blocks=1):
    """_split_range on the host: the non-empty splits of a row and their [lo, hi) keys."""
    n_blocks = -(-length // block_n)
    n_live = max(min(n_blocks // min_blocks, splits), 1)
    spans = [((s * n_blocks // n_live) * block_n, min(((s + 1) * n_blocks // n_live) * block_n, length))
             for s in range(n_live)]
    return [(lo, hi) for lo, hi in spans if lo < hi]


@pytest.mark.parametrize("hkv", [2, 4])
def test_batch_1_fills_the_sms_once_the_context_has_the_blocks(hkv):
    """At batch 1 the non-empty programs are min(NUM_SPLITS, key blocks) per kv head: one per block for short
    contexts (a 1.6k context: 25 per kv head, no longer 7 of 256 keys), the whole target from NUM_SPLITS blocks on;
    the splits tile [0, length) exactly, whole blocks each (only the last one ends in a partial block)."""
    block_n, max_len = 64, 32768
    splits = K.decode_num_splits(1, hkv, max_len, block_n)
    assert splits * hkv >= K._DECODE_TARGET_PROGRAMS - hkv
    for length in (1, 63, 64, 65, 1600, splits * block_n - 1, splits * block_n + 1, 20000, max_len):
        spans = live_splits(length, splits, block_n)
        assert len(spans) == min(splits, -(-length // block_n))
        assert spans[0][0] == 0 and spans[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and all(lo % block_n == 0 for lo, _ in spans)
        sizes = [-(-(hi - lo) // block_n) for lo, hi in spans]
        assert max(sizes) - min(sizes) <= 1  # as even as whole blocks allow
    assert len(live_splits(1600, splits, block_n)) * hkv == 25 * hkv
    assert len(live_splits(20000, splits, block_n)) * hkv >= K._DECODE_TARGET_PROGRAMS - hkv


class no_host_sync:
    """Context manager: any Tensor -> host value conversion raises (on CUDA, also any synchronising call)."""

    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def __enter__(self):
        def boom(*a, **k):
            raise AssertionError("host sync during the launch")

        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
            self.mp.setattr(torch.Tensor, name, boom)
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        self.mp.undo()


def test_decode_launch_does_not_sync(triton_device, monkeypatch):
    q, kc, vc, slots, lengths = decode_inputs(12, 2, 64, torch.float32, triton_device)
    expected = K.decode_attention(q, kc, vc, slots, lengths, 0.125)  # warm-up: compiles, imports
    with no_host_sync(monkeypatch):
        ours = K.decode_attention(q, kc, vc, slots, lengths, 0.125)
        ops_out = resolve("triton", triton_device).decode_attention(q, kc, vc, slots, lengths, 0.125)
    assert torch.equal(ours, expected) and torch.equal(ops_out, expected)


# ------------------------------------------------------------------------------------------------ plumbing

def test_registered_as_the_triton_implementations(triton_device):
    from qwen2vl_fast.ops.decoding import decode_attention_triton, prefill_attention_triton

    ops = resolve("triton", triton_device)
    assert ops.chosen["prefill_attention"] == "triton" and ops.prefill_attention is prefill_attention_triton
    assert ops.chosen["decode_attention"] == "triton" and ops.decode_attention is decode_attention_triton
    if triton_device.type == "cpu":
        assert resolve("auto", "cpu").chosen["decode_attention"] == "torch"
    meta = VarlenMeta.from_lengths([17, 3], triton_device)
    q, k, v = qkv_views(20, 4, 2, 64, torch.float32, triton_device)
    torch.testing.assert_close(ops.prefill_attention(q, k, v, meta, 0.25),
                               prefill_reference(q, k, v, meta, 0.25), **FP32_TOL)


def test_custom_ops_trace_as_one_node(triton_device):
    """torch.compile sees each launch as one opaque node (register_fake gives the output's shape)."""
    q, kc, vc, slots, lengths = decode_inputs(12, 2, 64, torch.float32, triton_device, [5, 63], [2, 0])
    args = (q, kc, vc, slots, lengths, 0.125, 3, 32, 4, 2, 1)
    compiled = torch.compile(torch.ops.qwen2vl_fast.llm_decode_attention_triton, backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(*args), decode_reference(q, kc, vc, slots, lengths, 0.125), **FP32_TOL)
    meta = VarlenMeta.from_lengths([17, 3], triton_device)
    q, k, v = qkv_views(20, 4, 2, 64, torch.float32, triton_device)
    tiles = K.prepare(meta, triton_device).tiles(32)
    compiled = torch.compile(torch.ops.qwen2vl_fast.llm_prefill_attention_triton, backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, tiles, 0.25, 32, 32, 4, 2),
                               prefill_reference(q, k, v, meta, 0.25), **FP32_TOL)


def test_rejects_unsupported_inputs(triton_device):
    meta = VarlenMeta.from_lengths([4, 4], triton_device)
    q = torch.randn(8, 4, 64, device=triton_device)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        K.prefill_attention(q, q[:, :3], q[:, :3], meta, 0.1)
    with pytest.raises(ValueError, match="unit stride"):
        K.prefill_attention(q, q[:, :2], torch.randn(8, 2, 128, device=triton_device)[..., ::2], meta, 0.1)
    with pytest.raises(ValueError, match="prompts cover 8"):
        K.prefill_attention(q[:7], q[:7, :2], q[:7, :2], meta, 0.1)
    with pytest.raises(BackendError, match="head_dim.*got 8"):
        K.prefill_attention(q[..., :8], q[:, :2, :8], q[:, :2, :8], meta, 0.1)
    kc = torch.randn(4, 16, 2, 64, device=triton_device)
    idx = torch.zeros(2, dtype=torch.long, device=triton_device)
    with pytest.raises(ValueError, match="integer"):
        K.decode_attention(q[:2], kc, kc, idx.float(), idx, 0.1)
    with pytest.raises(ValueError, match="share one dtype"):
        K.decode_attention(q[:2], kc.half(), kc.half(), idx, idx, 0.1)


# The kernels compiled for sm_90a in a fresh interpreter (under TRITON_INTERPRET=1, set by conftest, @triton.jit
# gives InterpretedFunctions, which the compiler cannot take); ptxas -v for registers and spills.
_COMPILE_SM90 = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qwen2vl_fast.kernels import llm_attention as K

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

def build(fn, types, consts, cfg):
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    # what a launch on the model's tensors gets: 16-byte aligned pointers, strides multiples of 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n.endswith("_ptr") or n.startswith("stride_")}
    k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        open(os.path.join(d, "k.ptx"), "w").write(ptx)
        r = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", os.path.join(d, "k.ptx"), "-o",
                            os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True)
    return dict(wgmma=ptx.count("wgmma.mma_async"), mma=ptx.count("mma.sync"), cp_async=ptx.count("cp.async"),
                shared=k.metadata.shared, spills=[int(n) for n in re.findall(r"(\d+) bytes spill stores", r.stderr)],
                registers=[int(n) for n in re.findall(r"Used (\d+) registers", r.stderr)])

out = {}
io = {n: "*bf16" for n in ("Q_ptr", "K_ptr", "V_ptr", "O_ptr")}
types = dict(io, Tiles_ptr="*i32", qk_scale="fp32")
for name in ("_PREFILL_LONG", "_PREFILL_SHORT"):
    cfg = getattr(K, name)
    out[name] = build(K._prefill_attention_kernel, types, dict(
        REP=7, HEAD_DIM=128, BLOCK_D=128, EVEN_D=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PRECISION="tf32",
        WHILE_LOOP=False), cfg)
types = dict(io, Slots_ptr="*i64", Lengths_ptr="*i64", Mws_ptr="*fp32", Lws_ptr="*fp32", Accws_ptr="*fp32",
             qk_scale="fp32")
for splits in (1, 8):
    out[f"decode_{splits}"] = build(K._decode_split_kernel, types, dict(
        REP=7, GROUP=16, HEAD_DIM=128, BLOCK_D=128, EVEN_D=True, BLOCK_N=K._DECODE_16.block_n, NUM_SPLITS=splits,
        MIN_BLOCKS=K._MIN_SPLIT_BLOCKS, PRECISION="tf32", WHILE_LOOP=False), K._DECODE_16)
out["reduce"] = build(K._decode_reduce_kernel, {"Mws_ptr": "*fp32", "Lws_ptr": "*fp32", "Accws_ptr": "*fp32",
                      "O_ptr": "*bf16"}, dict(HEAD_DIM=128, BLOCK_D=128, NUM_SPLITS=132, SPLITS_POW2=256,
                      CHUNK=K._REDUCE_CHUNK), K.Config(0, 0, 4, 1))
print(json.dumps(out))
"""


def test_gpu_paths_compile_for_hopper():
    """The GPU code paths (the `for` key loops the interpreter cannot run), bf16, head_dim 128, r = 7, compiled
    for sm_90a without a GPU: prefill on wgmma, decode on mma.sync (16-row groups), both software-pipelined
    (cp.async), no spills anywhere."""
    import json
    import os
    import subprocess
    import sys

    import triton

    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    for name, k in info.items():
        assert k["spills"] and max(k["spills"]) == 0 and max(k["registers"]) <= 255, (name, k)
        assert k["shared"] <= 227 * 1024, (name, k)
    for name in ("_PREFILL_LONG", "_PREFILL_SHORT"):
        assert info[name]["wgmma"] > 0 and info[name]["cp_async"] > 0, (name, info[name])
    for name in ("decode_1", "decode_8"):
        assert info[name]["mma"] > 0 and info[name]["cp_async"] > 0, (name, info[name])
