"""Block-diagonal (varlen) attention for the vision tower: non-causal softmax attention inside each segment
of a packed sequence, out[i] = softmax(scale * q[i] . k[j]^T over j in seg(i)) @ v[seg(i)].

Two regimes, one kernel:
- full attention per frame (Qwen2-VL every block, Qwen2.5-VL blocks 7/15/23/31): a few segments of 10^2..1.6x10^4
  tokens, compute-bound, FA2-style;
- Qwen2.5-VL window attention: thousands of segments of <= 64 tokens (64, edge windows of 48/32/16/12...), which
  one-program-per-segment kernels serve with mostly empty tiles.

Tiling. Programs tile the packed query rows, not the segments: a *tile* is a range of at most BLOCK_M packed rows
plus the key range it attends to. `plan_tiles` builds the table once per batch on the host from the host lengths:
a segment longer than BLOCK_M is cut into BLOCK_M-row chunks that attend to that segment only; consecutive
segments of <= BLOCK_M rows are packed greedily into one tile (two 64-token windows in a 128-row tile, a 48- and
a 16-token edge window in a 64-row tile) whose key range is the same rows. A tile therefore never straddles a long
segment, so no tile does more than its own rows x its own segments' keys of work (a fixed-stride tiling would
make every tile straddling two frames walk both frames' keys: up to 2x for that tile). The price of packing is
the masked cross-window part of a packed tile (<= BLOCK_M x BLOCK_M scores): packed segments are all <= BLOCK_M.
Rows are masked by per-token segment ids (int32, (S,)), scores where seg(q) != seg(k) are -inf. A tile whose rows
lie in one segment runs its full key blocks without any mask; only its last, partial block is masked. Tiles are
launched longest key range first (grid (num_tiles, H)).

Metadata (`prepare`): segment ids and tile tables are built once per VarlenMeta (i.e. once per batch, shared by
the 32 blocks) without a host sync, and memoised on the meta object. The tile count comes from the host lengths,
so the grid is known on the host; a CUDA graph captured per token budget would pad the table with empty tiles
(row_lo == row_hi, which the kernel skips) up to cdiv(budget, BLOCK_M) + the number of segments.

Head dim. The MMAs run at the true head dim, never padded to a power of two: D = D_MAIN + D_TAIL with D_MAIN the
largest power of two <= D and D_TAIL a power of two or 0 (80 = 64 + 16: QK^T is two tl.dot accumulating into one
score tile, PV two tl.dot into two accumulators). Padding 80 to 128 would waste 37.5% of the tensor-core work and
of the K/V bytes. Supported: D in {16, 32, 48, 64, 80, 96, 128, 160, 192, 256}; the tail must be >= 16 (the
smallest MMA K for 16-bit inputs).

Numerics. Scores and the online softmax are fp32; scale * log2(e) is folded into one multiply so the exponentials
are exp2. fp16/bf16 inputs: P is rounded to the input dtype for the PV MMA (as every flash kernel does), the
accumulators are fp32. fp32 inputs (parity tests only; the ViT runs in bf16) use input_precision="ieee": exact,
but FMA-speed on the GPU, not tensor cores.

Sources read to learn the technique (no code taken): Dao, "FlashAttention-2" (2023), section 3.1 (online
softmax, rescaling once at the end).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from qwen2vl_fast.errors import BackendError

from .tile_plans import TileTables, memoized_plan

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(acc_m, acc_t, m_i, l_i, q_m, q_t, k_base, v_base, seg_q, seg_ptr, start, kv_lo, kv_hi,
                  stride_ks, stride_vs, qk_scale,
                  D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  PRECISION: tl.constexpr):
    """One BLOCK_N key block: scores, online-softmax update, PV. MASKED: keys past kv_hi or of another segment."""
    offs_n = start + tl.arange(0, BLOCK_N)
    rel_n = offs_n - kv_lo  # offsets from the tile's first key: int32 is enough (one segment or one pack)
    offs_dm = tl.arange(0, D_MAIN)
    if MASKED:
        in_kv = offs_n < kv_hi
        k_m = tl.load(k_base + rel_n[:, None] * stride_ks + offs_dm[None, :], mask=in_kv[:, None], other=0.0)
        v_m = tl.load(v_base + rel_n[:, None] * stride_vs + offs_dm[None, :], mask=in_kv[:, None], other=0.0)
    else:
        k_m = tl.load(k_base + rel_n[:, None] * stride_ks + offs_dm[None, :])
        v_m = tl.load(v_base + rel_n[:, None] * stride_vs + offs_dm[None, :])
    s = tl.dot(q_m, tl.trans(k_m), input_precision=PRECISION)
    if D_TAIL > 0:
        offs_dt = D_MAIN + tl.arange(0, D_TAIL)
        if MASKED:
            k_t = tl.load(k_base + rel_n[:, None] * stride_ks + offs_dt[None, :], mask=in_kv[:, None], other=0.0)
            v_t = tl.load(v_base + rel_n[:, None] * stride_vs + offs_dt[None, :], mask=in_kv[:, None], other=0.0)
        else:
            k_t = tl.load(k_base + rel_n[:, None] * stride_ks + offs_dt[None, :])
            v_t = tl.load(v_base + rel_n[:, None] * stride_vs + offs_dt[None, :])
        s = tl.dot(q_t, tl.trans(k_t), acc=s, input_precision=PRECISION)
    s = s * qk_scale  # log2 domain
    if MASKED:
        seg_k = tl.load(seg_ptr + offs_n, mask=in_kv, other=-2)  # -2: matches no row (padding rows hold -1)
        s = tl.where(seg_q[:, None] == seg_k[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v_m.dtype)
    acc_m = tl.dot(p, v_m, acc=acc_m * alpha[:, None], input_precision=PRECISION)
    if D_TAIL > 0:
        acc_t = tl.dot(p, v_t, acc=acc_t * alpha[:, None], input_precision=PRECISION)
    return acc_m, acc_t, m_new, l_i



@triton.jit
def _attend_range(acc_m, acc_t, m_i, l_i, q_m, q_t, k_base, v_base, seg_q, seg_ptr, lo, hi, kv_lo, kv_hi,
                  stride_ks, stride_vs, qk_scale,
                  D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr):
    """Key blocks lo, lo + BLOCK_N, ... < hi. The GPU path is a `for` loop, which Triton software-pipelines
    (num_stages); a `while` loop would not be. WHILE_LOOP is for the interpreter only: Triton 3.6's interpreter
    with NumPy >= 2.4 cannot run range() over runtime bounds (it holds scalars as 1-element arrays and int()
    of those now raises), but it can evaluate `while start < hi`. Same body, same block order."""
    if WHILE_LOOP:
        start = lo
        while start < hi:
            acc_m, acc_t, m_i, l_i = _attend_block(acc_m, acc_t, m_i, l_i, q_m, q_t, k_base, v_base, seg_q,
                                                   seg_ptr, start, kv_lo, kv_hi, stride_ks, stride_vs, qk_scale,
                                                   D_MAIN, D_TAIL, BLOCK_N, MASKED, PRECISION)
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            acc_m, acc_t, m_i, l_i = _attend_block(acc_m, acc_t, m_i, l_i, q_m, q_t, k_base, v_base, seg_q,
                                                   seg_ptr, start, kv_lo, kv_hi, stride_ks, stride_vs, qk_scale,
                                                   D_MAIN, D_TAIL, BLOCK_N, MASKED, PRECISION)
    return acc_m, acc_t, m_i, l_i

@triton.jit
def _varlen_attention_kernel(
    Q_ptr, K_ptr, V_ptr, O_ptr, Seg_ptr, Tiles_ptr,
    stride_qs, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_os, stride_oh,
    qk_scale,
    D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    """Grid (num_tiles, H). Tiles_ptr: int32 (num_tiles, 4) = row_lo, row_hi, kv_lo, kv_hi (plan_tiles)."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    row_lo = tl.load(Tiles_ptr + tile * 4 + 0)
    row_hi = tl.load(Tiles_ptr + tile * 4 + 1)
    kv_lo = tl.load(Tiles_ptr + tile * 4 + 2)
    kv_hi = tl.load(Tiles_ptr + tile * 4 + 3)
    if row_hi <= row_lo:  # an empty tile (padding of a fixed-size table, e.g. for CUDA-graph capture)
        return

    # Base pointers in int64 (S * row stride can pass 2^31 on long videos); offsets inside a tile stay int32.
    q_base = Q_ptr + row_lo.to(tl.int64) * stride_qs + head.to(tl.int64) * stride_qh
    k_base = K_ptr + kv_lo.to(tl.int64) * stride_ks + head.to(tl.int64) * stride_kh
    v_base = V_ptr + kv_lo.to(tl.int64) * stride_vs + head.to(tl.int64) * stride_vh
    o_base = O_ptr + row_lo.to(tl.int64) * stride_os + head.to(tl.int64) * stride_oh

    offs_m = tl.arange(0, BLOCK_M)
    in_rows = (row_lo + offs_m) < row_hi
    offs_dm = tl.arange(0, D_MAIN)
    q_m = tl.load(q_base + offs_m[:, None] * stride_qs + offs_dm[None, :], mask=in_rows[:, None], other=0.0)
    acc_m = tl.zeros((BLOCK_M, D_MAIN), dtype=tl.float32)
    if D_TAIL > 0:
        offs_dt = D_MAIN + tl.arange(0, D_TAIL)
        q_t = tl.load(q_base + offs_m[:, None] * stride_qs + offs_dt[None, :], mask=in_rows[:, None], other=0.0)
        acc_t = tl.zeros((BLOCK_M, D_TAIL), dtype=tl.float32)
    else:  # placeholders, never read: the helper's signature is the same for both cases
        q_t = q_m
        acc_t = acc_m
    seg_q = tl.load(Seg_ptr + row_lo + offs_m, mask=in_rows, other=-1)
    # Running max starts finite on purpose: with -inf, a key block fully masked for a row (a packed tile's second
    # window seen from the first key block) would give exp2(-inf - -inf) = NaN; with -1e30, p = 0 and alpha = 1.
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)

    # A tile whose rows are all in one segment attends to exactly kv_lo..kv_hi: its full key blocks need no mask.
    # Packed tiles (several short segments) mask every block by segment id.
    one_segment = tl.load(Seg_ptr + row_lo) == tl.load(Seg_ptr + row_hi - 1)
    n_keys = kv_hi - kv_lo
    kv_full = kv_lo + (n_keys // BLOCK_N) * BLOCK_N * one_segment.to(tl.int32)
    acc_m, acc_t, m_i, l_i = _attend_range(acc_m, acc_t, m_i, l_i, q_m, q_t, k_base, v_base, seg_q, Seg_ptr,
                                           kv_lo, kv_full, kv_lo, kv_hi, stride_ks, stride_vs, qk_scale,
                                           D_MAIN, D_TAIL, BLOCK_N, False, PRECISION, WHILE_LOOP)
    acc_m, acc_t, m_i, l_i = _attend_range(acc_m, acc_t, m_i, l_i, q_m, q_t, k_base, v_base, seg_q, Seg_ptr,
                                           kv_full, kv_hi, kv_lo, kv_hi, stride_ks, stride_vs, qk_scale,
                                           D_MAIN, D_TAIL, BLOCK_N, True, PRECISION, WHILE_LOOP)

    # Every valid row saw at least its own key, so l_i >= 1 there; padding rows (l_i = 0) are never stored.
    inv_l = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)
    tl.store(o_base + offs_m[:, None] * stride_os + offs_dm[None, :],
             (acc_m * inv_l[:, None]).to(O_ptr.dtype.element_ty), mask=in_rows[:, None])
    if D_TAIL > 0:
        tl.store(o_base + offs_m[:, None] * stride_os + offs_dt[None, :],
                 (acc_t * inv_l[:, None]).to(O_ptr.dtype.element_ty), mask=in_rows[:, None])


