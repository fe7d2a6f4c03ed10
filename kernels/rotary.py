"""The ViT's 2D rotary embedding in Triton, applied in place to q and k inside the fused qkv buffer.

    qkv (S, 3*H*D): columns q | k | v, each head-major (head h of q at [h*D, (h+1)*D)); cos, sin (S, D) fp32.
    For d < D/2:  q[d] <- q[d] * cos[d]       - q[d + D/2] * sin[d]
    for d >= D/2: q[d] <- q[d] * cos[d]       + q[d - D/2] * sin[d]      (x * cos + rotate_half(x) * sin)
    and the same for k; v is untouched. Math in fp32, one rounding to qkv's dtype (REFERENCE.md §1c: the
    vision rotary runs in fp32). Returns qkv.view(S, 3, H, D).unbind(1): q, k, v as (S, H, D) views of qkv.

Rotating in place saves the reference's split, two fp32 copies and the `.contiguous()` that follow: the kernel
reads and writes q and k once (4*H*D elements per token) and never touches v.

Launch: one program per token. q and k of a token are adjacent (2*H heads of D at the start of its row), so a
program holds a (BLOCK_H = next_pow2(2H), BLOCK_HALF = next_pow2(D/2)) tile of first halves and one of second
halves; cos/sin are read once per token and broadcast over the 2H heads. D/2 need not be a power of 2
(Qwen2-VL's head_dim 80: D/2 = 40 in a 64-lane block, masked).
"""

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _vision_rotary_kernel(QKV, qkv_stride, COS, cos_stride, SIN, sin_stride, NUM_QK_HEADS,
                          HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate the q and k heads (NUM_QK_HEADS = 2H heads of D = 2*HALF) of token program_id(0) in place."""
    tok = tl.program_id(0).to(tl.int64)  # tok * stride overflows int32 on long videos
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    mask = (heads < NUM_QK_HEADS)[:, None] & d_mask[None, :]

    c1 = tl.load(COS + tok * cos_stride + d, mask=d_mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + tok * cos_stride + HALF + d, mask=d_mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + tok * sin_stride + d, mask=d_mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + tok * sin_stride + HALF + d, mask=d_mask, other=0.0).to(tl.float32)

    p1 = QKV + tok * qkv_stride + heads[:, None] * (2 * HALF) + d[None, :]
    p2 = p1 + HALF
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p2, mask=mask, other=0.0)
    dtype = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    o1 = x1 * c1[None, :] - x2 * s1[None, :]
    o2 = x2 * c2[None, :] + x1 * s2[None, :]
    tl.store(p1, o1.to(dtype), mask=mask)
    tl.store(p2, o2.to(dtype), mask=mask)


def _check(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> int:
    """Validate the arguments; returns head_dim."""
    if qkv.dtype not in _DTYPES:
        raise TypeError(f"qkv must be float32, float16 or bfloat16, got {qkv.dtype}")
    if qkv.dim() != 2:
        raise ValueError(f"qkv must be (S, 3*H*D), got shape {tuple(qkv.shape)}")
    s, width = qkv.shape
    if num_heads < 1 or width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not 3 * num_heads ({num_heads}) * head_dim")
    d = width // (3 * num_heads)
    if d % 2:
        raise ValueError(f"head_dim {d} must be even (rotate_half splits it in two)")
    if qkv.stride(1) != 1:
        raise ValueError(f"qkv must have a contiguous last dim, strides {qkv.stride()}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (s, d) or t.dtype != torch.float32 or t.device != qkv.device:
            raise ValueError(f"{name} must be ({s}, {d}) float32 on {qkv.device}, got {tuple(t.shape)} "
                             f"{t.dtype} on {t.device}")
        if d > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, strides {t.stride()}")
    return d


@torch.library.custom_op("qwen2vl_fast::vision_rotary_triton", mutates_args=("qkv",))
def _vision_rotary_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> None:
    """In-place op: a custom op cannot return views of its input, so the launcher below makes them."""
    d = _check(qkv, cos, sin, num_heads)
    s = qkv.shape[0]
    if s == 0:
        return
    half = d // 2
    block_h, block_half = triton.next_power_of_2(2 * num_heads), triton.next_power_of_2(half)
    # 2H x D/2 per tile (16 heads x 40 -> 32 x 64 = 2048 lanes): 4 warps, 16 lanes per thread per half.
    num_warps = max(1, min(8, block_h * block_half // 512))
    # HALF is a compile-time constant (one compile per head_dim; the models use 40 and 64): Triton proves the
    # head offsets h*D and the second-half offset 16-byte aligned and the d < HALF mask constant over 8 lanes,
    # so it emits vector loads. As a runtime int, 40 is not specialised (only multiples of 16 are): scalar loads.
    # enable_fp_fusion=False: no FMA contraction, so x*cos - y*sin rounds exactly like the reference's separate
    # multiply and add: bit-identical to it on the GPU too. Free in a memory-bound kernel.
    _vision_rotary_kernel[(s,)](qkv, qkv.stride(0), cos, cos.stride(0), sin, sin.stride(0), 2 * num_heads,
                                HALF=half, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps,
                                enable_fp_fusion=False)


@_vision_rotary_op.register_fake
def _(qkv, cos, sin, num_heads):
    _check(qkv, cos, sin, num_heads)


def vision_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate q and k of `qkv` (S, 3*H*D, fp32/fp16/bf16, last dim contiguous) in place by cos, sin (S, D)
    fp32, in fp32 with one rounding. Returns q, k, v: (S, H, D) views of qkv (qkv is modified)."""
    _vision_rotary_op(qkv, cos, sin, int(num_heads))
    return qkv.view(qkv.shape[0], 3, num_heads, qkv.shape[1] // (3 * num_heads)).unbind(1)
