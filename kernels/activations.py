"""Elementwise activations in Triton: QuickGELU, exact GELU, and SiLU-and-multiply on a fused gate/up output.

    quick_gelu(x)        y = x * sigmoid(1.702 x)                   (Qwen2-VL ViT MLP)
    gelu(x)              y = 0.5 x (1 + erf(x / sqrt(2)))           (exact erf GELU: the merger)
    silu_and_mul(gu)     gu (..., 2I) = [gate | up] -> silu(gate) * up, (..., I)   (Qwen2 / Qwen2.5-VL MLP)

Inputs fp32 / fp16 / bf16; outputs new contiguous tensors in the input's dtype. The math runs in fp32 with one
rounding at the end: at least as accurate as the references, which round after each PyTorch op in 16-bit
(DESIGN.md bounds the error by twice PyTorch's own).

Launch: memory-bound, so each program streams one BLOCK of 2048 elements (8 per thread over 8 warps: one
16-byte vector per thread in 16-bit dtypes) and the grid covers the tensor; silu_and_mul is a 2D grid
(rows, column blocks) so a row's gate and up halves are read with the row stride, with no split copies.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 2048
_NUM_WARPS = 8


@triton.jit
def _gelu_kernel(X, Y, n, QUICK: tl.constexpr, BLOCK: tl.constexpr):
    """Y[i] = act(X[i]) over a flat contiguous tensor of n elements; QUICK picks QuickGELU over erf GELU."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: tensors past 2^31 elements
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0)
    h = x.to(tl.float32)
    if QUICK:
        y = h * tl.sigmoid(1.702 * h)
    else:
        y = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))  # 1/sqrt(2)
    tl.store(Y + offs, y.to(x.dtype), mask=mask)


@triton.jit
def _silu_and_mul_kernel(GU, gu_stride, Y, y_stride, I, BLOCK: tl.constexpr):
    """Y[r, j] = silu(GU[r, j]) * GU[r, I + j] for the BLOCK columns j of program (r, program_id(1))."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(GU + row * gu_stride + cols, mask=mask, other=0.0)
    u = tl.load(GU + row * gu_stride + I + cols, mask=mask, other=0.0)
    g32 = g.to(tl.float32)
    y = g32 * tl.sigmoid(g32) * u.to(tl.float32)
    tl.store(Y + row * y_stride + cols, y.to(g.dtype), mask=mask)


def _check_in(x: torch.Tensor, name: str) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")


def _check_out(out: Optional[torch.Tensor], shape, like: torch.Tensor) -> torch.Tensor:
    """A caller's (validated, contiguous) output buffer or a new one."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"out must be {tuple(shape)} {like.dtype} on {like.device}, got {tuple(out.shape)} "
                         f"{out.dtype} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous, strides {out.stride()}")
    return out


def _launch_gelu(x: torch.Tensor, out: torch.Tensor, quick: bool) -> None:
    _check_in(x, "x")
    if not x.is_contiguous():
        raise ValueError(f"x must be contiguous (shape {tuple(x.shape)}, strides {x.stride()})")
    n = x.numel()
    if n:
        _gelu_kernel[(triton.cdiv(n, _BLOCK),)](x, out, n, QUICK=quick, BLOCK=_BLOCK, num_warps=_NUM_WARPS)


def _check_gate_up(gate_up: torch.Tensor) -> int:
    """Validate gate_up; returns I."""
    _check_in(gate_up, "gate_up")
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must be (..., 2*I), got shape {tuple(gate_up.shape)}")
    if gate_up.shape[-1] > 1 and gate_up.stride(-1) != 1:
        raise ValueError(f"gate_up must have a contiguous last dim, strides {gate_up.stride()}")
    return gate_up.shape[-1] // 2


def _launch_silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor) -> None:
    i = _check_gate_up(gate_up)
    try:
        gu = gate_up.view(-1, 2 * i)
    except RuntimeError:  # leading dims that cannot merge (a permuted view): one copy beats a wrong answer
        gu = gate_up.reshape(-1, 2 * i)
    rows = gu.shape[0]
    if rows == 0 or i == 0:
        return
    y = out.view(-1, i)
    block = min(_BLOCK, triton.next_power_of_2(i))
    num_warps = max(1, min(_NUM_WARPS, block // 256))
    _silu_and_mul_kernel[(rows, triton.cdiv(i, block))](gu, gu.stride(0), y, y.stride(0), i,
                                                       BLOCK=block, num_warps=num_warps)


# ------------------------------------------------------------------------------ custom ops (one graph node)

@torch.library.custom_op("qwen2vl_fast::quick_gelu_triton", mutates_args=())
def _quick_gelu_op(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch_gelu(x, out, True)
    return out


@torch.library.custom_op("qwen2vl_fast::gelu_triton", mutates_args=())
def _gelu_op(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch_gelu(x, out, False)
    return out


@torch.library.custom_op("qwen2vl_fast::silu_and_mul_triton", mutates_args=())
def _silu_and_mul_op(gate_up: torch.Tensor) -> torch.Tensor:
    i = _check_gate_up(gate_up)
    out = torch.empty((*gate_up.shape[:-1], i), dtype=gate_up.dtype, device=gate_up.device)
    _launch_silu_and_mul(gate_up, out)
    return out


@_quick_gelu_op.register_fake
def _(x):
    _check_in(x, "x")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_gelu_op.register_fake
def _(x):
    _check_in(x, "x")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_silu_and_mul_op.register_fake
def _(gate_up):
    i = _check_gate_up(gate_up)
    return gate_up.new_empty((*gate_up.shape[:-1], i))


# ------------------------------------------------------------------------------------------ launchers
# Without `out=` they call the custom op; with it they write the caller's buffer eagerly (tests poison it).

def quick_gelu(x: torch.Tensor, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x * sigmoid(1.702 x) in fp32, rounded once; x contiguous fp32/fp16/bf16, any shape."""
    if out is None:
        return torch.ops.qwen2vl_fast.quick_gelu_triton(x)
    _launch_gelu(x, _check_out(out, x.shape, x), True)
    return out


def gelu(x: torch.Tensor, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact GELU 0.5 x (1 + erf(x / sqrt 2)) in fp32, rounded once; x contiguous fp32/fp16/bf16, any shape."""
    if out is None:
        return torch.ops.qwen2vl_fast.gelu_triton(x)
    _launch_gelu(x, _check_out(out, x.shape, x), False)
    return out


def silu_and_mul(gate_up: torch.Tensor, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """gate_up (..., 2I) = [gate | up], last dim contiguous, any row stride -> silu(gate) * up (..., I) in
    gate_up's dtype, computed in fp32 and rounded once."""
    if out is None:
        return torch.ops.qwen2vl_fast.silu_and_mul_triton(gate_up)
    i = _check_gate_up(gate_up)
    _launch_silu_and_mul(gate_up, _check_out(out, (*gate_up.shape[:-1], i), gate_up))
    return out
