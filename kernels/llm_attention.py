"""Attention of the Qwen2 decoder (GQA, head_dim 128 in every Qwen2-VL / Qwen2.5-VL model), in Triton:

- `prefill_attention`: causal attention inside each prompt of a packed batch, out[i] = softmax(scale *
  q[i] . k[j]^T, j in seq(i), j <= i) @ v; q (T, Hq, D), k/v (T, Hkv, D), q head h reads kv head h // r.
- `decode_attention`: one query per sequence against its KV-cache row, split over the keys (flash-decoding):
  q (B, Hq, D), k/v cache (max_batch, max_len, Hkv, D), slots (B,) cache rows, lengths (B,) valid keys.
- `rope_decode_attention`: a decode step's whole attention in ONE launch: rotary of q and of the new token's k,
  the cache write of k and v at position lengths - 1, flash-decoding and the merge of the splits.

Prefill. A *tile* is <= BLOCK_M consecutive query rows of ONE prompt (tiles start at the prompt's start, so
`row_lo - seq_start` is a multiple of BLOCK_M and hence of BLOCK_N); the program for (head, tile) walks the
keys seq_start .. row_hi: [seq_start, row_lo) in full key blocks below the diagonal with no mask at all, then
the BLOCK_M / BLOCK_N diagonal blocks [row_lo, row_hi) with the causal mask (which also hides keys past the
prompt, loaded as 0). Key blocks above the diagonal are never visited. K/V are read through h // r with no
repeat: the r q heads of one kv head are adjacent in the launch order (grid (Hq, num_tiles), axis 0 fastest),
so they run back to back and share that K/V in L2. Tiles are sorted by decreasing key range, and with heads as
the fast axis the whole launch is longest-first (the causal work per tile grows with its position in the
prompt; longest-first is the classic greedy balance for the last wave). The tile table is built on the host
from the host lengths once per VarlenMeta (all 28..80 layers share it) and copied without a sync.

Decode. Grid (B, Hkv, NUM_SPLITS): a program owns one kv head's GROUP of r = Hq / Hkv q heads (6, 7 or 8 in
the real models) and one split of the keys, so each K/V byte is read once for all r heads. The group is padded
to GROUP = max(16, next_pow2(r)) rows and scored with tl.dot (mma.sync m16n8k16): at r = 8 half the MMA rows
are zeros, but decode is bound by the K/V bytes, and tensor cores keep the arithmetic far below them. The
alternative, an elementwise r x BLOCK_N x D broadcast-multiply-reduce on the CUDA cores, needs a 3-D register
tile (8 x 64 x 128 fp32 over 128 threads = 512 registers per thread) or tiny key blocks, and cross-lane
reductions for every key: strictly worse here.
NUM_SPLITS is a host decision from static shapes only (B, Hkv, max_len: fixed per CUDA-graph bucket), never
from the runtime lengths: enough programs to cover the SMs twice at batch 1 (`decode_num_splits`). The split
*boundaries* are computed on the device from each row's length (`_split_range`): its ceil(length / BLOCK_N) key
blocks are dealt to min(NUM_SPLITS, blocks) splits as evenly as whole blocks allow, so a row occupies as many
programs as it has blocks, up to NUM_SPLITS (a 1.6k context at batch 1 of a 2-kv-head model: 2 x 25 programs of
one block; from NUM_SPLITS blocks on, every program), where a fixed max_len / NUM_SPLITS partition would put it
in one program and leave the others idle. The trade-off of one-block splits is the partials (see
_DECODE_TARGET_PROGRAMS): more workspace traffic per key while the context is short, where a step is bound by
latency and the number of SMs streaming keys rather than by bytes. Each program loops over its full key blocks
unmasked and at most one masked tail block (only the last non-empty split has one). With NUM_SPLITS > 1 it
writes a partial (m, l, unnormalised acc) per q head to a workspace; an empty split writes the neutral (m, l) =
(-1e30, 0) and no acc, and the reduce kernel (grid (B, Hq)) skips acc rows whose l is 0, so the workspace needs
no initialisation. With NUM_SPLITS == 1 (large batches) the split kernel normalises and writes the output
itself: no workspace, no second kernel.

Rope + decode (`_rope_decode_kernel`, grid (B, Hkv, NUM_SPLITS), the same splits). Each non-empty program
rotates its own q group from q, cos, sin (a few hundred bytes: cheaper than any hand-off between programs); the
program of the row's last non-empty split, whose keys end at lengths - 1, also rotates the new k, writes k and
v to the cache, and passes a CTA barrier before its key loads, so the new key is read back like any other and no
other program reads it. Rounding as rope_kv_write (each product and the sum rounded to the dtype, no FMA
contraction: the launch sets enable_fp_fusion=False for the whole kernel, a few more instructions in the
softmax, invisible in a memory-bound loop), so the cache holds exactly what rope_kv_write writes. The merge
happens in the same launch: each program stores its partial, then takes a ticket (an acq_rel atomic on a
per-device counter buffer, after a barrier); the program that takes a group's last ticket merges. One program
merging every split would serialise n_live x r x D x 4 B of loads (a 16k context: ~400 KB, several us), so
past FAN_IN non-empty splits the merge has two levels: the last of each FAN_IN consecutive splits merges them
into a group partial, the last of those merges the groups. Every merge folds its inputs in index order, so the
result is bitwise the same whichever program arrives last; mergers reset their counters to 0, so the next
launch (and every CUDA-graph replay) finds them zeroed. Empty splits exit at once (no ticket); a row of one
block writes its output directly. NUM_SPLITS == 1: no workspace, no ticket.

Numerics (both). Scores, softmax statistics and accumulators are fp32; scale * log2(e) is folded into one
multiply and the exponentials are exp2. The running max starts at -1e30, not -inf: a row with every key of a
block masked then gets p = 0 and alpha = 1 instead of exp2(-inf + inf) = NaN. Masked K/V lanes load 0, so NaN or
stale data past a length (or in unused cache rows) never reaches a sum (0 * NaN would be NaN). fp16/bf16: P is
rounded to the input dtype for the PV MMA, as in every flash kernel. fp32 inputs (parity runs) use
input_precision="ieee". head_dim: any 16..256; non-powers of two are padded to the next power of two with masks
(correct, not tuned: the LLM's head_dim is 128 everywhere).

Launch state: no host sync anywhere (decode is captured in CUDA graphs: lengths and slots are only read on the
device; padded graph rows with length 1 and spare slots cost one key each and are finite).

Sources read to learn the technique (no code taken): Dao, "FlashAttention-2" (2023), section 3.1; Dao et al.,
"Flash-Decoding for long-context inference" (2023 blog post): split the keys, combine with log-sum-exp.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qwen2vl_fast.errors import BackendError

from .tile_plans import TileTables, memoized_plan, ticket_counters

_LOG2E = 1.4426950408889634
_empty = torch.empty  # output / workspace allocation; the tests swap in a NaN-filled allocator


# ------------------------------------------------------------------------------------------------ shared

@triton.jit
def _load_rows(ptrs, row_ok, d_ok, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A (rows, BLOCK_D) tile. Masks are compile-time optional so full blocks of an even head_dim load with no
    predicate (16-byte vector loads); masked lanes read 0, never whatever lies past the valid rows."""
    if MASK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def _attend_block(acc, m_i, l_i, q, k_base, v_base, offs_m, start, key_hi, offs_d, d_ok,
                  stride_k, stride_v, qk_scale,
                  BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr):
    """Keys start .. start + BLOCK_N (offsets from k_base/v_base in key rows): scores, online-softmax update, PV.
    MASK: 0 none (every key valid for every row), 1 keys < key_hi (decode tail), 2 causal key <= query row
    (prefill diagonal; keys >= key_hi are masked by it too and are not loaded). m_i is in log2 units."""
    offs_n = start + tl.arange(0, BLOCK_N)
    key_ok = offs_n < key_hi
    k = _load_rows(k_base + offs_n[:, None] * stride_k + offs_d[None, :], key_ok, d_ok, MASK != 0, EVEN_D)
    v = _load_rows(v_base + offs_n[:, None] * stride_v + offs_d[None, :], key_ok, d_ok, MASK != 0, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASK == 1:
        s = tl.where(key_ok[None, :], s, float("-inf"))
    elif MASK == 2:
        s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
    # qk_scale > 0, so max(s) * qk_scale = max(s * qk_scale); s * qk_scale - m fuses into one FMA per score
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_range(acc, m_i, l_i, q, k_base, v_base, offs_m, lo, hi, key_hi, offs_d, d_ok,
                  stride_k, stride_v, qk_scale,
                  BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
                  WHILE_LOOP: tl.constexpr):
    """Key blocks lo, lo + BLOCK_N, ... < hi. On the GPU a `for` loop, which Triton software-pipelines
    (num_stages cp.async stages); WHILE_LOOP is for the interpreter only: Triton 3.6's interpreter with NumPy >=
    2.4 cannot run range() over runtime bounds (scalars are 1-element arrays, int() of those raises), but it
    evaluates `while start < hi`. Same blocks, same order."""
    if WHILE_LOOP:
        start = lo
        while start < hi:
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, offs_m, start, key_hi, offs_d, d_ok,
                                          stride_k, stride_v, qk_scale, BLOCK_N, EVEN_D, MASK, PRECISION)
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, offs_m, start, key_hi, offs_d, d_ok,
                                          stride_k, stride_v, qk_scale, BLOCK_N, EVEN_D, MASK, PRECISION)
    return acc, m_i, l_i