# ------------------------------------------------------------------------------------------------ host side

@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    maxnreg: Optional[int] = None  # ptxas's register cap per thread (None: ptxas chooses)


# Launch configurations for Hopper (H100/H200) at head_dim 80, chosen by reasoning and checked by compiling for
# sm_90a here (Triton 3.6 + its ptxas, strides divisible by 16 as the JIT specialises them; registers, spills
# and shared memory below come from `ptxas -v`), not yet timed or autotuned on a GPU:
# - LONG, 16-bit, frames (max_seqlen > 128) with enough tiles: BLOCK_M 128 / BLOCK_N 64 / 8 warps / 3 stages.
#   8 warps = two warpgroups, each issuing m64n64k16 wgmma on its 64 rows. The per-thread fp32 state is the
#   128x80 accumulator (40 regs) + the 128x64 score tile (32) + P; ptxas: 179 registers, no spills, 82 KB shared
#   (Q 20 KB + 3 stages x K+V 20 KB), so 1 CTA/SM. Rejected for now: BLOCK_N 128 (217 registers, 144 KB shared,
#   still 1 CTA/SM: fewer softmax passes, same occupancy; the first alternative to time); maxnreg=128 with this
#   tile compiles without spills and would allow 2 CTAs/SM (one CTA's softmax overlapping the other's MMAs).
# - SHORT, 16-bit, windows (max_seqlen <= 128) or too few tiles: BLOCK_M 64 / BLOCK_N 64 / 4 warps / 2 stages.
#   A 64-token window is one tile and one key block, with no wasted scores; BLOCK_M 128 would pack two windows
#   and compute half of its 128x128 scores for nothing. One warpgroup covers m64. ptxas: 155 registers, 51 KB
#   shared: 3 CTAs/SM, which is what hides the load latency of these one-iteration programs. Also used when
#   128-row tiles would give fewer than ~2 waves over the SMs (small images at full attention).
# - FP32 (parity runs only; the ViT runs in bf16): BLOCK_M 32 / BLOCK_N 32 / 8 warps / 2 stages. The ieee dot
#   runs on FMA units with its operands in registers: 64x32 tiles spill (1.8 KB at 4 warps), 32x32 at 8 warps
#   does not (246 registers).
_LONG = Config(block_m=128, block_n=64, num_warps=8, num_stages=3)
_SHORT = Config(block_m=64, block_n=64, num_warps=4, num_stages=2)
_FP32 = Config(block_m=32, block_n=32, num_warps=8, num_stages=2)
_MIN_PROGRAMS_FOR_LONG = 2 * 132  # two waves on an H100 SXM (132 SMs)

