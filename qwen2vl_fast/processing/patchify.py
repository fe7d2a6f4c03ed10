"""Normalisation and the patch layout the vision tower reads (REFERENCE.md §5 "Patchify").

Rows are patches in merge-group order: temporal patch, h/2, w/2, then the 2x2 position inside the group;
each row is (channel, temporal, py, px) flattened: 3 * 2 * 14 * 14 = 1176 values.
"""

from __future__ import annotations

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(frames: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD, rescale_factor: float = 1 / 255) -> torch.Tensor:
    """(x - mean/rescale) / (std/rescale) in float32: transformers' fused rescale + normalize, the same
    operations in the same order (mean and std scaled in float32 first), so results are bit-identical."""
    m = torch.tensor(mean, device=frames.device) * (1.0 / rescale_factor)
    s = torch.tensor(std, device=frames.device) * (1.0 / rescale_factor)
    x = frames.to(torch.float32)
    return x.sub(m.view(-1, 1, 1)).div_(s.view(-1, 1, 1))


def patchify(frames: torch.Tensor, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2):
    """frames (T, C, H, W) float -> (pixel rows (N, C*tp*p*p), grid (t, h, w) in patches).

    T is padded to a multiple of temporal_patch_size by repeating the last frame (an image, T = 1, becomes two
    identical frames). H and W must be multiples of patch_size * merge_size.
    """
    t, c, h, w = frames.shape
    if t == 1:  # an image: the repeated frame stays a stride-0 view, so the permute below copies only once
        frames = frames.expand(temporal_patch_size, -1, -1, -1)
    elif t % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(temporal_patch_size - t % temporal_patch_size, -1, -1, -1)])
    gt, gh, gw = frames.shape[0] // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                       gw // merge_size, merge_size, patch_size)
    # -> (gt, gh/m, gw/m, mh, mw, C, tp, py, px)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


def normalize_patchify(frames: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD, patch_size: int = 14,
                       temporal_patch_size: int = 2, merge_size: int = 2, rescale_factor: float = 1 / 255):
    """`patchify(normalize(frames))` for uint8 frames, bit-identical and cheaper: the permuting copy moves
    uint8 (a quarter of the bytes), then the rows are converted and normalised in place with per-column
    mean/std (column k of a row belongs to channel k // (temporal_patch_size * patch_size**2))."""
    rows, grid = patchify(frames, patch_size, temporal_patch_size, merge_size)
    per_channel = temporal_patch_size * patch_size * patch_size
    m = (torch.tensor(mean, device=frames.device) * (1.0 / rescale_factor)).repeat_interleave(per_channel)
    s = (torch.tensor(std, device=frames.device) * (1.0 / rescale_factor)).repeat_interleave(per_channel)
    return rows.to(torch.float32).sub_(m).div_(s), grid