# ------------------------------------------------------------------------------------------------ prefill

@triton.jit
def _prefill_attention_kernel(
    Q_ptr, K_ptr, V_ptr, O_ptr, Tiles_ptr,
    stride_qs, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_os, stride_oh,
    qk_scale,
    REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    """Grid (Hq, num_tiles). Tiles_ptr: int32 (num_tiles, 3) = row_lo, row_hi, seq_start (plan_causal_tiles)."""
    head = tl.program_id(0)
    tile = tl.program_id(1)
    row_lo = tl.load(Tiles_ptr + tile * 3 + 0)
    row_hi = tl.load(Tiles_ptr + tile * 3 + 1)
    kv_lo = tl.load(Tiles_ptr + tile * 3 + 2)
    kv_head = head // REP

    # Base pointers in int64 (a packed batch x the fused qkv row stride passes 2^31 elements); offsets from them,
    # rows of one prompt, stay int32 (the launcher checks prompt length x row stride < 2^31).
    q_base = Q_ptr + row_lo.to(tl.int64) * stride_qs + head.to(tl.int64) * stride_qh
    o_base = O_ptr + row_lo.to(tl.int64) * stride_os + head.to(tl.int64) * stride_oh
    k_base = K_ptr + kv_lo.to(tl.int64) * stride_ks + kv_head.to(tl.int64) * stride_kh
    v_base = V_ptr + kv_lo.to(tl.int64) * stride_vs + kv_head.to(tl.int64) * stride_vh

    offs_m = (row_lo - kv_lo) + tl.arange(0, BLOCK_M)  # query positions in the prompt (same frame as keys)
    rows = tl.arange(0, BLOCK_M)
    row_ok = row_lo + rows < row_hi
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load_rows(q_base + rows[:, None] * stride_qs + offs_d[None, :], row_ok, d_ok, True, EVEN_D)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    diag = row_lo - kv_lo
    end = row_hi - kv_lo
    # below the diagonal: every key of these blocks is <= every query row of the tile, and inside the prompt
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, offs_m, 0, diag, end, offs_d, d_ok,
                                  stride_ks, stride_vs, qk_scale, BLOCK_N, EVEN_D, 0, PRECISION, WHILE_LOOP)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, offs_m, diag, end, end, offs_d, d_ok,
                                  stride_ks, stride_vs, qk_scale, BLOCK_N, EVEN_D, 2, PRECISION, WHILE_LOOP)

    # every row saw at least its own key, so l_i >= 1 (rows past row_hi are never stored)
    out = acc / l_i[:, None]
    ptrs = o_base + rows[:, None] * stride_os + offs_d[None, :]
    if EVEN_D:
        tl.store(ptrs, out.to(O_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(ptrs, out.to(O_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ------------------------------------------------------------------------------------------------ decode

@triton.jit
def _split_range(length, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, MIN_BLOCKS: tl.constexpr):
    """(n_live, lo, hi): how many splits of a row of `length` keys are non-empty, and the keys [lo, hi) of `split`
    (shared by both decode kernels). NUM_SPLITS is static (the grid); the boundaries come from the row's own
    length, on the device: its n_blocks = ceil(length / BLOCK_N) key blocks are dealt to n_live = min(NUM_SPLITS,
    n_blocks // MIN_BLOCKS) splits as evenly as whole blocks allow (floor / ceil of n_blocks / n_live each, split s
    from block s * n_blocks // n_live), so a row occupies min(NUM_SPLITS, its blocks) programs: a row with at
    least NUM_SPLITS blocks fills every split. Splits n_live.. are empty (hi = lo); split n_live - 1 ends at
    `length` and alone holds the partial tail block (and the row's last key)."""
    n_blocks = tl.cdiv(length, BLOCK_N)
    n_live = tl.maximum(tl.minimum(n_blocks // MIN_BLOCKS, NUM_SPLITS), 1)
    lo = (split * n_blocks // n_live) * BLOCK_N
    hi = tl.minimum(((split + 1) * n_blocks // n_live) * BLOCK_N, length)
    hi = tl.where(split < n_live, hi, lo)
    return n_live, lo, hi


@triton.jit
def _decode_split_kernel(
    Q_ptr, K_ptr, V_ptr, Slots_ptr, Lengths_ptr, O_ptr, Mws_ptr, Lws_ptr, Accws_ptr,
    stride_qb, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh, stride_ob, stride_oh,
    max_len, qk_scale,
    REP: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, MIN_BLOCKS: tl.constexpr, PRECISION: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
):
    """Grid (B, Hkv, NUM_SPLITS). Workspace (NUM_SPLITS > 1): Mws/Lws fp32 (B, Hq, NUM_SPLITS), Accws fp32
    (B, Hq, NUM_SPLITS, HEAD_DIM), contiguous."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    num_q_heads = tl.num_programs(1) * REP
    slot = tl.load(Slots_ptr + b).to(tl.int64)
    length = tl.maximum(tl.minimum(tl.load(Lengths_ptr + b), max_len), 0).to(tl.int32)  # never past the row

    _, lo, hi = _split_range(length, split, NUM_SPLITS, BLOCK_N, MIN_BLOCKS)
    full_hi = lo + (tl.maximum(hi - lo, 0) // BLOCK_N) * BLOCK_N

    rows = tl.arange(0, GROUP)
    row_ok = rows < REP
    heads = g * REP + rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load_rows(Q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                   row_ok, d_ok, True, EVEN_D)
    k_base = K_ptr + slot * stride_kb + g.to(tl.int64) * stride_kh
    v_base = V_ptr + slot * stride_vb + g.to(tl.int64) * stride_vh

    acc = tl.zeros((GROUP, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((GROUP,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((GROUP,), dtype=tl.float32)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, rows, lo, full_hi, hi, offs_d, d_ok,
                                  stride_kl, stride_vl, qk_scale, BLOCK_N, EVEN_D, 0, PRECISION, WHILE_LOOP)
    if full_hi < hi:  # the one partial block at the end of the row's keys
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, rows, full_hi, hi, offs_d, d_ok,
                                      stride_kl, stride_vl, qk_scale, BLOCK_N, EVEN_D, 1, PRECISION)

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # l_i >= 1 unless length <= 0 (then out = 0)
        ptrs = O_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(ptrs, out.to(O_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        ws = (b.to(tl.int64) * num_q_heads + heads) * NUM_SPLITS + split
        tl.store(Mws_ptr + ws, m_i, mask=row_ok)
        tl.store(Lws_ptr + ws, l_i, mask=row_ok)
        # an empty split stores (-1e30, 0) above and no acc: the reduce kernel never reads acc where l == 0
        tl.store(Accws_ptr + ws[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=row_ok[:, None] & d_ok[None, :] & (hi > lo))


@triton.jit
def _decode_reduce_kernel(Mws_ptr, Lws_ptr, Accws_ptr, O_ptr, stride_ob, stride_oh,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                          SPLITS_POW2: tl.constexpr, CHUNK: tl.constexpr):
    """Grid (B, Hq): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, M = max_s m_s (log-sum-exp merge)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    base = (b.to(tl.int64) * tl.num_programs(1) + h) * NUM_SPLITS
    offs_s = tl.arange(0, SPLITS_POW2)
    m = tl.load(Mws_ptr + base + offs_s, mask=offs_s < NUM_SPLITS, other=-1.0e30)
    m_max = tl.max(m, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    denom = tl.zeros((CHUNK,), dtype=tl.float32)
    for c in range(0, NUM_SPLITS, CHUNK):  # compile-time trip count
        offs_c = c + tl.arange(0, CHUNK)
        in_ws = offs_c < NUM_SPLITS
        l_c = tl.load(Lws_ptr + base + offs_c, mask=in_ws, other=0.0)
        m_c = tl.load(Mws_ptr + base + offs_c, mask=in_ws, other=-1.0e30)
        live = l_c > 0.0  # empty splits left their acc rows unwritten: skip them (no load, no traffic)
        w = tl.where(live, tl.exp2(m_c - m_max), 0.0)
        denom += w * l_c
        a = tl.load(Accws_ptr + (base + offs_c)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=live[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(a * w[:, None], 0)
    total = tl.sum(denom, 0)
    out = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(O_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_d,
             out.to(O_ptr.dtype.element_ty), mask=d_ok)


# ------------------------------------------------------------------------------------------------ rope + decode

@triton.jit
def _rotate(x_ptrs, xp_ptrs, c, s, first, mask):
    """x * cos + rotate_half(x) * sin for rows of x at their dims d (x_ptrs) and partner dims d +- D/2 (xp_ptrs),
    rotate_half(x)[d] = -x[d + D/2] in the first half, x[d - D/2] in the second; c, s fp32 holding values of x's
    dtype. Rounded to the dtype after each product and after the sum, as torch's ops in that dtype are (and as
    kernels/mrope.py's _rotate): bit-identical to ops.decoding.rope_kv_write's reference, given no FMA
    contraction (the launch passes enable_fp_fusion=False)."""
    x = tl.load(x_ptrs, mask=mask, other=0.0)
    xp = tl.load(xp_ptrs, mask=mask, other=0.0)
    dt = x.dtype
    a = (x.to(tl.float32) * c).to(dt).to(tl.float32)
    b = (xp.to(tl.float32) * s).to(dt).to(tl.float32)
    return tl.where(first, a - b, a + b).to(dt)


@triton.jit
def _store_out(O_ptr, b, heads, row_ok, offs_d, d_ok, acc, l_i, stride_ob, stride_oh):
    """out = acc / l for the rows of one (b, kv head) group; l == 0 only for a row with no key (then out = 0)."""
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    ptrs = O_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(ptrs, out.to(O_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _rope_decode_kernel(
    Q_ptr, Kn_ptr, Vn_ptr, Cos_ptr, Sin_ptr, K_ptr, V_ptr, Slots_ptr, Lengths_ptr, O_ptr,
    Mws_ptr, Lws_ptr, Accws_ptr, Tickets_ptr,
    stride_qb, stride_qh, stride_knb, stride_knh, stride_vnb, stride_vnh, stride_cb, stride_sb,
    stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh, stride_ob, stride_oh,
    max_batch, max_len, qk_scale,
    REP: tl.constexpr, GROUP: tl.constexpr, RGROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    MIN_BLOCKS: tl.constexpr, FAN_IN: tl.constexpr, PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """Grid (B, Hkv, NUM_SPLITS): rotary of q and of the new k, cache write of k and v, flash-decoding and the
    split merge, in one launch (see the module docstring, "Rope + decode").
    Workspace (NUM_SPLITS > 1), contiguous, never initialised: Mws / Lws fp32 (B * Hkv * (NUM_SPLITS +
    NUM_GROUPS) * RGROUP,), Accws fp32 (the same rows x HEAD_DIM): rows [0, B Hkv NUM_SPLITS RGROUP) the splits'
    partials, (grp, split, head); after them the level-1 merges' partials, (grp, group, head), NUM_GROUPS =
    ceil(NUM_SPLITS / FAN_IN). Tickets int32, zero before and after a launch: [0, B Hkv) one per (b, kv head),
    then B Hkv NUM_GROUPS level-1 tickets."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    if REVERSE:  # tests: the grid's split order reversed, so other programs of each group arrive last
        split = NUM_SPLITS - 1 - tl.program_id(2)
    else:
        split = tl.program_id(2)
    num_kv = tl.num_programs(1)
    slot = tl.load(Slots_ptr + b).to(tl.int64)
    n_keys = tl.load(Lengths_ptr + b)
    length = tl.maximum(tl.minimum(n_keys, max_len), 0).to(tl.int32)  # never read past the row
    n_live, lo, hi = _split_range(length, split, NUM_SPLITS, BLOCK_N, MIN_BLOCKS)
    rows = tl.arange(0, GROUP)
    row_ok = rows < REP
    heads = g * REP + rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    if lo < hi:  # an empty split (past its row's blocks) does nothing at all: no q, no workspace, no ticket
        first = offs_d < HALF
        partner = tl.where(first, offs_d + HALF, offs_d - HALF)
        c = tl.load(Cos_ptr + b.to(tl.int64) * stride_cb + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        s = tl.load(Sin_ptr + b.to(tl.int64) * stride_sb + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        # every program of the group rotates its own copy of q (r x D, a few hundred bytes from L2): no program
        # waits for another, and q is never written back
        q_rows = Q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
        q = _rotate(q_rows + offs_d[None, :], q_rows + partner[None, :], c[None, :], s[None, :], first[None, :],
                    row_ok[:, None] & d_ok[None, :])
        k_base = K_ptr + slot * stride_kb + g.to(tl.int64) * stride_kh
        v_base = V_ptr + slot * stride_vb + g.to(tl.int64) * stride_vh
        if split == n_live - 1:
            # The last non-empty split holds key position n_keys - 1, the new token's: this program alone rotates
            # k, writes k and v to the cache and reads them back below, so no other program depends on the
            # write. Out-of-range slots or positions are not written (as kernels/mrope.py).
            pos = n_keys.to(tl.int64) - 1
            kn = Kn_ptr + b.to(tl.int64) * stride_knb + g.to(tl.int64) * stride_knh
            k_new = _rotate(kn + offs_d, kn + partner, c, s, first, d_ok)
            v_new = tl.load(Vn_ptr + b.to(tl.int64) * stride_vnb + g.to(tl.int64) * stride_vnh + offs_d,
                            mask=d_ok, other=0.0)
            w_ok = d_ok & (slot >= 0) & (slot < max_batch) & (pos >= 0) & (pos < max_len)
            tl.store(k_base + pos * stride_kl + offs_d, k_new, mask=w_ok)
            tl.store(v_base + pos * stride_vl + offs_d, v_new, mask=w_ok)
        # Every thread's cache stores above precede every thread's key loads below (bar.sync orders the CTA's
        # global memory accesses; the block holding the new key is then read like any other).
        tl.debug_barrier()

        full_hi = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
        acc = tl.zeros((GROUP, BLOCK_D), dtype=tl.float32)
        m_i = tl.full((GROUP,), -1.0e30, dtype=tl.float32)
        l_i = tl.zeros((GROUP,), dtype=tl.float32)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, rows, lo, full_hi, hi, offs_d, d_ok,
                                      stride_kl, stride_vl, qk_scale, BLOCK_N, EVEN_D, 0, PRECISION, WHILE_LOOP)
        if full_hi < hi:
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, rows, full_hi, hi, offs_d, d_ok,
                                          stride_kl, stride_vl, qk_scale, BLOCK_N, EVEN_D, 1, PRECISION)

        if NUM_SPLITS == 1:
            _store_out(O_ptr, b, heads, row_ok, offs_d, d_ok, acc, l_i, stride_ob, stride_oh)
        elif n_live == 1:  # a row of one block: nothing to merge, no workspace, no ticket
            _store_out(O_ptr, b, heads, row_ok, offs_d, d_ok, acc, l_i, stride_ob, stride_oh)
        else:
            NUM_GROUPS: tl.constexpr = (NUM_SPLITS + FAN_IN - 1) // FAN_IN
            num_b = tl.num_programs(0)
            grp = b.to(tl.int64) * num_kv + g
            _store_partial(Mws_ptr, Lws_ptr, Accws_ptr, (grp * NUM_SPLITS + split) * RGROUP, m_i, l_i, acc, rows,
                           row_ok, offs_d, d_ok, HEAD_DIM)
            n_groups = tl.cdiv(n_live, FAN_IN)
            # Tickets: every thread's partial stores precede the one atomic (bar.sync, then a release at GPU
            # scope); the program that takes the last ticket acquires the others' partials and merges them.
            tl.debug_barrier()
            if n_groups == 1:  # up to FAN_IN splits: the last of them merges all into the output
                ticket = tl.atomic_add(Tickets_ptr + grp, 1, sem="acq_rel", scope="gpu")
                if ticket == n_live - 1:
                    m_r, l_r, acc_r = _merge(Mws_ptr, Lws_ptr, Accws_ptr, grp * NUM_SPLITS * RGROUP, n_live, offs_d,
                                             d_ok, REP, RGROUP, HEAD_DIM, BLOCK_D, FAN_IN, WHILE_LOOP)
                    rr = tl.arange(0, RGROUP)
                    _store_out(O_ptr, b, g * REP + rr, rr < REP, offs_d, d_ok, acc_r, l_r, stride_ob, stride_oh)
                    tl.atomic_xchg(Tickets_ptr + grp, 0, sem="relaxed", scope="gpu")  # zero for the next launch
            else:
                # Two levels, so no single program merges more than FAN_IN (or NUM_GROUPS) partials: the last of
                # each FAN_IN consecutive splits merges them into a group partial, the last group merger merges
                # the group partials into the output. Both in a fixed order.
                j = split // FAN_IN
                in_group = tl.minimum(n_live - j * FAN_IN, FAN_IN)
                t1 = Tickets_ptr + num_b * num_kv + grp * NUM_GROUPS + j
                ticket = tl.atomic_add(t1, 1, sem="acq_rel", scope="gpu")
                if ticket == in_group - 1:
                    m_r, l_r, acc_r = _merge(Mws_ptr, Lws_ptr, Accws_ptr, (grp * NUM_SPLITS + j * FAN_IN) * RGROUP,
                                             in_group, offs_d, d_ok, REP, RGROUP, HEAD_DIM, BLOCK_D, FAN_IN,
                                             WHILE_LOOP)
                    tl.atomic_xchg(t1, 0, sem="relaxed", scope="gpu")
                    level2 = num_b * num_kv * NUM_SPLITS * RGROUP + grp * NUM_GROUPS * RGROUP
                    rr = tl.arange(0, RGROUP)
                    _store_partial(Mws_ptr, Lws_ptr, Accws_ptr, level2 + j * RGROUP, m_r, l_r, acc_r, rr, rr < REP,
                                   offs_d, d_ok, HEAD_DIM)
                    tl.debug_barrier()
                    ticket = tl.atomic_add(Tickets_ptr + grp, 1, sem="acq_rel", scope="gpu")
                    if ticket == n_groups - 1:
                        m_r, l_r, acc_r = _merge(Mws_ptr, Lws_ptr, Accws_ptr, level2, n_groups, offs_d, d_ok, REP,
                                                 RGROUP, HEAD_DIM, BLOCK_D, FAN_IN, WHILE_LOOP)
                        _store_out(O_ptr, b, g * REP + rr, rr < REP, offs_d, d_ok, acc_r, l_r, stride_ob,
                                   stride_oh)
                        tl.atomic_xchg(Tickets_ptr + grp, 0, sem="relaxed", scope="gpu")
    else:
        if split == 0:
            if length == 0:  # no key at all (never sent by the engine): out = 0, as decode_attention's kernels
                _store_out(O_ptr, b, heads, row_ok, offs_d, d_ok, tl.zeros((GROUP, BLOCK_D), dtype=tl.float32),
                           tl.zeros((GROUP,), dtype=tl.float32), stride_ob, stride_oh)


@triton.jit
def _store_partial(Mws_ptr, Lws_ptr, Accws_ptr, base, m_i, l_i, acc, rows, row_ok, offs_d, d_ok,
                   HEAD_DIM: tl.constexpr):
    """An unnormalised partial (m, l, acc) of the group's heads at workspace rows base + head."""
    ws = base + rows
    tl.store(Mws_ptr + ws, m_i, mask=row_ok)
    tl.store(Lws_ptr + ws, l_i, mask=row_ok)
    tl.store(Accws_ptr + ws[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_step(Mws_ptr, Lws_ptr, Accws_ptr, base, c0, count, m_run, l_run, acc_run, offs_d, d_ok,
                REP: tl.constexpr, RGROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr):
    """Partials c0 .. c0 + CHUNK (< count) of every head folded into the running (m, l, acc): one load of CHUNK x
    RGROUP rows of HEAD_DIM fp32."""
    sp = c0 + tl.arange(0, CHUNK)
    rr = tl.arange(0, RGROUP)
    ok = (sp < count)[:, None] & (rr < REP)[None, :]
    idx = base + sp[:, None] * RGROUP + rr[None, :]  # (CHUNK, RGROUP)
    # .cg: from L2, where the other SMs' partials are (never a line this SM's L1 kept from an earlier launch)
    m_c = tl.load(Mws_ptr + idx, mask=ok, other=-1.0e30, cache_modifier=".cg")
    l_c = tl.load(Lws_ptr + idx, mask=ok, other=0.0, cache_modifier=".cg")
    a = tl.load(Accws_ptr + idx[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                mask=ok[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg")
    m_new = tl.maximum(m_run, tl.max(m_c, 0))
    alpha = tl.exp2(m_run - m_new)
    w = tl.where(ok, tl.exp2(m_c - m_new[None, :]), 0.0)
    l_run = l_run * alpha + tl.sum(w * l_c, 0)
    acc_run = acc_run * alpha[:, None] + tl.sum(a * w[:, :, None], 0)
    return m_new, l_run, acc_run


@triton.jit
def _merge(Mws_ptr, Lws_ptr, Accws_ptr, base, count, offs_d, d_ok, REP: tl.constexpr, RGROUP: tl.constexpr,
           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, WHILE_LOOP: tl.constexpr):
    """The log-sum-exp merge of `count` consecutive partials at workspace rows base + i * RGROUP + head, folded in
    order 0, 1, ... (CHUNK at a time, the running max rescaled as in the attention loop): (m, l, acc) per head,
    a function of the partials alone, so bitwise the same whichever program runs it."""
    m_run = tl.full((RGROUP,), -1.0e30, dtype=tl.float32)
    l_run = tl.zeros((RGROUP,), dtype=tl.float32)
    acc_run = tl.zeros((RGROUP, BLOCK_D), dtype=tl.float32)
    if WHILE_LOOP:  # the interpreter (see _attend_range)
        c0 = 0
        while c0 < count:
            m_run, l_run, acc_run = _merge_step(Mws_ptr, Lws_ptr, Accws_ptr, base, c0, count, m_run, l_run, acc_run,
                                                offs_d, d_ok, REP, RGROUP, HEAD_DIM, CHUNK)
            c0 += CHUNK
    else:
        for c0 in range(0, count, CHUNK):
            m_run, l_run, acc_run = _merge_step(Mws_ptr, Lws_ptr, Accws_ptr, base, c0, count, m_run, l_run, acc_run,
                                                offs_d, d_ok, REP, RGROUP, HEAD_DIM, CHUNK)
    return m_run, l_run, acc_run


# ------------------------------------------------------------------------------------------------ host side

@dataclass(frozen=True)
class Config:
    block_m: int  # query rows per program (prefill); unused by decode
    block_n: int  # keys per loop iteration
    num_warps: int
    num_stages: int


# Launch configurations for Hopper (H100/H200, 132 SMs, 227 KB shared per CTA) at head_dim 128. Chosen by
# reasoning and checked by compiling for sm_90a here (tests/test_kernels_llm_attention.py: wgmma / mma, cp.async
# pipelining, no spills); not yet timed or autotuned on a GPU.
# Prefill, 16-bit:
# - LONG: BLOCK_M 128 / BLOCK_N 64 / 8 warps / 3 stages. Two warpgroups, each issuing m64n64k16 wgmma on its
#   64 query rows; per thread the 128x128 fp32 accumulator is 64 registers, the 128x64 score tile 32, P 16.
#   Shared: Q 32 KB + 3 x (K 16 KB + V 16 KB) = 128 KB -> 1 CTA/SM; ptxas: 186 registers, no spills (R = 7,
#   bf16, strides divisible by 16 as the JIT specialises the model's). Two diagonal blocks per tile are
#   masked, every other block runs without a mask. First alternative to time: BLOCK_N 128 with 2 stages (same
#   shared memory, half the softmax passes, more registers).
# - SHORT: BLOCK_M 64 / BLOCK_N 64 / 4 warps / 3 stages when 128-row tiles would give under two waves
#   (short prompts, batch 1): one warpgroup, 16 KB Q + 96 KB K/V = 112 KB -> 2 CTAs/SM (just: 2 x 113 of
#   228 KB), and twice the tiles; ptxas: 190 registers, no spills.
# - FP32 (parity runs only; the model runs in bf16): BLOCK_M 32 / BLOCK_N 32 / 16 warps / 2 stages. The ieee
#   dot runs on FMA units with its operands in registers: at D = 128, 32x32 spills 1.7 KB at 4 warps and 344 B
#   at 8; 16 warps: 62 registers, no spills (32x16 at 4 warps also fits, but doubles the interpreter's steps).
# Decode (per program: one kv head's group padded to 16 rows, one split of keys):
# - 16-bit: BLOCK_N 64 / 4 warps / 3 stages: K+V per block 2 x 64 x 128 x 2 B = 32 KB, two blocks in flight
#   per CTA (ptxas: 70 KB shared, 127-138 registers by GQA ratio and split count -> 3 CTAs/SM): more than the
#   ~15-20 KB per SM that Little's law asks for at HBM3 latency, so the splits' CTAs saturate bandwidth.
#   mma.sync m16n8k16 (wgmma needs 64 rows; the group has <= 16).
# - FP32: BLOCK_N 32 / 16 warps / 2 stages (ieee FMA dot: 4 warps spill 576 B, 8 warps 48 B; 16: 128 registers).
_PREFILL_LONG = Config(block_m=128, block_n=64, num_warps=8, num_stages=3)
_PREFILL_SHORT = Config(block_m=64, block_n=64, num_warps=4, num_stages=3)
_PREFILL_FP32 = Config(block_m=32, block_n=32, num_warps=16, num_stages=2)
_DECODE_16 = Config(block_m=0, block_n=64, num_warps=4, num_stages=3)
_DECODE_FP32 = Config(block_m=0, block_n=32, num_warps=16, num_stages=2)
_NUM_SMS = 132  # H100 SXM and H200
_MIN_PROGRAMS_FOR_LONG = 2 * _NUM_SMS
# Decode splits: aim at two programs per SM (one CTA's softmax and MMAs overlap the other's loads) at batch 1, at
# any context length that has the key blocks for it. The minimum split is ONE key block (BLOCK_N keys), and a row's
# blocks are dealt evenly to min(NUM_SPLITS, blocks) splits, so at batch 1 a row with >= NUM_SPLITS blocks keeps
# all 2 x 132 programs busy, and a shorter one one program per block (a 1.6k context with 2 kv heads: 2 x 25
# programs, where the former 256-key minimum gave 2 x 7). The price is the partials: a split costs r x D x 4 B of
# fp32 written and read again (8rD bytes) against its keys' K + V (>= BLOCK_N x D x 2 x 2 B at 16 bits, BLOCK_N
# 64: 256D), up to 2r / 64 = 19-25% more traffic at r = 6..8 when every split is one block. That only happens
# while the context has fewer blocks than NUM_SPLITS (under ~8k keys at batch 1), where a step is bound by latency
# and by how many SMs stream keys, not by bytes; from there on the share falls as 2r / (keys per split) (5% at
# 32k). The old floor of 256 keys is _MIN_SPLIT_BLOCKS = 4 away.
_DECODE_TARGET_PROGRAMS = 2 * _NUM_SMS
_MIN_SPLIT_BLOCKS = 1  # the smallest split, in key blocks
_REDUCE_CHUNK = 16  # splits merged per reduce-loop step: 16 x 128 fp32 = 16 registers per thread at 4 warps
# Rope + decode merge: one step loads _MERGE_ROWS (partial, head) rows of HEAD_DIM fp32, 64 x 128 = 64 registers per
# thread at 4 warps (free by then: the attention loop is done); FAN_IN = _MERGE_ROWS / next_pow2(r) partials (8 at
# r = 6..8), which is also the fan-in of the two-level merge: a 1.6k context at batch 1 (25 one-block splits per kv
# head) merges in one step per group of 8 splits, then one step over the 4 group partials.
_MERGE_ROWS = 64


def pick_prefill_config(dtype: torch.dtype, lengths, heads: int) -> Config:
    """The prefill launch configuration for (dtype, prompt lengths, q heads); see the table above."""
    if dtype == torch.float32:
        return _PREFILL_FP32
    tiles = sum(triton.cdiv(n, _PREFILL_LONG.block_m) for n in lengths)
    return _PREFILL_LONG if tiles * heads >= _MIN_PROGRAMS_FOR_LONG else _PREFILL_SHORT


def pick_decode_config(dtype: torch.dtype) -> Config:
    return _DECODE_FP32 if dtype == torch.float32 else _DECODE_16


def decode_num_splits(batch: int, kv_heads: int, max_len: int, block_n: int = _DECODE_16.block_n) -> int:
    """NUM_SPLITS from static shapes only (graph-capture safe): about _DECODE_TARGET_PROGRAMS programs, at most
    one split per _MIN_SPLIT_BLOCKS key blocks of the cache length, at least 1. Batch 1 of a 2-kv-head model with
    an 8k or longer cache: 128-132 splits (whether a row fills them is up to its length, on the device: see
    _split_range); batch 8 x 4 kv heads: 8; batch >= 66 x 4: 1 (no workspace, no merge)."""
    want = max(1, _DECODE_TARGET_PROGRAMS // max(1, batch * kv_heads))
    return max(1, min(want, triton.cdiv(max_len, _MIN_SPLIT_BLOCKS * block_n)))


def _block_d(d: int) -> int:
    if d < 16 or d > 256:
        raise BackendError(f"the Triton LLM attention supports head_dim 16..256; got {d}; use the torch backend")
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def plan_causal_tiles(lengths, block_m: int) -> list[int]:
    """Flat [row_lo, row_hi, seq_start] * num_tiles: each prompt of `lengths` (packed back to back) cut into
    chunks of block_m rows from its start. Sorted by decreasing causal key range row_hi - seq_start (longest
    programs first); the sort is stable."""
    tiles, pos = [], 0
    for n in lengths:
        n = int(n)
        tiles.extend((r, min(r + block_m, pos + n), pos) for r in range(pos, pos + n, block_m))
        pos += max(n, 0)
    tiles.sort(key=lambda t: t[2] - t[1])
    return [x for t in tiles for x in t]


@dataclass
class CausalPlan:
    """Per-batch prefill metadata from a VarlenMeta, built once and shared by every layer: tiles(block_m) is an
    int32 (num_tiles, 3) device tensor built from the host lengths, copied from pinned memory without a sync."""

    lengths: tuple
    total: int
    device: torch.device
    tiles: TileTables  # tiles(block_m)


_PLANS: dict = {}


def prepare(meta, device=None) -> CausalPlan:
    """The CausalPlan of `meta` (a qwen2vl_fast.ops.VarlenMeta), memoised on the meta object's identity for as
    long as it lives. Reads only the host lengths: no sync."""
    return memoized_plan(_PLANS, meta, device, lambda lengths, device: CausalPlan(
        lengths, sum(lengths), device, TileTables(lengths, device, plan_causal_tiles, 3)))


def _prefill_launch(q, k, v, tiles, scale, cfg: Config) -> torch.Tensor:
    t, hq, d = q.shape
    out = _empty((t, hq, d), dtype=q.dtype, device=q.device)
    if t == 0 or tiles.shape[0] == 0 or hq == 0:
        return out
    block_d = _block_d(d)
    _prefill_attention_kernel[(hq, tiles.shape[0])](
        q, k, v, out, tiles,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        float(scale) * _LOG2E,
        REP=hq // k.shape[1], HEAD_DIM=d, BLOCK_D=block_d, EVEN_D=block_d == d,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PRECISION=_precision(q.dtype), WHILE_LOOP=_interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _decode_launch(q, k_cache, v_cache, slots, lengths, scale, num_splits: int, cfg: Config,
                   min_blocks: int) -> torch.Tensor:
    b, hq, d = q.shape
    max_len, hkv = k_cache.shape[1], k_cache.shape[2]
    rep = hq // hkv
    out = _empty((b, hq, d), dtype=q.dtype, device=q.device)
    if b == 0 or hq == 0:
        return out
    block_d = _block_d(d)
    if num_splits > 1:
        m_ws = _empty((b, hq, num_splits), dtype=torch.float32, device=q.device)
        l_ws = _empty((b, hq, num_splits), dtype=torch.float32, device=q.device)
        acc_ws = _empty((b, hq, num_splits, d), dtype=torch.float32, device=q.device)
    else:  # never touched: the split kernel writes `out` itself
        m_ws = l_ws = acc_ws = out
    _decode_split_kernel[(b, hkv, num_splits)](
        q, k_cache, v_cache, slots, lengths, out, m_ws, l_ws, acc_ws,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        max_len, float(scale) * _LOG2E,
        REP=rep, GROUP=max(16, triton.next_power_of_2(rep)), HEAD_DIM=d, BLOCK_D=block_d, EVEN_D=block_d == d,
        BLOCK_N=cfg.block_n, NUM_SPLITS=num_splits, MIN_BLOCKS=min_blocks, PRECISION=_precision(q.dtype),
        WHILE_LOOP=_interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if num_splits > 1:
        pow2 = triton.next_power_of_2(num_splits)
        _decode_reduce_kernel[(b, hq)](
            m_ws, l_ws, acc_ws, out, out.stride(0), out.stride(1),
            HEAD_DIM=d, BLOCK_D=block_d, NUM_SPLITS=num_splits, SPLITS_POW2=pow2,
            CHUNK=min(pow2, _REDUCE_CHUNK), num_warps=4,
        )
    return out


@torch.library.custom_op("qwen2vl_fast::llm_prefill_attention_triton", mutates_args=())
def prefill_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: torch.Tensor, scale: float,
                         block_m: int, block_n: int, num_warps: int, num_stages: int) -> torch.Tensor:
    """The prefill launch as one graph node. tiles must come from plan_causal_tiles(block_m)."""
    return _prefill_launch(q, k, v, tiles, scale, Config(block_m, block_n, num_warps, num_stages))


@prefill_attention_op.register_fake
def _(q, k, v, tiles, scale, block_m, block_n, num_warps, num_stages):
    return q.new_empty(q.shape)


@torch.library.custom_op("qwen2vl_fast::llm_decode_attention_triton", mutates_args=())
def decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                        lengths: torch.Tensor, scale: float, num_splits: int, block_n: int, num_warps: int,
                        num_stages: int, min_blocks: int) -> torch.Tensor:
    """The decode launch (split kernel + reduce kernel) as one graph node."""
    return _decode_launch(q, k_cache, v_cache, slots, lengths, scale, num_splits,
                          Config(0, block_n, num_warps, num_stages), min_blocks)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, slots, lengths, scale, num_splits, block_n, num_warps, num_stages, min_blocks):
    return q.new_empty(q.shape)


def _check_float(*ts):
    dt = ts[0].dtype
    if any(t.dtype != dt for t in ts) or dt not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype of float16/bfloat16/float32; got "
                         f"{', '.join(str(t.dtype) for t in ts)}")
    if any(t.stride(-1) != 1 for t in ts):
        raise ValueError("q, k, v need a unit stride in the last (head_dim) dimension")


def _check_int32_offsets(rows: int, *ts):
    """Inside a program, offsets from the int64 base pointers are int32: rows x row stride must fit."""
    worst = rows * max(t.stride(0) for t in ts) + max(t.stride(1) * t.shape[1] for t in ts)
    if worst >= 2 ** 31:
        raise BackendError(f"{rows} rows at row strides {[t.stride(0) for t in ts]} overflow the kernels' int32 "
                           f"offsets; use the torch backend")


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta, scale: float) -> torch.Tensor:
    """Causal GQA attention within each prompt of `meta` (a VarlenMeta), the Triton implementation.

    q (T, Hq, D), k/v (T, Hkv, D) with Hq % Hkv == 0: fp16 / bf16 / fp32, any strides with a unit last-dim
    stride (the model passes views of the fused qkv output, row stride (Hq + 2 Hkv) D; nothing is copied).
    T = sum(meta.lengths). Returns a new contiguous (T, Hq, D) tensor in q's dtype.
    """
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] \
            or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q must be (T, Hq, D) and k, v (T, Hkv, D) with Hq a multiple of Hkv; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _check_float(q, k, v)
    _block_d(q.shape[2])
    plan = prepare(meta, q.device)
    if plan.total != q.shape[0]:
        raise ValueError(f"q has {q.shape[0]} rows but the prompts cover {plan.total}")
    _check_int32_offsets(max(plan.lengths, default=0), q, k, v)
    cfg = pick_prefill_config(q.dtype, plan.lengths, q.shape[1])
    return prefill_attention_op(q, k, v, plan.tiles(cfg.block_m), float(scale), cfg.block_m, cfg.block_n,
                                cfg.num_warps, cfg.num_stages)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence against its cache row, the Triton implementation (flash-decoding).

    q (B, Hq, D); k_cache/v_cache (max_batch, max_len, Hkv, D) of one layer, Hq % Hkv == 0; any strides with a
    unit last-dim stride. slots (B,) integer cache rows; lengths (B,) integer valid keys per row (the current
    token's included; 1 for graph padding rows); both stay on the device and are never read on the host, so
    the launch is CUDA-graph capturable. Returns a new contiguous (B, Hq, D) tensor in q's dtype.
    """
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[3] != q.shape[2] \
            or k_cache.shape[2] == 0 or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"q must be (B, Hq, D) and the caches (max_batch, max_len, Hkv, D) with Hq a multiple of "
                         f"Hkv; got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if slots.shape != (q.shape[0],) or lengths.shape != (q.shape[0],) or slots.is_floating_point() \
            or lengths.is_floating_point():
        raise ValueError(f"slots and lengths must be integer ({q.shape[0]},) tensors; got {slots.dtype} "
                         f"{tuple(slots.shape)}, {lengths.dtype} {tuple(lengths.shape)}")
    _check_float(q, k_cache, v_cache)
    _block_d(q.shape[2])
    _check_int32_offsets(k_cache.shape[1], k_cache.select(0, 0), v_cache.select(0, 0))
    cfg = pick_decode_config(q.dtype)
    splits = decode_num_splits(q.shape[0], k_cache.shape[2], k_cache.shape[1], cfg.block_n)
    return decode_attention_op(q, k_cache, v_cache, slots, lengths, float(scale), splits, cfg.block_n,
                               cfg.num_warps, cfg.num_stages, _MIN_SPLIT_BLOCKS)


# ------------------------------------------------------------------------------------------------ rope + decode host

_COUNTERS: dict = {}  # device -> int32 tickets, one per (b, kv head), zero between launches
_MIN_COUNTERS = 4096  # B x Hkv of any CUDA-graph bucket (256 x 8 = 2048) fits: the buffer never grows in a capture


def _counters(device: torch.device, n: int) -> torch.Tensor:
    return ticket_counters(_COUNTERS, device, n, _MIN_COUNTERS, "rope_decode_attention")


def _rope_decode_launch(q, k, v, cos, sin, k_cache, v_cache, slots, lengths, scale, num_splits: int, cfg: Config,
                        min_blocks: int, reverse: bool = False) -> torch.Tensor:
    b, hq, d = q.shape
    max_batch, max_len, hkv = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    rep = hq // hkv
    out = _empty((b, hq, d), dtype=q.dtype, device=q.device)
    if b == 0 or hq == 0:
        return out
    block_d = _block_d(d)
    rgroup = triton.next_power_of_2(rep)
    fan_in = max(1, _MERGE_ROWS // rgroup)
    if num_splits > 1:
        rows = b * hkv * (num_splits + triton.cdiv(num_splits, fan_in)) * rgroup  # splits' + level-1 partials
        m_ws = _empty((rows,), dtype=torch.float32, device=q.device)
        l_ws = _empty((rows,), dtype=torch.float32, device=q.device)
        acc_ws = _empty((rows, d), dtype=torch.float32, device=q.device)
        tickets = _counters(q.device, b * hkv * (1 + triton.cdiv(num_splits, fan_in)))
    else:  # never touched: each program writes `out` itself
        m_ws = l_ws = acc_ws = out
        tickets = slots
    _rope_decode_kernel[(b, hkv, num_splits)](
        q, k, v, cos, sin, k_cache, v_cache, slots, lengths, out, m_ws, l_ws, acc_ws, tickets,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), out.stride(0), out.stride(1),
        max_batch, max_len, float(scale) * _LOG2E,
        REP=rep, GROUP=max(16, triton.next_power_of_2(rep)), RGROUP=rgroup, HEAD_DIM=d, HALF=d // 2,
        BLOCK_D=block_d, EVEN_D=block_d == d, BLOCK_N=cfg.block_n, NUM_SPLITS=num_splits, MIN_BLOCKS=min_blocks,
        FAN_IN=fan_in, PRECISION=_precision(q.dtype), WHILE_LOOP=_interpreting(), REVERSE=reverse,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        enable_fp_fusion=False,  # the rotary must round like torch's separate ops (see _rotate)
    )
    return out


@torch.library.custom_op("qwen2vl_fast::llm_rope_decode_attention_triton", mutates_args=("k_cache", "v_cache"))
def rope_decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                             lengths: torch.Tensor, scale: float, num_splits: int, block_n: int, num_warps: int,
                             num_stages: int, min_blocks: int) -> torch.Tensor:
    """The fused rope + cache write + decode launch (one kernel) as one graph node; writes k_cache / v_cache."""
    return _rope_decode_launch(q, k, v, cos, sin, k_cache, v_cache, slots, lengths, scale, num_splits,
                               Config(0, block_n, num_warps, num_stages), min_blocks)


@rope_decode_attention_op.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, slots, lengths, scale, num_splits, block_n, num_warps, num_stages,
      min_blocks):
    return q.new_empty(q.shape)


def rope_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
                          scale: float, *, num_splits: int | None = None, _reverse: bool = False) -> torch.Tensor:
    """A decode step's attention in ONE launch: rotate q (B, Hq, D) and the new token's k (B, Hkv, D) by cos/sin
    (B, D) (q's dtype), write the rotated k and v (B, Hkv, D) into k_cache / v_cache[slots[i], lengths[i] - 1],
    attend over the lengths[i] keys of each row (the new one included) and merge the splits in the same launch.

    Equals rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slots, lengths - 1) then decode_attention(q_rot,
    k_cache, v_cache, slots, lengths, scale); the cache is written bit-identically to rope_kv_write. q, k, v are
    NOT modified (q and k are rotated in registers). Caches (max_batch, max_len, Hkv, D), Hq % Hkv == 0, D even;
    any strides with a unit last-dim stride (q/k/v: views of the qkv projection output). slots: distinct rows;
    lengths >= 1 (a row with length <= 0 gets 0 and no write; one past max_len is not written). slots and
    lengths stay on the device: no host sync, CUDA-graph capturable. `num_splits` overrides the split count
    (tests); `_reverse` reverses the grid's split order (tests: another program arrives last)."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] \
            or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q must be (B, Hq, D) and k, v (B, Hkv, D) with Hq a multiple of Hkv; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"the caches must be (max_batch, max_len, {k.shape[1]}, {k.shape[2]}); got "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    b, _, d = q.shape
    if cos.shape != (b, d) or sin.shape != (b, d) or cos.dtype != q.dtype or sin.dtype != q.dtype:
        raise ValueError(f"cos and sin must be ({b}, {d}) {q.dtype}; got {tuple(cos.shape)} {cos.dtype}, "
                         f"{tuple(sin.shape)} {sin.dtype}")
    if slots.shape != (b,) or lengths.shape != (b,) or slots.is_floating_point() or lengths.is_floating_point():
        raise ValueError(f"slots and lengths must be integer ({b},) tensors; got {slots.dtype} "
                         f"{tuple(slots.shape)}, {lengths.dtype} {tuple(lengths.shape)}")
    if d % 2:
        raise ValueError(f"head_dim {d} must be even (rotate_half splits it in two)")
    _check_float(q, k, v, cos, sin, k_cache, v_cache)
    _block_d(d)
    _check_int32_offsets(k_cache.shape[1], k_cache.select(0, 0), v_cache.select(0, 0))
    cfg = pick_decode_config(q.dtype)
    splits = num_splits or decode_num_splits(b, k_cache.shape[2], k_cache.shape[1], cfg.block_n)
    if _reverse:
        return _rope_decode_launch(q, k, v, cos, sin, k_cache, v_cache, slots, lengths, float(scale), splits, cfg,
                                   _MIN_SPLIT_BLOCKS, reverse=True)
    return rope_decode_attention_op(q, k, v, cos, sin, k_cache, v_cache, slots, lengths, float(scale), splits,
                                    cfg.block_n, cfg.num_warps, cfg.num_stages, _MIN_SPLIT_BLOCKS)