# The LONG alternatives named above, raced against it by the measured dispatch (ops/attention.py registers each
# as a variant of varlen_attention): which one wins at head_dim 80 is a question for the GPU, not for reasoning.
# Same BLOCK_M, so the same tile tables. ptxas (sm_90a, bf16, D 80; the AOT sweep checks them in CI):
# - "n128": BLOCK_N 128, 2 stages: half the softmax passes and loop iterations per tile; 252 registers, no
#   spills, 101 KB shared: 1 CTA/SM;
# - "2cta": LONG capped at 128 registers per thread (no spills), 82 KB shared: 2 CTAs/SM, one's softmax under the
#   other's MMAs.
LONG_VARIANTS = {
    "n128": Config(block_m=128, block_n=128, num_warps=8, num_stages=2),
    "2cta": Config(block_m=128, block_n=64, num_warps=8, num_stages=3, maxnreg=128),
}


def pick_config(dtype: torch.dtype, max_seqlen: int, total: int, heads: int, variant: Optional[str] = None) -> Config:
    """The launch configuration for a (dtype, longest segment, packed length, heads) case; see the table above.
    `variant` (a LONG_VARIANTS name) replaces the LONG configuration where that one would run, and only there."""
    if variant is not None and variant not in LONG_VARIANTS:
        raise ValueError(f"unknown varlen attention variant {variant!r}; known: {sorted(LONG_VARIANTS)}")
    if dtype == torch.float32:
        return _FP32
    if max_seqlen <= 128 or triton.cdiv(total, _LONG.block_m) * heads < _MIN_PROGRAMS_FOR_LONG:
        return _SHORT
    return _LONG if variant is None else LONG_VARIANTS[variant]


