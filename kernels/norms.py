"""Row normalisations in Triton: LayerNorm, RMSNorm, and both fused with the residual add before them.

    layer_norm(x, w, b, eps)              y = (x - mean(x)) / sqrt(var(x) + eps) * w + b
    rms_norm(x, w, eps)                   y = w * round(x / sqrt(mean(x^2) + eps))
    add_layer_norm(x, r, w, b, eps)       r' = round(x + r);  (layer_norm(r', w, b, eps), r')
    add_rms_norm(x, r, w, eps)            r' = round(x + r);  (rms_norm(r', w, eps), r')

x, r: (..., N) in fp32 / fp16 / bf16, last dim contiguous, any row stride; w, b: (N,) in x's dtype.
Outputs are new contiguous tensors of x's shape and dtype. `round` is a cast to x's dtype.

Numerics follow the references in qwen2vl_fast/ops/norms.py (transformers' Qwen2RMSNorm and F.layer_norm):
statistics in fp32; RMSNorm rounds the normalised row to the storage dtype *before* the weight multiply
(as Qwen2RMSNorm does), LayerNorm rounds once at the end; the fused residual sum is rounded to the storage
dtype before it is stored and normalised, so r' is bit-identical to the reference's `residual + x`.

Launch: one program per BLOCK_M rows, the whole row held in registers (BLOCK_N = next_pow2(N) lanes,
masked), so every element is read once and written once: the kernel moves the minimum bytes. BLOCK_M > 1
only for narrow rows (N < 2048), so a program always has at least ~2048 elements of work.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

# Widest row kept in registers (16384 over 32 warps: 16 values per thread per live tensor). The models' widest
# norm is 8192 (Qwen2-VL-72B's hidden size); wider rows would need a chunked two-pass loop.
MAX_WIDTH = 16384
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _norm_kernel(X, x_stride, R, r_stride, W, B, Y, y_stride, RES, res_stride, n_rows, N, eps,
                 IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Normalise BLOCK_M rows of X (optionally X + R first) into Y (and the rounded sum into RES)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)[:, None]  # rows * stride overflows int32 past 2^31 elements
    dtype = Y.dtype.element_ty

    x = tl.load(X + rows * x_stride + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows * r_stride + cols[None, :], mask=mask, other=0.0)
        # Round the sum to the storage dtype and normalise *that*: the reference adds in the dtype.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(RES + rows * res_stride + cols[None, :], x, mask=mask)
    h = x.to(tl.float32)  # masked lanes are 0: they add nothing to the sums below

    if IS_RMS:
        ms = tl.sum(h * h, axis=1) / N
        # Correctly rounded 1/sqrt (not rsqrt.approx, ~2 ulp): one per row, costs nothing, and leaves the
        # order of the sum as the only fp32 difference from torch (a row's outputs may move by an ulp).
        rstd = tl.div_rn(1.0, tl.sqrt_rn(ms + eps))
        # Qwen2RMSNorm: round the normalised row to the dtype, then multiply by the weight in the dtype
        # (a 16-bit x 16-bit product is exact in fp32, so one more rounding reproduces torch's).
        y = (h * rstd[:, None]).to(dtype).to(tl.float32)
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    else:
        mean = tl.sum(h, axis=1) / N
        hc = tl.where(mask, h - mean[:, None], 0.0)
        var = tl.sum(hc * hc, axis=1) / N  # two-pass variance from registers: no cancellation
        rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = hc * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows * y_stride + cols[None, :], y.to(dtype), mask=mask)


def _launch_config(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of width n."""
    block_n = triton.next_power_of_2(n)
    # Narrow rows: pack rows until a program holds ~2048 elements, else launches are mostly overhead.
    block_m = max(1, min(16, 2048 // block_n))
    # ~256 elements per warp (8 per thread: one 16-byte vector in 16-bit dtypes), at most 16 warps up to
    # 8192 (40 registers on sm_90, no spills); 16384 gets 32 warps (16 warps spilled 8 bytes).
    num_warps = max(1, min(16 if block_n <= 8192 else 32, block_m * block_n // 256))
    return block_m, block_n, num_warps


def _rows(t: torch.Tensor, name: str, n: int) -> torch.Tensor:
    """t as a 2D (rows, n) view with a contiguous last dim; a copy only if the leading dims cannot be merged."""
    if t.shape[-1] != n:
        raise ValueError(f"{name} has width {t.shape[-1]}, expected {n} (shape {tuple(t.shape)})")
    if t.dim() == 0 or (t.stride(-1) != 1 and n > 1):
        raise ValueError(f"{name} must have a contiguous last dim (shape {tuple(t.shape)}, strides {t.stride()})")
    try:
        return t.view(-1, n)
    except RuntimeError:  # e.g. a permuted 3D tensor: one copy beats a wrong answer
        return t.reshape(-1, n)


def _check_vector(t: Optional[torch.Tensor], name: str, x: torch.Tensor) -> None:
    if t is None:
        return
    n = x.shape[-1]
    if t.shape != (n,) or t.dtype != x.dtype or t.device != x.device or (n > 1 and t.stride(0) != 1):
        raise ValueError(f"{name} must be a contiguous ({n},) {x.dtype} tensor on {x.device}, got shape "
                         f"{tuple(t.shape)}, dtype {t.dtype}, device {t.device}, strides {t.stride()}")


def _check(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor]):
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dim")
    n = x.shape[-1]
    if not 1 <= n <= MAX_WIDTH:
        raise ValueError(f"row width {n} is outside the Triton norm kernels' range 1..{MAX_WIDTH}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device):
        raise ValueError(f"residual must match x: got {tuple(residual.shape)} {residual.dtype} on {residual.device}"
                         f", x is {tuple(x.shape)} {x.dtype} on {x.device}")
    _check_vector(weight, "weight", x)
    _check_vector(bias, "bias", x)


def _launch(x, residual, weight, bias, eps, is_rms, out, res_out):
    """Run the kernel writing `out` (and `res_out`); all checked by the caller, outputs of x's shape."""
    n = x.shape[-1]
    x2 = _rows(x, "x", n)
    n_rows = x2.shape[0]
    if n_rows == 0:
        return
    y2 = out.view(-1, n)  # viewable: checked by _check_out
    if residual is not None:
        r2, res2 = _rows(residual, "residual", n), res_out.view(-1, n)
    else:
        r2 = res2 = x2  # unused: HAS_RESIDUAL=False compiles their loads and stores away
    block_m, block_n, num_warps = _launch_config(n)
    _norm_kernel[(triton.cdiv(n_rows, block_m),)](
        x2, x2.stride(0), r2, r2.stride(0), weight, bias if bias is not None else weight, y2, y2.stride(0),
        res2, res2.stride(0), n_rows, n, float(eps),
        IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)


def _check_out(out: Optional[torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    """A caller's output buffer (validated) or a new contiguous one."""
    if out is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"{name} must be {tuple(x.shape)} {x.dtype} on {x.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    try:
        out.view(-1, x.shape[-1])  # the kernel writes rows through one row stride
    except RuntimeError:
        raise ValueError(f"{name} (strides {out.stride()}) cannot be viewed as (rows, {x.shape[-1]})") from None
    if x.shape[-1] > 1 and out.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim, strides {out.stride()}")
    return out


# ------------------------------------------------------------------------------ custom ops (one graph node)
# Registered with torch.library so torch.compile and CUDA-graph capture see one opaque node per call; the
# fake implementations give output shapes without running anything.

@torch.library.custom_op("qwen2vl_fast::layer_norm_triton", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    _check(x, None, weight, bias)
    out = _check_out(None, "out", x)
    _launch(x, None, weight, bias, eps, False, out, None)
    return out


@torch.library.custom_op("qwen2vl_fast::rms_norm_triton", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check(x, None, weight, None)
    out = _check_out(None, "out", x)
    _launch(x, None, weight, None, eps, True, out, None)
    return out


@torch.library.custom_op("qwen2vl_fast::add_layer_norm_triton", mutates_args=())
def _add_layer_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, residual, weight, bias)
    out, res_out = _check_out(None, "out", x), _check_out(None, "residual_out", x)
    _launch(x, residual, weight, bias, eps, False, out, res_out)
    return out, res_out


@torch.library.custom_op("qwen2vl_fast::add_rms_norm_triton", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, residual, weight, None)
    out, res_out = _check_out(None, "out", x), _check_out(None, "residual_out", x)
    _launch(x, residual, weight, None, eps, True, out, res_out)
    return out, res_out


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    _check(x, None, weight, bias)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    _check(x, None, weight, None)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    _check(x, residual, weight, bias)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    _check(x, residual, weight, None)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


# ------------------------------------------------------------------------------------------ launchers
# Without `out=` they call the custom op; with it they write the caller's buffers eagerly (tests poison them).

def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float, *,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LayerNorm over the last dim: x (..., N) fp32/fp16/bf16; weight, bias (N,) in x's dtype (bias may be
    None). Statistics in fp32, one rounding at the end (as F.layer_norm). Returns (..., N) in x's dtype."""
    if out is None:
        return torch.ops.qwen2vl_fast.layer_norm_triton(x, weight, bias, float(eps))
    _check(x, None, weight, bias)
    _launch(x, None, weight, bias, eps, False, _check_out(out, "out", x), None)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Qwen2RMSNorm over the last dim: weight * round(x * rsqrt(mean(x^2) + eps)), statistics in fp32, the
    normalised row rounded to x's dtype before the weight multiply. x (..., N); weight (N,) in x's dtype."""
    if out is None:
        return torch.ops.qwen2vl_fast.rms_norm_triton(x, weight, float(eps))
    _check(x, None, weight, None)
    _launch(x, None, weight, None, eps, True, _check_out(out, "out", x), None)
    return out


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   eps: float, *, out: Optional[torch.Tensor] = None,
                   residual_out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """r' = residual + x (rounded to the dtype); returns (layer_norm(r'), r'), both (..., N) in x's dtype.
    `residual` is not modified."""
    if out is None and residual_out is None:
        return torch.ops.qwen2vl_fast.add_layer_norm_triton(x, residual, weight, bias, float(eps))
    _check(x, residual, weight, bias)
    out, residual_out = _check_out(out, "out", x), _check_out(residual_out, "residual_out", x)
    _launch(x, residual, weight, bias, eps, False, out, residual_out)
    return out, residual_out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 out: Optional[torch.Tensor] = None,
                 residual_out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """r' = residual + x (rounded to the dtype); returns (rms_norm(r'), r'), both (..., N) in x's dtype.
    `residual` is not modified."""
    if out is None and residual_out is None:
        return torch.ops.qwen2vl_fast.add_rms_norm_triton(x, residual, weight, float(eps))
    _check(x, residual, weight, None)
    out, residual_out = _check_out(out, "out", x), _check_out(residual_out, "residual_out", x)
    _launch(x, residual, weight, None, eps, True, out, residual_out)
    return out, residual_out
