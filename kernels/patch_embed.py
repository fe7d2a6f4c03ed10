"""The ViT patch embedding (the Conv3d with kernel = stride, i.e. one GEMM), two ways (Triton).

- `patch_embed(pixel_values (N, 1176), weight (E, 1176))`: the processor's rows, cast to the weight dtype, times
  weight.T: the plain GEMM of kernels/gemm.py.
- `patch_embed_frames(frames uint8 (T, C, H, W), weight (E, C*tp*p*p), mean, std)`: the same product read straight
  from the resized uint8 frames. The GEMM's A-operand prologue gathers, for output row r and reduction index k,
  one byte of the frames, normalises it in fp32 and casts it to the weight dtype; the (N, 1176) float tensor that
  the processor would write (and the tower read back) never exists: the frames are read at 1 byte per value.

Index maps (REFERENCE.md §1a-b, §5; qwen2vl_fast/processing/patchify.py):
    row r  = (((gt * H/(p*m) + bh) * W/(p*m) + bw) * m + mh) * m + mw     merge-group order, m = merge
    col k  = ((c * tp + t) * p + py) * p + px                            the Conv3d weight's flattening
    pixel  = frames[min(gt*tp + t, T - 1), c, (bh*m + mh)*p + py, (bw*m + mw)*p + px]
The min() repeats the last frame when T is not a multiple of tp (an image, T = 1, is used twice).

Normalisation: (x - mean[c]*255) / (std[c]*255) in fp32 with a correctly rounded division, the operations and
order of `normalize_patchify` (mean and std scaled by 255 in fp32 on the host), so the GEMM inputs are
bit-identical to the reference's rows; then cast to the weight dtype, fp32 accumulation, one rounding of the
output to the weight dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import gemm as _gemm
from .gemm import GemmConfig, _tile_coords, linear


@triton.jit
def _patch_embed_frames_kernel(
    F, W, Y, MEAN, STD,
    N, E, T, Hm, Wm,  # rows, embed dim, frames, merge groups per column / per row of a frame
    stride_ft, stride_fc, stride_fh, stride_fw, stride_wn, stride_ym,
    C: tl.constexpr, TP: tl.constexpr, P: tl.constexpr, MERGE: tl.constexpr, W_ALIGN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    K: tl.constexpr = C * TP * P * P
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(E, BLOCK_N), GROUP_M)
    if W_ALIGN > 1:  # 1176-wide weight rows are 16-byte aligned only in fp32: see gemm._stride_align
        stride_wn = (stride_wn // W_ALIGN) * W_ALIGN
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    # Row -> (temporal patch, merge group, position in the group) -> first frame and pixel offset of the patch.
    # Rows past N are clamped to the last patch (loaded, never stored).
    r = tl.minimum(offs_m, N - 1)
    mw = r % MERGE
    mh = (r // MERGE) % MERGE
    group = r // (MERGE * MERGE)
    bw = group % Wm
    bh = (group // Wm) % Hm
    first_frame = (group // (Wm * Hm)) * TP
    row_off = ((bh * MERGE + mh) * P).to(tl.int64) * stride_fh + ((bw * MERGE + mw) * P).to(tl.int64) * stride_fw

    cols = tl.minimum(offs_n, E - 1).to(tl.int64)
    w_ptrs = W + cols[None, :] * stride_wn + offs_k[:, None]  # (BLOCK_K, BLOCK_N) tile of weight.T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        px = k % P
        py = (k // P) % P
        t = (k // (P * P)) % TP
        c = tl.minimum(k // (P * P * TP), C - 1)  # clamped: the K tail stays in bounds of MEAN/STD
        col_off = c * stride_fc + py * stride_fh + px * stride_fw
        frame = tl.minimum(first_frame[:, None] + t[None, :], T - 1).to(tl.int64)
        pix = tl.load(F + frame * stride_ft + row_off[:, None] + col_off[None, :], mask=k_ok[None, :], other=0)
        mean = tl.load(MEAN + c)
        std = tl.load(STD + c)
        a = tl.math.div_rn(pix.to(tl.float32) - mean[None, :], std[None, :])  # IEEE division, as torch's div_
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a.to(W.dtype.element_ty), w, acc, input_precision=INPUT_PRECISION)
        w_ptrs += BLOCK_K

    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(offs_m < N)[:, None] & (offs_n < E)[None, :])


# Hopper, bf16/fp16. The prologue (gather + a correctly rounded fp32 division per A element) costs per program
# O(BM * BK) and is repeated for every column tile, the MMA costs O(BM * BN * BK): a wide BN = 256 (E = 1280:
# 5 column tiles) halves the prologue's share against BN = 128. The A tile is produced in registers (no cp.async
# for it), so 3 stages only pipeline the weight stream; 8 warps to have enough threads for the gather.
# ptxas (sm_90a, Triton 3.6 and 3.9): 227-236 registers for an image (T = 1, specialised), 255 for a video: the
# cap, no spill yet; 57 KB shared. First alternative should a Triton release spill it: BN = 128 (157-197).
# fp32 (ieee, FMA path): 64x64x32 as in gemm.py.
_FRAMES = GemmConfig(128, 256, 32, 8, 8, 3)
_FRAMES_FP32 = GemmConfig(64, 64, 32, 8, 4, 3)


def _fit(cfg: GemmConfig, M: int, N: int) -> GemmConfig:
    def fit(block, size):
        return min(block, max(16, triton.next_power_of_2(size)))

    return cfg._replace(block_m=fit(cfg.block_m, M), block_n=fit(cfg.block_n, N))


def patch_embed(pixel_values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """pixel_values (N, C*tp*p*p) (the processor's fp32 rows) cast to weight's dtype, @ weight.T -> (N, E)."""
    return linear(pixel_values.to(weight.dtype), weight)


def _scaled(values, device, rescale_factor: float) -> torch.Tensor:
    """mean or std * (1 / rescale_factor) in fp32, computed as normalize_patchify does (so, bit-identical)."""
    if isinstance(values, torch.Tensor):
        t = values.to(device=device, dtype=torch.float32)
    else:
        t = torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)
    return (t * (1.0 / rescale_factor)).contiguous()


def embed_frames(frames: torch.Tensor, weight: torch.Tensor, mean, std, patch_size: int = 14,
                 temporal_patch_size: int = 2, merge_size: int = 2, rescale_factor: float = 1 / 255,
                 config: Optional[GemmConfig] = None) -> torch.Tensor:
    """The launcher of the fused variant: frames uint8 (T, C, H, W), any strides; weight (E, C*tp*p*p) row-major;
    mean, std: C floats (CLIP's) -> (N, E) in the weight dtype, N = ceil(T/tp) * (H/p) * (W/p) rows in
    merge-group order. H and W must be multiples of p * merge_size (the resize guarantees it)."""
    if frames.dim() != 4 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 (T, C, H, W), got {frames.dtype} {tuple(frames.shape)}")
    T, C, H, W = frames.shape
    p, tp, m = patch_size, temporal_patch_size, merge_size
    if T == 0 or H % (p * m) or W % (p * m) or H == 0 or W == 0:
        raise ValueError(f"frames {tuple(frames.shape)}: need T >= 1 and H, W positive multiples of {p * m}")
    E, K = weight.shape
    if K != C * tp * p * p:
        raise ValueError(f"weight {tuple(weight.shape)} does not match C * tp * p * p = {C * tp * p * p}")
    if weight.device != frames.device:
        raise ValueError("frames and weight must be on the same device")
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    m_t, s_t = _scaled(mean, frames.device, rescale_factor), _scaled(std, frames.device, rescale_factor)
    if m_t.numel() != C or s_t.numel() != C:
        raise ValueError(f"mean and std need {C} values (one per channel), got {m_t.numel()} and {s_t.numel()}")

    gt, Hm, Wm = triton.cdiv(T, tp), H // (p * m), W // (p * m)
    N = gt * Hm * Wm * m * m
    y = _gemm._empty((N, E), dtype=weight.dtype, device=weight.device)
    if E == 0:
        return y
    base = _FRAMES_FP32 if weight.dtype == torch.float32 else _FRAMES
    cfg = config or _fit(base, N, E)
    grid = (triton.cdiv(N, cfg.block_m) * triton.cdiv(E, cfg.block_n),)
    _patch_embed_frames_kernel[grid](
        frames, weight, y, m_t, s_t,
        N, E, T, Hm, Wm,
        *frames.stride(), weight.stride(0), y.stride(0),
        C=C, TP=tp, P=p, MERGE=m, W_ALIGN=_gemm._stride_align(weight.stride(0)),
        INPUT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


@torch.library.custom_op("qwen2vl_fast::patch_embed_frames_triton", mutates_args=())
def patch_embed_frames_triton(frames: torch.Tensor, weight: torch.Tensor, mean: list[float],
                              std: list[float], patch_size: int, temporal_patch_size: int,
                              merge_size: int) -> torch.Tensor:
    return embed_frames(frames, weight, mean, std, patch_size, temporal_patch_size, merge_size)


@patch_embed_frames_triton.register_fake
def _(frames, weight, mean, std, patch_size, temporal_patch_size, merge_size):
    t, _, h, w = frames.shape
    n = -(-t // temporal_patch_size) * (h // patch_size) * (w // patch_size)
    return weight.new_empty((n, weight.shape[0]))


def patch_embed_frames(frames: torch.Tensor, weight: torch.Tensor, mean, std, patch_size: int = 14,
                       temporal_patch_size: int = 2, merge_size: int = 2) -> torch.Tensor:
    """The op `patch_embed_frames` (see ops/basic.py): the fused uint8-frames patch embedding -> (N, E)."""
    mean = mean.tolist() if isinstance(mean, torch.Tensor) else [float(v) for v in mean]
    std = std.tolist() if isinstance(std, torch.Tensor) else [float(v) for v in std]
    return patch_embed_frames_triton(frames, weight, mean, std, patch_size, temporal_patch_size, merge_size)