def split_head_dim(d: int) -> tuple[int, int]:
    """D -> (D_MAIN, D_TAIL): D_MAIN the largest power of two <= D, D_TAIL the rest, a power of two >= 16 or 0."""
    main = 1 << (max(d, 1).bit_length() - 1)
    tail = d - main
    if d < 16 or d > 256 or main < 16 or (tail and (tail < 16 or tail & (tail - 1))):
        raise BackendError(
            f"the Triton varlen attention supports head_dim = a power of two in 16..256 plus optionally a smaller "
            f"power of two >= 16 (16, 32, 48, 64, 80, 96, 128, 160, 192, 256); got {d}; use the torch backend")
    return main, tail


@dataclass
class VarlenPlan:
    """Per-batch kernel metadata derived from a VarlenMeta: built once, reused by every attention layer.

    seg_ids: int32 (S,) on the device, the segment of each packed row (computed on the device from cu_seqlens).
    tiles(block_m): int32 (num_tiles, 4) on the device (see `plan_tiles`), built on the host from the host
    lengths and copied without a sync (pinned, non-blocking), memoised per BLOCK_M.
    """

    lengths: tuple
    total: int
    device: torch.device
    seg_ids: torch.Tensor
    tiles: TileTables  # tiles(block_m)


def plan_tiles(lengths, block_m: int) -> list[int]:
    """Flat [row_lo, row_hi, kv_lo, kv_hi] * num_tiles for segments of `lengths` packed back to back.

    Segments longer than block_m: chunks of block_m rows attending to the whole segment. Runs of consecutive
    segments of <= block_m rows: packed greedily into tiles of <= block_m rows attending to those rows. Tiles are
    ordered by decreasing key range (longest programs first: a batch mixing image sizes then ends evenly); the
    sort is stable, so a segment's tiles stay adjacent and share its K/V in L2.
    """
    tiles, pos = [], 0
    pack_lo = pack_hi = 0  # the open pack of short segments, empty when equal
    for n in lengths:
        if n <= 0:
            continue
        if n <= block_m:
            if pack_hi - pack_lo + n > block_m:
                tiles.append((pack_lo, pack_hi, pack_lo, pack_hi))
                pack_lo = pos
            elif pack_hi == pack_lo:
                pack_lo = pos
            pack_hi = pos + n
        else:
            if pack_hi > pack_lo:
                tiles.append((pack_lo, pack_hi, pack_lo, pack_hi))
                pack_lo = pack_hi = 0
            end = pos + n
            tiles.extend((r, min(r + block_m, end), pos, end) for r in range(pos, end, block_m))
        pos += n
    if pack_hi > pack_lo:
        tiles.append((pack_lo, pack_hi, pack_lo, pack_hi))
    tiles.sort(key=lambda t: t[2] - t[3])
    return [x for t in tiles for x in t]


