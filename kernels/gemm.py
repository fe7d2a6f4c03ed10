"""Dense GEMM with a fused epilogue: y = epilogue(x @ w.T + b), the nn.Linear layout (Triton, tensor cores).

    x (..., K)  any leading dims, flattened to (M, K); rows may be strided, the last dim must be contiguous
    w (N, K)    row-major (nn.Linear.weight); same dtype as x (fp32, fp16, bf16)
    b (N,)      optional
    y (..., N)  in x's dtype; SWIGLU: w = [gate; up] stacked (2I, K), b (2I,), y (..., I)

Epilogues (compile-time, `tl.constexpr`): NONE, QUICK_GELU y*sigmoid(1.702y) (Qwen2-VL ViT fc1), GELU exact erf
(merger fc1), SWIGLU silu(gate)*up (Qwen2.5-VL ViT and the LLM MLP). SWIGLU is a "dual" GEMM: each program
owns output columns j..j+BLOCK_N and accumulates the gate tile (rows j of w[:I]) and the up tile (rows j of
w[I:]) side by side from the same x tile, so the 2I-wide intermediate never reaches memory.

Numerics: fp32 accumulation; the bias is added to the fp32 accumulator, the activation runs in fp32 and the
result is rounded once to the output dtype. The references (ops/basic.py) round the GEMM output to the model
dtype before the activation (and SWIGLU rounds gate, up, silu(gate) and the product separately), so in fp16/bf16
ours differs from them by those roundings; it is closer to the fp32 result, which is what the DESIGN
low-precision rule (error within 2x PyTorch's own low-precision error against fp32) measures. In fp32 the
only differences are summation order. fp32 inputs use input_precision="ieee" (no TF32): fp32 is the
parity mode (DESIGN: logits within 1e-4), and TF32's 10-bit mantissa would break it.

Layout notes for Hopper: operands are loaded with masked pointer loads (cp.async pipelined by num_stages), not
TMA descriptors, because TMA needs 16-byte aligned row strides and Qwen2.5-VL's K = 3420 (bf16: 6840 bytes)
is not. Rows past M / columns past N are clamped to the last valid row/column for the loads (always in bounds,
never stored) so only the K tail needs a mask, and only when K % BLOCK_K != 0 (EVEN_K).

K is a compile-time constant: a model has a handful of reduction lengths (1176, 1280, 3420, 3584, 5120, 18944...),
so one compile per (K, epilogue, tile config) is cheap, gives the loop a known trip count and the K-tail mask a
compile-time switch. It is also what keeps the kernel runnable under the Triton 3.6 interpreter with NumPy >= 2.4,
where `range()` over a runtime integer argument fails ("only 0-dimensional arrays can be converted to Python
scalars": the interpreter holds scalars as 1-element arrays).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

NONE, QUICK_GELU, GELU, SWIGLU = 0, 1, 2, 3
EPILOGUES = {"none": NONE, "quick_gelu": QUICK_GELU, "gelu": GELU, "swiglu": SWIGLU}
_empty = torch.empty  # output allocation; the tests swap in a NaN-filled allocator to see unwritten elements


@triton.jit
def _tile_coords(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ("super-tile") launch order: consecutive programs walk GROUP_M row tiles down one column of
    tiles before moving right, so a group of programs shares GROUP_M x-tiles and a few w-tiles in L2 instead
    of streaming all of w for every row tile."""
    per_group = GROUP_M * num_pid_n
    group = pid // per_group
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    return pid_m, pid_n


@triton.jit
def _epilogue(acc, ACT: tl.constexpr):
    """Activation on the fp32 accumulator (bias already added)."""
    if ACT == 1:  # QuickGELU, transformers' QuickGELUActivation: x * sigmoid(1.702 x)
        acc = acc * tl.sigmoid(1.702 * acc)
    elif ACT == 2:  # exact GELU (nn.GELU(approximate="none")): 0.5 x (1 + erf(x / sqrt 2))
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    return acc


