"""Decode GEMV / skinny GEMM with split-K that fills one wave of resident CTAs: y = epilogue(x @ w.T + b) for
M <= 16 activation rows (Triton). A candidate of the `linear` / `linear_swiglu` ops next to cuBLAS and
kernels/gemm.py, raced per shape by the measured dispatch (ops/basic.py registers it as a variant), never a
forced replacement.

    x (..., K)  flattened to (M, K), M <= 16; rows may be strided, the last dim must be contiguous
    w (N, K)    nn.Linear layout, same dtype as x (fp32, fp16, bf16); SWIGLU: w = [gate; up] (2I, K), y (..., I)
    b (N,)      optional (2I for SWIGLU)
    y (..., N)  in x's dtype

Why: at batch 1 a decode GEMM streams its weight once and does nothing else; kernels/gemm.py's decode tile
(16 x 32..64 x 128, no split) gives one CTA per 32-64 output columns: 48-64 CTAs on 132 SMs for the 2B
qkv / o_proj / down and 56-112 for the 7B, so half the SMs sit idle and the bytes in flight are too few to
reach the copy bandwidth. Here the K range is split so that (column tiles x splits) fills one wave of the CTAs
the GPU holds at once.

Two inner loops (compile-time, by BLOCK_M):
  - BLOCK_M = 1 (M = 1, the batch-1 step): a CUDA-core GEMV. Each step loads a (BLOCK_N, BLOCK_K) weight tile
    with K contiguous (16-byte vector loads, whole sectors, evict-first: no weight byte is read twice) and the
    BLOCK_K slice of x, and accumulates w * x elementwise into a (BLOCK_N, BLOCK_K) fp32 tile; one cross-lane
    sum at the end (a reduction per step would cost shuffles on every weight element). No tensor-core padding
    of the single row to 16.
  - BLOCK_M = 16 (2 <= M <= 16): tl.dot (mma) on a 16-row x tile, rows past M clamped (read, never stored), the
    (BLOCK_K, BLOCK_N) w.T tile as in kernels/gemm.py.
SWIGLU (dual): each CTA owns columns j of the gate rows w[:I] and of the up rows w[I:], accumulated side by side
from the same x; silu(gate) * up is applied after the whole K is summed (and after the bias).

Split-K plan (make_plan; the CUDA int4 decode kernel's idea, csrc/quant_decode_gemm.cu make_plan): slots = SMs x
resident CTAs per SM of the config (its `blocks_per_sm`, from ptxas's registers and shared memory at the real
shapes, see the table). Splits: as many as fit in one wave (slots // tiles: a second, partly filled wave would cost
a whole CTA's time for a few CTAs), at most K blocks / MIN_BLOCKS_PER_SPLIT (each CTA streams at least two
BLOCK_K steps), at most what keeps the fp32 partial traffic (written and read back, 8 x splits x M x N bytes, in
L2) under half the weight bytes, at most MAX_SPLIT; then the fewest splits with the same per-CTA step count
(cdiv(k_blocks, splits) is the critical path), so the splits are as even as the K blocks allow (the last split
may have fewer steps; its tail is masked).

Deterministic reduction, never float atomics: with more than one split each CTA stores its fp32 partial sums into
plane `split` of a (SPLIT, M, N[x2]) buffer, then (REDUCE_KERNEL, the default) takes a ticket from an int32
counter of its tile (atomic add, acq_rel at GPU scope, after a CTA barrier so all its partial stores precede it);
the CTA that draws the last ticket sums all SPLIT planes in plane order (loads at L2, .cg), adds the bias, applies
the epilogue, rounds once, stores y and resets the counter to 0 for the next launch. The sum is the same function
of the planes whichever CTA arrives last: bitwise run-to-run deterministic, one launch. The counters are a
per-device int32 buffer that every launch leaves zeroed (kernels on one stream run in order; two streams must not
run this kernel concurrently on one device). REDUCE_PASS instead leaves the planes to a second small kernel
(the same fixed order; one more launch, no counters): the fallback, and a cross-check in the tests.

Numerics: fp32 accumulation, bias added to the fp32 sum, the activation in fp32, one rounding at the store, as
kernels/gemm.py. A split changes the summation order against split 1 (bounded by the dtype tolerance), never from
run to run. fp32 uses ieee products (no TF32).

K and the split's K range are compile-time constants (one compile per (K, split) pair: a model has a handful), as
in kernels/gemm.py: a static trip count, and a loop the Triton 3.6 interpreter can run.
"""