_PLANS: dict = {}


def prepare(meta, device=None) -> VarlenPlan:
    """The VarlenPlan of `meta` (a qwen2vl_fast.ops.VarlenMeta), memoised on the meta object's identity for as long
    as it lives: the 32 ViT blocks of a batch share one. No host sync: segment ids come from the device
    cu_seqlens with a host-known output size, the tile tables from the host lengths."""
    def make(lengths, device):
        total = sum(lengths)
        cu = meta.cu_seqlens.to(device=device, non_blocking=True)
        counts = (cu[1:] - cu[:-1]).long()
        seg = torch.repeat_interleave(torch.arange(counts.numel(), device=device, dtype=torch.int32), counts,
                                      output_size=total)
        return VarlenPlan(lengths, total, device, seg, TileTables(lengths, device, plan_tiles, 4))
    return memoized_plan(_PLANS, meta, device, make)


def _launch(q, k, v, seg_ids, tiles, scale, cfg: Config, out=None) -> torch.Tensor:
    s, h, d = q.shape
    d_main, d_tail = split_head_dim(d)
    if out is None:
        out = torch.empty((s, h, d), dtype=q.dtype, device=q.device)
    if s == 0 or tiles.shape[0] == 0:
        return out
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs
    grid = (tiles.shape[0], h)
    _varlen_attention_kernel[grid](
        q, k, v, out, seg_ids, tiles,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        float(scale) * _LOG2E,
        D_MAIN=d_main, D_TAIL=d_tail, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PRECISION=precision,
        WHILE_LOOP=os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({} if cfg.maxnreg is None else {"maxnreg": cfg.maxnreg}),
    )
    return out


