"""Weight-only quantized GEMM (4 / 8 bit, GPTQ/AWQ repacked to the runtime layout) with fused dequantisation:
y = x @ dequantize(w).T + b, never building the dense weight (Triton, tensor cores).

    x        (..., K)  any leading dims, flattened to (M, K); fp32, fp16 or bf16
    qweight  int32 (K * bits / 32, N), scales / zeros (G, N), perm (K,) or None: see qwen2vl_fast/quant/weight.py
    bias     (N,) or None
    y        (..., N)  in x's dtype

Kernel (one program = a BLOCK_M x BLOCK_N output tile, a loop over K in BLOCK_K steps):
  - the packed words of the step are loaded once as a (BLOCK_K / PACK, BLOCK_N) int32 tile (PACK = 32 / bits,
    contiguous along N: coalesced), unpacked with shifts and a mask into (BLOCK_K / PACK, PACK, BLOCK_N) and
    reshaped to (BLOCK_K, BLOCK_N) (lowest bits first = the lower k);
  - scales / zeros: the group rows the step touches, chosen at compile time from GROUP and BLOCK_K:
      one group for the whole K (group_size -1)  -> one row, loaded before the loop;
      GROUP a multiple of BLOCK_K                 -> one row per step, broadcast over the BLOCK_K rows;
      BLOCK_K a multiple of GROUP                 -> BLOCK_K / GROUP rows, broadcast over each group's rows;
      otherwise (a non power-of-two group)        -> a per-row gather (L1 hits; correct, slower);
  - w = ((q - zero) * scale) computed in fp32 and rounded once to x's dtype (exactly what quant.dequantize
    does, so fp32 results equal the reference up to summation order), then tl.dot with the x tile, fp32
    accumulation, bias added to the accumulator, one rounding at the store.
  - act-order (perm): the launcher permutes x's columns (x.index_select(-1, perm)) and the kernel runs on the
    stored (group-sorted) weight: no g_idx inside the kernel.

Two regimes (see the config table):
  - decode, M <= 16: a weight-bandwidth-bound GEMV. 16-row tiles (the smallest tl.dot M), wide BLOCK_N, and
    split-K when the column tiles alone cannot fill the SMs (N = 3584 at BLOCK_N 128: 28 tiles for 132 SMs).
    Split-K is a deterministic two-pass reduction, not fp32 atomics: pass 1 writes fp32 partial sums
    (SPLIT, M, N) (tiny at decode: M * N * SPLIT * 4 bytes, vs. N * K / 2 bytes of int4 weight), pass 2 sums
    them in a fixed order, adds the bias and rounds once. Atomics would save the second launch (a few us) but
    make decode results run-to-run nondeterministic and need a zeroed fp32 buffer plus a cast kernel anyway.
    The split count is the smallest divisor of the K-block count giving >= one program per SM (capped at 16),
    so each split covers whole, unmasked blocks.
  - prefill, M > 16: 64 x 128 (M <= 64) or 128 x 128 tiles, grouped launch order (the x tiles stay in L2).

K is a compile-time constant, as in kernels/gemm.py (a model has a handful of reduction lengths; it keeps the
loop bound static and the kernel runnable under the Triton 3.6 interpreter). Rows past M / columns past N are
clamped to the last valid one for the loads (in bounds, never stored), so only the K tail needs a mask, and only
when the splits do not cover K exactly.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .gemm import _num_sms, _stride_align, _tile_coords, as_rows

_empty = torch.empty  # output / partial-sum allocation; the tests swap in a NaN-filled allocator


@triton.jit
def _quant_gemm_kernel(
    X, QW, S, Z, B, Y,
    M, N,
    stride_xm, stride_qk, stride_sg, stride_ym, stride_ys,  # stride_ys: between split-K partial planes
    K: tl.constexpr,  # reduction length (compile-time, see the module docstring)
    K_SPLIT: tl.constexpr,  # K range of one split (a multiple of BLOCK_K); K_SPLIT >= K without split-K
    BITS: tl.constexpr, GROUP: tl.constexpr,  # GROUP: the group size (K for group_size -1)
    STRIDE_ALIGN: tl.constexpr, HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,  # split-K pass 1: store fp32 partial sums (no bias) into plane program_id(1)
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    NUM_GROUPS: tl.constexpr = K // GROUP
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)
    if STRIDE_ALIGN > 1:  # (s // A) * A == s tells the alignment analysis A | s
        stride_xm = (stride_xm // STRIDE_ALIGN) * STRIDE_ALIGN
        stride_qk = (stride_qk // STRIDE_ALIGN) * STRIDE_ALIGN
        stride_sg = (stride_sg // STRIDE_ALIGN) * STRIDE_ALIGN
        stride_ym = (stride_ym // STRIDE_ALIGN) * STRIDE_ALIGN
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // PACK)  # word rows of one step
    shifts = tl.arange(0, PACK) * BITS
    rows = tl.minimum(offs_m, M - 1).to(tl.int64)
    cols = tl.minimum(offs_n, N - 1)
    k_begin = pid_k * K_SPLIT
    x_ptrs = X + rows[:, None] * stride_xm + (k_begin + offs_k)[None, :]  # (BLOCK_M, BLOCK_K)
    q_ptrs = QW + (k_begin // PACK + offs_w)[:, None] * stride_qk + cols[None, :]  # (BLOCK_K / PACK, BLOCK_N)
    EVEN_K: tl.constexpr = K % K_SPLIT == 0  # every split covers K_SPLIT valid columns: no masks
    if GROUP >= K:  # one group: its scale / zero row once
        s_one = tl.load(S + cols).to(tl.float32)[None, :]
        z_one = tl.load(Z + cols).to(tl.float32)[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, K_SPLIT, BLOCK_K):
        k0 = k_begin + kk
        if EVEN_K:
            a = tl.load(x_ptrs)
            words = tl.load(q_ptrs)
        else:
            a = tl.load(x_ptrs, mask=(offs_k < K - k0)[None, :], other=0.0)
            words = tl.load(q_ptrs, mask=(offs_w < (K - k0) // PACK)[:, None], other=0)
        q = (words[:, None, :] >> shifts[None, :, None]) & MASK  # (BLOCK_K / PACK, PACK, BLOCK_N)
        q = tl.reshape(q, (BLOCK_K, BLOCK_N)).to(tl.float32)

        if GROUP >= K:
            s = s_one
            z = z_one
        elif GROUP % BLOCK_K == 0:  # the whole step inside one group
            g = tl.minimum(k0 // GROUP, NUM_GROUPS - 1)  # (clamped: a masked tail step past K)
            s = tl.load(S + g * stride_sg + cols).to(tl.float32)[None, :]
            z = tl.load(Z + g * stride_sg + cols).to(tl.float32)[None, :]
        elif BLOCK_K % GROUP == 0:  # BLOCK_K / GROUP whole groups per step
            GPS: tl.constexpr = BLOCK_K // GROUP
            g = tl.minimum(k0 // GROUP + tl.arange(0, GPS), NUM_GROUPS - 1)
            s = tl.load(S + g[:, None] * stride_sg + cols[None, :]).to(tl.float32)
            z = tl.load(Z + g[:, None] * stride_sg + cols[None, :]).to(tl.float32)
            s = tl.reshape(tl.broadcast_to(s[:, None, :], (GPS, GROUP, BLOCK_N)), (BLOCK_K, BLOCK_N))
            z = tl.reshape(tl.broadcast_to(z[:, None, :], (GPS, GROUP, BLOCK_N)), (BLOCK_K, BLOCK_N))
        else:  # a group size that neither divides nor is divided by BLOCK_K: per-row gather
            g = tl.minimum((k0 + offs_k) // GROUP, NUM_GROUPS - 1)
            s = tl.load(S + g[:, None] * stride_sg + cols[None, :]).to(tl.float32)
            z = tl.load(Z + g[:, None] * stride_sg + cols[None, :]).to(tl.float32)
        w = ((q - z) * s).to(X.dtype.element_ty)  # fp32 dequant, one rounding (= quant.dequantize)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K
        q_ptrs += (BLOCK_K // PACK) * stride_qk

    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    if PARTIAL:
        tl.store(y_ptrs + pid_k.to(tl.int64) * stride_ys, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(B + cols).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _splitk_reduce_kernel(P, B, Y, total, N, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2 of split-K: y = sum of the SPLIT fp32 partial planes (fixed order: deterministic) + bias, rounded
    once. P (SPLIT, M, N) and Y (M, N) contiguous, `total` = M * N."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(P + s * total + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(B + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=ok)


class QuantGemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    split_k: int = 0  # 0: chosen by the launcher (decode only); >= 1: forced (tests)


# Hopper (H100/H200) table, fp16/bf16. NOT yet timed on a GPU (none was at hand): starting points to tune.
# Registers and shared memory: ptxas for sm_90a (Triton 3.6) at the 7B / 72B shapes (kernels/aot_sweep.py).
# - decode (M <= 16): 16 x 128 x BLOCK_K, 4 warps, 4 stages, BLOCK_K = 16 rows of packed words (128 for int4,
#   64 for int8): per stage 16 x 128 x 4 B = 8 KB of words + 16 x BLOCK_K x 2 B of x; wide rows (512 B of words
#   per word row) for coalescing; split-K (two-pass) fills the SMs. int4: 163-168 registers, 68 KB shared.
#   The unpacked (BLOCK_K, 128) fp32 tile is what costs registers: int8 at BLOCK_K 128 (32 word rows on top of
#   the same unpacked tile) took 255 registers and spilled 4 B (8 warps: still 220); at 64 it takes 128
#   registers and 46 KB, so four CTAs fit per SM instead of two and as many weight bytes stay in flight.
# - 17 <= M <= 64: 64 x 128 x 64, 4 warps, 4 stages (133-168 registers, 40-72 KB).
# - M > 64 (prefill): 128 x 128 x 64, 8 warps, 3 stages (the unpack/dequant temporaries of the 64 x 128 weight
#   tile are spread over 256 threads; 128 x 256 would double them on top of a 128-register accumulator):
#   124-171 registers, 72-80 KB.
# - fp32 (ieee dot, no tensor cores: the parity/testing path): 16/64 x 64 x 32, 4 warps.
# BLOCK_K is shrunk to the group size when the group is smaller (fewer scale rows per step; see the kernel).
_DECODE = QuantGemmConfig(16, 128, 128, 1, 4, 4)
_DECODE_INT8 = QuantGemmConfig(16, 128, 64, 1, 4, 4)
_SMALL_M = QuantGemmConfig(64, 128, 64, 8, 4, 4)
_PREFILL = QuantGemmConfig(128, 128, 64, 8, 8, 3)
_FP32_DECODE = QuantGemmConfig(16, 64, 32, 1, 4, 3)
_FP32 = QuantGemmConfig(64, 64, 32, 8, 4, 3)
_MAX_SPLIT = 16


def pick_config(M: int, N: int, K: int, dtype: torch.dtype, group: int,
                device: torch.device = torch.device("cpu"), *, bits: int = 4) -> QuantGemmConfig:
    """The tile config for an (M, N, K) problem with quantisation group `group` (K for one group) and `bits`."""
    if dtype == torch.float32:
        cfg = _FP32_DECODE if M <= 16 else _FP32
    elif M <= 16:
        cfg = _DECODE_INT8 if bits == 8 else _DECODE
    elif M <= 64:
        cfg = _SMALL_M
    else:
        cfg = _PREFILL

    def fit(block, size):
        return min(block, max(16, triton.next_power_of_2(size)))

    block_k = fit(cfg.block_k, K)
    if group < block_k and group >= 16 and group & (group - 1) == 0:
        block_k = group  # one scale row per step
    return cfg._replace(block_m=fit(cfg.block_m, M), block_n=fit(cfg.block_n, N), block_k=block_k)


def _split_count(M: int, N: int, K: int, cfg: QuantGemmConfig, device: torch.device) -> int:
    """Decode split-K: the smallest divisor of the K-block count that gives at least one program per SM."""
    if cfg.split_k:
        return cfg.split_k
    if M > 16:
        return 1
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    sms = _num_sms(device)
    if tiles >= sms:
        return 1
    k_blocks = triton.cdiv(K, cfg.block_k)
    want = min(triton.cdiv(sms, tiles), _MAX_SPLIT, k_blocks)
    for s in range(want, min(_MAX_SPLIT, k_blocks) + 1):
        if k_blocks % s == 0:
            return s
    return want  # no divisor in range: uneven splits (the tail masked)


def quant_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
               group_size: int, perm: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               config: Optional[QuantGemmConfig] = None) -> torch.Tensor:
    """The launcher on raw tensors (see the module docstring); `config` overrides the table (tests)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    pack = 32 // bits
    K, N = qweight.shape[0] * pack, qweight.shape[1]
    if qweight.dtype != torch.int32:
        raise TypeError(f"qweight must be int32, got {qweight.dtype}")
    if x.shape[-1] != K:
        raise ValueError(f"x {tuple(x.shape)} does not match the weight's input width {K}")
    group = K if group_size == -1 else group_size
    if group <= 0 or K % group or scales.shape != (K // group, N) or zeros.shape != scales.shape:
        raise ValueError(f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} do not match K={K}, N={N}, "
                         f"group_size={group_size}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not match N={N}")
    if any(t.device != x.device for t in (qweight, scales, zeros, *(t for t in (perm, bias) if t is not None))):
        raise ValueError("x and the quantized weight tensors must be on the same device")

    lead, x2 = as_rows(x, K, perm)  # act-order: the weight rows are stored in perm order
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    M = x2.shape[0]
    y = _empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.reshape(*lead, N)
    if K == 0:
        raise ValueError("K = 0: nothing to reduce")

    cfg = config or pick_config(M, N, K, x.dtype, group, x.device, bits=bits)
    if cfg.block_k % pack or cfg.block_k < 16:
        raise ValueError(f"block_k {cfg.block_k} must be >= 16 and a multiple of {pack}")
    split = max(1, min(_split_count(M, N, K, cfg, x.device), triton.cdiv(K, cfg.block_k)))
    k_split = triton.cdiv(triton.cdiv(K, cfg.block_k), split) * cfg.block_k
    split = triton.cdiv(K, k_split)  # no empty splits
    out = _empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1 else y
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
    _quant_gemm_kernel[grid](
        x2, qweight, scales, zeros, bias if bias is not None else y, out,
        M, N, x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(-2), out.stride(0) if split > 1 else 0,
        K=K, K_SPLIT=k_split, BITS=bits, GROUP=group,
        STRIDE_ALIGN=_stride_align(x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(-2)),
        HAS_BIAS=bias is not None, PARTIAL=split > 1,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(M * N, block),)](
            out, bias if bias is not None else y, y, M * N, N, SPLIT=split, HAS_BIAS=bias is not None, BLOCK=block,
            num_warps=4)
    return y.reshape(*lead, N)


# One PyTorch library op, so torch.compile and CUDA-graph capture see a single opaque node (the QuantizedWeight
# dataclass is passed as its tensors).
@torch.library.custom_op("qwen2vl_fast::quant_linear_triton", mutates_args=())
def quant_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        perm: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int,
                        group_size: int) -> torch.Tensor:
    return quant_gemm(x, qweight, scales, zeros, bits, group_size, perm, bias)


@quant_linear_triton.register_fake
def _(x, qweight, scales, zeros, perm, bias, bits, group_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


def quant_linear(x: torch.Tensor, w, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (..., K), w a qwen2vl_fast.quant.QuantizedWeight (K -> N), bias (N,) or None -> (..., N) in x's dtype."""
    return quant_linear_triton(x, w.qweight, w.scales, w.zeros, w.perm, bias, w.bits, w.group_size)