@triton.jit
def _finish(acc, acc_up, B, Y, offs_m, offs_n, M, N, stride_ym, HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
    """Bias, epilogue, one rounding, store: acc (and acc_up for SWIGLU) are complete fp32 sums (shared with
    gemv_splitk.py)."""
    cols = tl.minimum(offs_n, N - 1)
    if HAS_BIAS:
        acc += tl.load(B + cols).to(tl.float32)[None, :]
        if ACT == 3:
            acc_up += tl.load(B + N + cols).to(tl.float32)[None, :]
    if ACT == 3:
        acc = acc * tl.sigmoid(acc) * acc_up  # silu(gate) * up
    else:
        acc = _epilogue(acc, ACT)
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _gemm_kernel(
    X, W, B, Y,
    M, N,  # N: output columns (I for SWIGLU, where w holds 2N rows)
    stride_xm, stride_wn, stride_ym,
    K: tl.constexpr,  # see the module docstring: a compile-time reduction length
    STRIDE_ALIGN: tl.constexpr,  # a power of two dividing every row stride (elements), see _stride_align
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    if STRIDE_ALIGN > 1:  # (s // A) * A == s tells the alignment analysis A | s (tl.multiple_of on an arg is dropped)
        stride_xm = (stride_xm // STRIDE_ALIGN) * STRIDE_ALIGN
        stride_wn = (stride_wn // STRIDE_ALIGN) * STRIDE_ALIGN
        stride_ym = (stride_ym // STRIDE_ALIGN) * STRIDE_ALIGN
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # int64 row offsets: M * K and M * N exceed 2^31 at long prefill x large vocab (lm_head)
    rows = tl.minimum(offs_m, M - 1).to(tl.int64)
    cols = tl.minimum(offs_n, N - 1).to(tl.int64)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = W + cols[None, :] * stride_wn + offs_k[:, None]  # (BLOCK_K, BLOCK_N): w.T tile, K-major
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ACT == 3:
        up_ptrs = W + (cols + N)[None, :] * stride_wn + offs_k[:, None]  # rows I + j of the stacked [gate; up]
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    EVEN_K: tl.constexpr = K % BLOCK_K == 0
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        if ACT == 3:
            if EVEN_K:
                wu = tl.load(up_ptrs)
            else:
                wu = tl.load(up_ptrs, mask=k_ok[:, None], other=0.0)
            acc_up = tl.dot(a, wu, acc_up, input_precision=INPUT_PRECISION)
            up_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if ACT != 3:
        acc_up = acc  # unused: _finish reads it for SWIGLU only
    _finish(acc, acc_up, B, Y, offs_m, offs_n, M, N, stride_ym, HAS_BIAS, ACT)


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# Hopper (H100/H200) table, bf16/fp16. Shared memory per stage = (BM + BN [+ BN dual]) * BK * 2 bytes, of 227 KB.
# Registers and shared memory are ptxas's for sm_90a (Triton 3.6) at every preset's real shapes, compiled offline
# by kernels/aot_sweep.py (tests/test_aot_sm90.py); no GPU was at hand to time them.
# - 128x256x64, 8 warps, 3 stages (144 KB): large GEMMs without activation (M >= 1024, N >= 2048: qkv 3840,
#   LLM q/k/v, lm_head); two warpgroups each own a 64x256 wgmma accumulator (128 regs/thread; 174-176 in all).
# - 128x128x64, 4 warps, 4 stages (128 KB): no activation, mid-size M or narrow N (proj / fc2 / down, N = 1280):
#   256-wide tiles would leave most of the 132 SMs idle at N = 1280 (5 column tiles). 190-232 regs, no spill.
# - activation epilogues (QuickGELU, GELU), M > 64: 128x128x64 with 8 warps, 4 stages (125-128 regs). Rejected:
#   128x256 (255 regs + 16-64 B of stack: erf/exp temporaries on top of the 128-register accumulator) and
#   128x128 with 4 warps (GELU: 200 B of stack).
# - dual (SWIGLU), M > 64: 128x128x64, 8 warps, 3 stages (144 KB; two 128x128 fp32 accumulators = 128
#   regs/thread, 174 in all); a 128x256 dual tile would need 256 accumulator registers per thread. With a
#   bias (the Qwen2.5-VL vision MLP) the two bias rows take it to 255 registers, the cap, where Triton 3.9 spills
#   8 B: 128x64x64, 8 warps, 4 stages instead (128 KB, 152-164 regs; gate + up columns: a plain 128x128 tile).
# - 17 <= M <= 64 (small batches): 64-row tiles (the smallest wgmma M), 4 stages to keep the weight stream busy;
#   114-158 regs, 96 KB. M <= 32: 32x64x64 (4 warps): the 32x128 fit of the 64-row tile spilled 8 B at 96
#   registers under Triton 3.9 (ptxas 13) and 3.8 and 3.6 compile it clean too, and twice the column tiles keep
#   more SMs streaming the weight at these weight-bound sizes (8 warps instead spilled 4 B in the patch embedding).
# - M <= 16 (decode): a weight-bandwidth-bound GEMV; 16-row tiles (mma.sync), long BK = 128 for fewer, larger
#   loads, and BN = 32 when 64-wide columns would give fewer programs than SMs (N = 3584: 56 < 132). 40-64 regs,
#   36-60 KB. Dual with 8 warps (56-64 regs, 108 KB): at 4 warps it took 96 registers and, under Triton 3.9,
#   spilled 12 B in the M = 1 specialisation.
# - fp32 (ieee, no tensor cores: FMA-bound, the parity/testing path): 64x64x32, 4 warps; dual with 8 warps
#   (4 warps: 224 B of stack).
# Rejected: BK = 128 for the large tiles (smem allows only 2 stages, latency no longer hidden).
_LARGE = GemmConfig(128, 256, 64, 8, 8, 3)
_MID = GemmConfig(128, 128, 64, 8, 4, 4)
_ACT = GemmConfig(128, 128, 64, 8, 8, 4)
_DUAL = GemmConfig(128, 128, 64, 8, 8, 3)
_DUAL_BIAS = GemmConfig(128, 64, 64, 8, 8, 4)
_SMALL_M = GemmConfig(64, 128, 64, 8, 4, 4)
_SMALL_M32 = GemmConfig(32, 64, 64, 8, 4, 4)
_SMALL_M_DUAL = GemmConfig(64, 64, 64, 8, 4, 4)
_DECODE = GemmConfig(16, 64, 128, 1, 4, 4)
_DECODE_DUAL = GemmConfig(16, 64, 128, 1, 8, 4)
_FP32 = GemmConfig(64, 64, 32, 8, 4, 3)
_FP32_DUAL = GemmConfig(64, 64, 32, 8, 8, 3)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM; only matters for the tile choice, which the interpreter ignores


def pick_config(M: int, N: int, K: int, dtype: torch.dtype, epilogue: str = "none",
                device: torch.device = torch.device("cpu"), *, bias: bool = False) -> GemmConfig:
    """The tile config for an (M, N, K) problem (N: output columns) with or without a bias. Tiles are shrunk to
    the problem (never below 16, tl.dot's minimum) so small problems do not compute on padding."""
    dual = epilogue == "swiglu"
    if dtype == torch.float32:
        cfg = _FP32_DUAL if dual else _FP32
    elif M <= 16:
        cfg = _DECODE_DUAL if dual else _DECODE
        if triton.cdiv(N, cfg.block_n) < _num_sms(device):
            cfg = cfg._replace(block_n=32)
    elif M <= 64:
        cfg = _SMALL_M_DUAL if dual else (_SMALL_M32 if M <= 32 else _SMALL_M)
    elif dual:
        cfg = _DUAL_BIAS if bias else _DUAL
    elif epilogue != "none":
        cfg = _ACT
    elif M >= 1024 and N >= 2048:
        cfg = _LARGE
    else:
        cfg = _MID

    def fit(block, size):
        return min(block, max(16, triton.next_power_of_2(size)))

    return cfg._replace(block_m=fit(cfg.block_m, M), block_n=fit(cfg.block_n, N), block_k=fit(cfg.block_k, K))


def _stride_align(*strides: int) -> int:
    """The largest power of two (<= 16) dividing every row stride. Triton specialises only "divisible by 16",
    so without this hint the rows of K = 3420 (Qwen2.5-VL down_proj, 6840 bytes in bf16) look 2-byte aligned:
    the loads are not vectorised and, below 4 bytes, not cp.async'd, which turns software pipelining off.
    With 4 the compiler issues 8-byte cp.async and pipelines (checked on the sm_90 TTGIR)."""
    return math.gcd(16, *strides)


def as_rows(x: torch.Tensor, K: int, perm: Optional[torch.Tensor] = None):
    """(leading shape, x as (M, K) rows with a unit last stride): a view for contiguous or row-strided x.
    perm permutes the columns first (act-order weights store their rows in that order)."""
    x2 = x.reshape(-1, K)
    if perm is not None:
        x2 = x2.index_select(-1, perm)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x.shape[:-1], x2


def check_linear_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], epilogue: str):
    """(epilogue code, N, K) of `epilogue(x @ weight.T + bias)`, or the error saying what does not fit (shared by
    the GEMM launchers: this one and the split-K decode GEMV)."""
    act = EPILOGUES.get(epilogue)
    if act is None:
        raise ValueError(f"epilogue must be one of {tuple(EPILOGUES)}, got {epilogue!r}")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match: need (..., K) and (N, K)")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}, "
                        f"{None if bias is None else bias.dtype}")
    if x.device != weight.device or (bias is not None and bias.device != x.device):
        raise ValueError("x, weight and bias must be on the same device")
    n_rows, K = weight.shape
    if act == SWIGLU and n_rows % 2:
        raise ValueError(f"swiglu needs a stacked [gate; up] weight with an even row count, got {n_rows}")
    if bias is not None and bias.shape != (n_rows,):
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not match weight rows {n_rows}")
    return act, (n_rows // 2 if act == SWIGLU else n_rows), K


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, epilogue: str = "none",
         config: Optional[GemmConfig] = None) -> torch.Tensor:
    """The launcher: epilogue(x @ weight.T + bias) in x's dtype, see the module docstring. `config` overrides
    the table (tests use it to force many small tiles)."""
    act, N, K = check_linear_args(x, weight, bias, epilogue)

    lead, x2 = as_rows(x, K)
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    M = x2.shape[0]
    y = _empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.reshape(*lead, N)
    if K == 0:
        raise ValueError("K = 0: nothing to reduce")

    cfg = config or pick_config(M, N, K, x.dtype, epilogue, x.device, bias=bias is not None)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _gemm_kernel[grid](
        x2, weight, bias if bias is not None else y, y,
        M, N, x2.stride(0), weight.stride(0), y.stride(0),
        K=K, STRIDE_ALIGN=_stride_align(x2.stride(0), weight.stride(0), y.stride(0)),
        HAS_BIAS=bias is not None, ACT=act,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y.reshape(*lead, N)


# One PyTorch library op for every epilogue, so torch.compile and CUDA-graph capture see a single opaque node.
@torch.library.custom_op("qwen2vl_fast::linear_triton", mutates_args=())
def linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], epilogue: str) -> torch.Tensor:
    return gemm(x, weight, bias, epilogue)


@linear_triton.register_fake
def _(x, weight, bias, epilogue):
    n = weight.shape[0] // 2 if epilogue == "swiglu" else weight.shape[0]
    return x.new_empty((*x.shape[:-1], n))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight.T + bias: x (..., K), weight (N, K), bias (N,) or None -> (..., N)."""
    return linear_triton(x, weight, bias, "none")


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: str) -> torch.Tensor:
    """act(x @ weight.T + bias), act in none | quick_gelu | gelu (exact erf); one rounding after the activation."""
    if act not in ("none", "quick_gelu", "gelu"):
        raise ValueError(f"act must be one of ('none', 'quick_gelu', 'gelu'), got {act!r}")
    return linear_triton(x, weight, bias, act)


def linear_swiglu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """silu(x @ gate.T + b_gate) * (x @ up.T + b_up) with weight = [gate; up] (2I, K), bias (2I,) -> (..., I)."""
    return linear_triton(x, weight, bias, "swiglu")