@torch.library.custom_op("qwen2vl_fast::varlen_attention_triton", mutates_args=())
def varlen_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_ids: torch.Tensor,
                        tiles: torch.Tensor, scale: float, block_m: int, block_n: int, num_warps: int,
                        num_stages: int, maxnreg: int) -> torch.Tensor:
    """The launch as one graph node for torch.compile / CUDA graphs. tiles must come from plan_tiles(block_m);
    maxnreg 0: no register cap."""
    return _launch(q, k, v, seg_ids, tiles, scale, Config(block_m, block_n, num_warps, num_stages, maxnreg or None))


@varlen_attention_op.register_fake
def _(q, k, v, seg_ids, tiles, scale, block_m, block_n, num_warps, num_stages, maxnreg):
    return q.new_empty(q.shape)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta, scale: float,
                     out: Optional[torch.Tensor] = None, variant: Optional[str] = None) -> torch.Tensor:
    """Non-causal attention within each segment of `meta` (a VarlenMeta), the Triton implementation.

    q, k, v: (S, H, D) fp16 / bf16 / fp32, any strides with a unit last-dim stride (the model passes views of the
    fused (S, 3*H*D) qkv buffer; nothing is copied). S = sum(meta.lengths); D see `split_head_dim`.
    Returns a new contiguous (S, H, D) tensor in q's dtype (the custom op), or writes `out` (any (S, H, D)
    tensor of q's dtype with a unit last-dim stride; eager call, outside the custom op) and returns it.
    `variant`: a LONG_VARIANTS configuration instead of LONG (the dispatch's candidates).
    """
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be (S, H, D) of one shape; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype of float16/bfloat16/float32; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("q, k, v need a unit stride in the last (head_dim) dimension")
    split_head_dim(q.shape[2])
    plan = prepare(meta, q.device)
    if plan.total != q.shape[0]:
        raise ValueError(f"q has {q.shape[0]} rows but the segments cover {plan.total}")
    cfg = pick_config(q.dtype, int(meta.max_seqlen), plan.total, q.shape[1], variant)
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(2) != 1:
            raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device} with a unit last-dim stride; "
                             f"got {tuple(out.shape)} {out.dtype} on {out.device}, strides {out.stride()}")
        return _launch(q, k, v, plan.seg_ids, plan.tiles(cfg.block_m), scale, cfg, out=out)
    return varlen_attention_op(q, k, v, plan.seg_ids, plan.tiles(cfg.block_m), float(scale), cfg.block_m,
                               cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.maxnreg or 0)