from __future__ import annotations

import os

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .gemm import SWIGLU, _finish, _num_sms, _stride_align, as_rows, check_linear_args
from .tile_plans import ticket_counters

_empty = torch.empty  # output / partial-sum allocation; the tests swap in a NaN-filled allocator

REDUCE_NONE, REDUCE_KERNEL, REDUCE_PASS = 0, 1, 2
MAX_ROWS = 16  # the decode regime this kernel is for; more rows are kernels/gemm.py's (and cuBLAS's)
MAX_SPLIT = 32
MIN_BLOCKS_PER_SPLIT = 2


@triton.jit
def _planes(P, offs_m, offs_n, M, N, DUAL: tl.constexpr):
    """The tile's pointers into split plane 0 of the partial sums (a plane is M rows of N, or 2N for SWIGLU's
    gate | up), their mask, and the plane stride: split s is at p_ptrs + s * plane (+ N for the up half)."""
    if DUAL:
        n_planar = 2 * N
    else:
        n_planar = N
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    p_ptrs = P + offs_m.to(tl.int64)[:, None] * n_planar + offs_n[None, :]
    return p_ptrs, mask, tl.cast(M, tl.int64) * n_planar


@triton.jit
def _sum_planes(p_ptrs, mask, plane, N, SPLIT: tl.constexpr, DUAL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """The SPLIT partial planes summed in plane order (the fixed order that makes the result deterministic)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(p_ptrs + s * plane, mask=mask, other=0.0, cache_modifier=".cg")
        if DUAL:
            acc_up += tl.load(p_ptrs + s * plane + N, mask=mask, other=0.0, cache_modifier=".cg")
    return acc, acc_up


@triton.jit
def _gemv_splitk_kernel(
    X, W, B, Y,
    P,  # fp32 partial planes (SPLIT, M, NP), NP = 2N for SWIGLU (gate | up), else N; unused at SPLIT 1
    C,  # int32 tickets, one per tile, zero before and after a launch (REDUCE_KERNEL only)
    M, N,  # N: output columns (I for SWIGLU, where w holds 2N rows)
    stride_xm, stride_wn, stride_ym,
    K: tl.constexpr,  # reduction length (compile-time, see the module docstring)
    K_SPLIT: tl.constexpr,  # K range of one split, a multiple of BLOCK_K (>= K at SPLIT 1)
    SPLIT: tl.constexpr,
    REDUCE: tl.constexpr,  # 0: SPLIT 1, store y; 1: the last CTA of a tile reduces; 2: planes only (reduce kernel)
    REVERSE: tl.constexpr,  # tests: split = SPLIT - 1 - program_id(1), so another CTA of the tile arrives last
    STRIDE_ALIGN: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    DUAL: tl.constexpr = ACT == 3
    tile = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = tile // num_pid_n
    pid_n = tile % num_pid_n
    if REVERSE:
        pid_k = SPLIT - 1 - tl.program_id(1)
    else:
        pid_k = tl.program_id(1)
    if STRIDE_ALIGN > 1:  # (s // A) * A == s tells the alignment analysis A | s
        stride_xm = (stride_xm // STRIDE_ALIGN) * STRIDE_ALIGN
        stride_wn = (stride_wn // STRIDE_ALIGN) * STRIDE_ALIGN
        stride_ym = (stride_ym // STRIDE_ALIGN) * STRIDE_ALIGN
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    cols = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamped: always in bounds, never stored
    k_begin = pid_k * K_SPLIT
    EVEN_K: tl.constexpr = K % K_SPLIT == 0  # every split covers K_SPLIT valid columns: no masks

    if BLOCK_M == 1:  # M = 1: CUDA-core GEMV, (BLOCK_N, BLOCK_K) weight tiles with K contiguous
        x_ptrs = X + k_begin + offs_k
        w_ptrs = W + cols[:, None] * stride_wn + (k_begin + offs_k)[None, :]
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if DUAL:
            u_ptrs = W + (cols + N)[:, None] * stride_wn + (k_begin + offs_k)[None, :]
            acc2_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for kk in range(0, K_SPLIT, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs).to(tl.float32)
                w = tl.load(w_ptrs, eviction_policy="evict_first").to(tl.float32)
            else:
                k_ok = offs_k < K - k_begin - kk
                a = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)
                w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first").to(tl.float32)
            acc2 += w * a[None, :]
            if DUAL:
                if EVEN_K:
                    wu = tl.load(u_ptrs, eviction_policy="evict_first").to(tl.float32)
                else:
                    wu = tl.load(u_ptrs, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first").to(tl.float32)
                acc2_up += wu * a[None, :]
                u_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc = tl.sum(acc2, axis=1)[None, :]  # (1, BLOCK_N)
        if DUAL:
            acc_up = tl.sum(acc2_up, axis=1)[None, :]
        else:
            acc_up = acc
    else:  # 2 <= M <= 16: tensor cores on a 16-row tile
        rows = tl.minimum(offs_m, M - 1).to(tl.int64)
        x_ptrs = X + rows[:, None] * stride_xm + (k_begin + offs_k)[None, :]  # (BLOCK_M, BLOCK_K)
        w_ptrs = W + cols[None, :] * stride_wn + (k_begin + offs_k)[:, None]  # (BLOCK_K, BLOCK_N): w.T tile
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if DUAL:
            u_ptrs = W + (cols + N)[None, :] * stride_wn + (k_begin + offs_k)[:, None]
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, K_SPLIT, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs)
                w = tl.load(w_ptrs, eviction_policy="evict_first")
            else:
                k_ok = offs_k < K - k_begin - kk
                a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0, eviction_policy="evict_first")
            acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
            if DUAL:
                if EVEN_K:
                    wu = tl.load(u_ptrs, eviction_policy="evict_first")
                else:
                    wu = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0, eviction_policy="evict_first")
                acc_up = tl.dot(a, wu, acc_up, input_precision=INPUT_PRECISION)
                u_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if not DUAL:
            acc_up = acc

    if REDUCE == 0:
        _finish(acc, acc_up, B, Y, offs_m, offs_n, M, N, stride_ym, HAS_BIAS, ACT)
    else:
        p_ptrs, mask, plane = _planes(P, offs_m, offs_n, M, N, DUAL)
        tl.store(p_ptrs + pid_k * plane, acc, mask=mask)
        if DUAL:
            tl.store(p_ptrs + pid_k * plane + N, acc_up, mask=mask)
        if REDUCE == 1:
            tl.debug_barrier()  # every thread's partial stores precede the ticket (released at GPU scope)
            ticket = tl.atomic_add(C + tile, 1, sem="acq_rel", scope="gpu")
            if ticket == SPLIT - 1:  # the last CTA of this tile: all SPLIT planes are written
                tot, tot_up = _sum_planes(p_ptrs, mask, plane, N, SPLIT, DUAL, BLOCK_M, BLOCK_N)
                tl.atomic_xchg(C + tile, 0, sem="relaxed", scope="gpu")  # zero for the next launch
                _finish(tot, tot_up, B, Y, offs_m, offs_n, M, N, stride_ym, HAS_BIAS, ACT)


@triton.jit
def _gemv_reduce_kernel(P, B, Y, M, N, stride_ym, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """REDUCE_PASS, pass 2: row program_id(1), columns program_id(0) * BLOCK_N...: the planes summed in plane
    order, bias, epilogue, one rounding."""
    DUAL: tl.constexpr = ACT == 3
    offs_m = tl.program_id(1) + tl.arange(0, 1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    p_ptrs, mask, plane = _planes(P, offs_m, offs_n, M, N, DUAL)
    acc, acc_up = _sum_planes(p_ptrs, mask, plane, N, SPLIT, DUAL, 1, BLOCK_N)
    _finish(acc, acc_up, B, Y, offs_m, offs_n, M, N, stride_ym, HAS_BIAS, ACT)


class GemvConfig(NamedTuple):
    block_m: int  # 1: the CUDA-core GEMV (M = 1 only); 16: tensor cores (M <= 16)
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    blocks_per_sm: int  # resident CTAs per SM the plan counts on (<= what ptxas's registers / shared memory allow)
    split_k: int = 0  # 0: planned (make_plan); >= 1: forced (tests)


class Plan(NamedTuple):
    config: GemvConfig
    tiles: int  # output tiles (row tiles x column tiles)
    k_blocks: int  # BLOCK_K steps over the whole K
    split: int  # K splits (grid axis 1)
    k_split: int  # K range of one split (a multiple of block_k)
    slots: int  # resident CTAs of one wave: SMs x blocks_per_sm


# Hopper (H100/H200) table. NOT yet timed on a GPU (none was at hand): starting points for the dispatch's race.
# Registers / shared memory: ptxas for sm_90a (Triton 3.6) at the 2B and 7B shapes, bf16 and fp16, every split the
# plan picks for M in {1, 2, 4, 8, 16} (kernels/aot_sweep.py, family gemv_splitk): no spills anywhere.
# blocks_per_sm must stay <= what those registers and shared memory allow (resident_blocks; the tests check it
# against the sweep), else a "one wave" plan would spill into a second.
# - M = 1, plain: 1 x 64 x 128, 4 warps: a 16 KB bf16 weight tile per step (each warp 2 rows x 256 B per load).
#   The (64, 128) fp32 accumulator is 64 registers per thread: 124-128 registers, 256 B shared (the loads are
#   not cp.async'd: Triton pipelines only loads feeding tl.dot), so 4 CTAs per SM by registers; the bytes in
#   flight come from those 4 CTAs x 16 KB per SM, which is what the split fills.
# - M = 1, SWIGLU: 1 x 32 x 128 (gate + up tiles = the plain tile's bytes): 125 registers, 4 CTAs per SM.
# - 2 <= M <= 16: 16 x 64 x 128 (mma.sync), 4 warps, 4 stages as kernels/gemm.py's decode tile: 56-72 registers,
#   60 KB shared (3 cp.async buffers), so 3 CTAs per SM by shared memory. SWIGLU: 8 warps, 60 registers, 108 KB:
#   2 CTAs per SM.
# - fp32 (the parity / testing path, not swept): BLOCK_K halved (the same bytes per step), the same residency
#   assumed.
_GEMV = GemvConfig(1, 64, 128, 4, 3, 4)
_GEMV_DUAL = GemvConfig(1, 32, 128, 4, 3, 4)
_MMA = GemvConfig(16, 64, 128, 4, 4, 3)
_MMA_DUAL = GemvConfig(16, 64, 128, 8, 4, 2)
_FP32_GEMV = GemvConfig(1, 64, 64, 4, 3, 4)
_FP32_GEMV_DUAL = GemvConfig(1, 32, 64, 4, 3, 4)
_FP32_MMA = GemvConfig(16, 64, 32, 4, 3, 3)
_FP32_MMA_DUAL = GemvConfig(16, 64, 32, 8, 3, 2)

# sm_90 per-SM limits for resident_blocks
SM90_MAX_WARPS, SM90_MAX_BLOCKS, SM90_REGISTERS, SM90_SHARED, SM90_SHARED_RESERVED = 64, 32, 65536, 233472, 1024


def resident_blocks(regs: int, shared: int, num_warps: int) -> int:
    """CTAs of one kernel an sm_90 SM holds at once (what cudaOccupancyMaxActiveBlocksPerMultiprocessor says):
    bounded by warps, CTAs, registers (allocated per warp in units of 256) and shared memory (228 KB per SM,
    1 KB of it reserved per CTA)."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = SM90_REGISTERS // (per_warp * num_warps)
    by_shared = SM90_SHARED // (shared + SM90_SHARED_RESERVED)
    return min(SM90_MAX_WARPS // num_warps, SM90_MAX_BLOCKS, by_regs, by_shared)


def pick_config(M: int, N: int, K: int, dtype: torch.dtype, epilogue: str = "none") -> GemvConfig:
    """The tile config for M <= 16 rows, N output columns, reduction K; tiles shrunk to the problem."""
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"gemv_splitk is the decode kernel for 1 <= M <= {MAX_ROWS} rows, got M = {M}")
    dual = epilogue == "swiglu"
    if dtype == torch.float32:
        cfg = (_FP32_GEMV_DUAL if dual else _FP32_GEMV) if M == 1 else (_FP32_MMA_DUAL if dual else _FP32_MMA)
    else:
        cfg = (_GEMV_DUAL if dual else _GEMV) if M == 1 else (_MMA_DUAL if dual else _MMA)

    def fit(block, size):
        return min(block, max(16, triton.next_power_of_2(size)))

    return cfg._replace(block_n=fit(cfg.block_n, N), block_k=fit(cfg.block_k, K))


def make_plan(M: int, N: int, K: int, dtype: torch.dtype, epilogue: str = "none", sms: int = 132,
              config: Optional[GemvConfig] = None) -> Plan:
    """Tiles and K splits for one wave of `sms` x config.blocks_per_sm resident CTAs (see the module docstring).
    The same logic on the GPU (sms = the device's SM count) and on the CPU / in tests (sms given)."""
    cfg = config or pick_config(M, N, K, dtype, epilogue)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    k_blocks = triton.cdiv(K, cfg.block_k)
    slots = max(1, sms * cfg.blocks_per_sm)
    if cfg.split_k:
        want = cfg.split_k
    else:
        elem = torch.empty((), dtype=dtype).element_size()
        by_wave = slots // tiles
        by_work = k_blocks // MIN_BLOCKS_PER_SPLIT
        by_traffic = elem * K // (16 * M)  # 8 * s * M * N partial bytes <= half of elem * N * K weight bytes
        want = max(1, min(by_wave, by_work, by_traffic, MAX_SPLIT))
    want = max(1, min(want, k_blocks))
    per_split = triton.cdiv(k_blocks, want)  # the critical path: steps of the longest split
    split = triton.cdiv(k_blocks, per_split)  # the fewest splits with that many steps (no empty split)
    return Plan(cfg, tiles, k_blocks, split, per_split * cfg.block_k, slots)


_COUNTERS: dict = {}  # device -> int32 tickets, zero between launches
_MIN_COUNTERS = 4096  # a split plan has tiles <= slots / 2 (a few hundred); forced test configs may need more


def _counters(device: torch.device, n: int) -> torch.Tensor:
    return ticket_counters(_COUNTERS, device, n, _MIN_COUNTERS, "gemv_splitk")


def gemv_splitk(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, epilogue: str = "none",
                config: Optional[GemvConfig] = None, *, sms: Optional[int] = None, reduce: str = "kernel",
                _reverse: bool = False) -> torch.Tensor:
    """The launcher: epilogue(x @ weight.T + bias) in x's dtype for M <= 16 rows (see the module docstring).
    `config` overrides the table (tests force tiles and split counts), `sms` the SM count of the plan (default:
    the device's; 132 on the CPU), `reduce` "kernel" (last CTA of a tile) or "pass" (a second kernel)."""
    if reduce not in ("kernel", "pass"):
        raise ValueError(f"reduce must be 'kernel' or 'pass', got {reduce!r}")
    act, N, K = check_linear_args(x, weight, bias, epilogue)

    lead, x2 = as_rows(x, K)
    M = x2.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"gemv_splitk is the decode kernel for M <= {MAX_ROWS} rows, got M = {M}")
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    y = _empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.reshape(*lead, N)
    if K == 0:
        raise ValueError("K = 0: nothing to reduce")
    if config is not None and config.block_m == 1 and M != 1:
        raise ValueError(f"block_m 1 (the CUDA-core GEMV) is for M = 1, got M = {M}")

    plan = make_plan(M, N, K, x.dtype, epilogue, _num_sms(x.device) if sms is None else sms, config)
    cfg, split = plan.config, plan.split
    mode = REDUCE_NONE if split == 1 else (REDUCE_KERNEL if reduce == "kernel" else REDUCE_PASS)
    partials = _empty((split, M, 2 * N if act == SWIGLU else N), dtype=torch.float32, device=x.device) \
        if split > 1 else y
    tickets = _counters(x.device, plan.tiles) if mode == REDUCE_KERNEL else y
    b = bias if bias is not None else y
    _gemv_splitk_kernel[(plan.tiles, split)](
        x2, weight, b, y, partials, tickets,
        M, N, x2.stride(0), weight.stride(0), y.stride(0),
        K=K, K_SPLIT=plan.k_split, SPLIT=split, REDUCE=mode, REVERSE=_reverse,
        STRIDE_ALIGN=_stride_align(x2.stride(0), weight.stride(0), y.stride(0)),
        HAS_BIAS=bias is not None, ACT=act, INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if mode == REDUCE_PASS:
        block = 256
        _gemv_reduce_kernel[(triton.cdiv(N, block), M)](
            partials, b, y, M, N, y.stride(0), SPLIT=split, HAS_BIAS=bias is not None, ACT=act, BLOCK_N=block,
            num_warps=4)
    return y.reshape(*lead, N)


# The reductions the registered candidates use: "triton-splitk" reduces in the same launch (the last CTA of a tile,
# ticket counters: one kernel, as a decode layer's kernel budget wants), "triton-splitk-2pass" with a second small
# kernel (correct by construction, whatever the GPU's memory ordering). Both are raced, and the dispatch checks
# each against the reference before timing it; the one-launch form rests on acq_rel atomics that only its GPU test
# (test_gpu_deterministic_at_real_shapes_and_in_graph_replays) has exercised on hardware.
# QWEN2VL_FAST_SPLITK_REDUCE=pass forces the two-pass form for both names.
FORCE_REDUCE = os.environ.get("QWEN2VL_FAST_SPLITK_REDUCE")


# One PyTorch library op, so torch.compile and CUDA-graph capture see a single opaque node. (The ticket counters
# it touches are left as they were found: zero.)
@torch.library.custom_op("qwen2vl_fast::gemv_splitk", mutates_args=())
def gemv_splitk_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], epilogue: str,
                   reduce: str) -> torch.Tensor:
    return gemv_splitk(x, weight, bias, epilogue, reduce=FORCE_REDUCE or reduce)


@gemv_splitk_op.register_fake
def _(x, weight, bias, epilogue, reduce):
    n = weight.shape[0] // 2 if epilogue == "swiglu" else weight.shape[0]
    return x.new_empty((*x.shape[:-1], n))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           reduce: str = "kernel") -> torch.Tensor:
    """x @ weight.T + bias for M <= 16 rows (raises beyond: the dispatch then races the other candidates)."""
    return gemv_splitk_op(x, weight, bias, "none", reduce)


def linear_swiglu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  reduce: str = "kernel") -> torch.Tensor:
    """silu(x @ gate.T + b_gate) * (x @ up.T + b_up), weight = [gate; up] (2I, K), M <= 16 rows -> (..., I)."""
    return gemv_splitk_op(x, weight, bias, "swiglu", reduce)
