"""Positions: the LLM's M-RoPE position ids and the vision tower's per-batch metadata.

M-RoPE ids follow the original release (transformers 4 `get_rope_index`, REFERENCE.md §4) and are computed
with whole-batch tensor ops: no `.tolist()`/`.item()` per image or per token (lmms-engine PR #184 measured
tens of ms per step for the loop form). The idea: walk the valid tokens of a row with a running position
that advances by 1 per text token and by a vision span's *extent* once per span (the extent is
max(t_last, Hm - 1, Wm - 1) + 1, so the text after the span resumes at max + 1). An exclusive cumulative sum
of those per-token advances gives every token's base; vision tokens add their (t, h, w) offsets to it.

The vision rotary tables and window orders are cached per grid in `TABLE_CACHE`, one LRU bounded in bytes
(`bytes_lru.ByteLRU`): the tables grow with the image and the vision head_dim (a 16384-patch image at the real
head_dim 80 holds 10 MiB of cos/sin), so a count-bounded cache grew by GiBs over requests of distinct sizes
(issue 11). Budget: the environment variable QWEN2VL_FAST_TABLE_CACHE_MB (MiB, default 64, 0 turns the cache
off), read at every insertion. Cached values never leave this module: `vision_metadata` copies them (cat, +).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .bytes_lru import ByteLRU, byte_lru_cache
from .config import QWEN2_5_VL, ModelConfig
from .errors import InputError
from .ops.attention import VarlenMeta


def mrope_position_ids(cfg: ModelConfig, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                       image_grid_thw: Optional[torch.Tensor] = None, video_grid_thw: Optional[torch.Tensor] = None,
                       second_per_grid_ts=None, check: bool = True):
    """position_ids (3, B, L) int64 and rope_deltas (B, 1) int64, as transformers 4 `get_rope_index`.

    Padded slots hold 1; rope_delta = max position + 1 - L (decode uses position = cache slot + delta).
    `check` verifies, with one host sync for the whole batch, that placeholder tokens match the grids.
    """
    dev = input_ids.device
    b, L = input_ids.shape
    if image_grid_thw is None and video_grid_thw is None:
        return _text_only_positions(input_ids, attention_mask)
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(dev).bool()
    merge = cfg.vision.spatial_merge_size
    weight = valid.long()  # per-token advance of the running position; vision tokens are rewritten below
    offsets = torch.zeros(3, b, L, dtype=torch.long, device=dev)
    problems = []
    for grid, token_id, is_video in ((image_grid_thw, cfg.image_token_id, False),
                                     (video_grid_thw, cfg.video_token_id, True)):
        is_pad = (input_ids == token_id) & valid
        if grid is None or grid.numel() == 0:
            problems.append(is_pad.any())
            continue
        grid = torch.as_tensor(grid, device=dev).long().reshape(-1, 3)
        t, hm, wm = grid[:, 0], grid[:, 1] // merge, grid[:, 2] // merge
        n = t * hm * wm
        t_last = _temporal_positions(cfg, t - 1, is_video, second_per_grid_ts, grid.shape[0], dev)
        extent = torch.maximum(t_last, torch.maximum(hm, wm) - 1) + 1
        flat = is_pad.reshape(-1)
        rank = torch.cumsum(flat.long(), 0) - 1  # rank of each placeholder among all of its kind
        cum = torch.cumsum(n, 0)
        span = torch.searchsorted(cum, rank.clamp(min=0), right=True).clamp(max=grid.shape[0] - 1)
        o = rank - (cum[span] - n[span])
        hw = (hm * wm)[span]
        ti = _temporal_positions(cfg, o // hw, is_video, second_per_grid_ts, grid.shape[0], dev, span)
        pos3 = torch.stack([ti, (o % hw) // wm[span], o % wm[span]])
        sel = flat.view(1, -1).expand(3, -1)
        offsets.view(3, -1).copy_(torch.where(sel, pos3, offsets.view(3, -1)))
        last = flat & (o == n[span] - 1)
        w = weight.view(-1)
        w.copy_(torch.where(flat, torch.where(last, extent[span], torch.zeros_like(w)), w))
        if check:
            # Each span must be n consecutive tokens of one row: token o of span k sits at first[k] + o.
            where = torch.arange(flat.shape[0], device=dev)
            first = torch.full_like(n, flat.shape[0])
            first.scatter_reduce_(0, span, torch.where(flat, where, flat.shape[0]), "amin")
            start = first[span]
            broken = flat & ((where != start + o) | (where // L != start // L))
            problems.append((flat.sum() != n.sum()) | broken.any())
    if check and torch.stack([torch.as_tensor(p, device=dev) for p in problems]).any().item():
        raise InputError(_describe_mismatch(cfg, input_ids, valid, image_grid_thw, video_grid_thw))
    base = torch.cumsum(weight, dim=1) - weight
    position_ids = torch.where(valid[None], base[None] + offsets, torch.ones_like(offsets))
    rope_deltas = (weight.sum(dim=1, keepdim=True) - L).long()
    return position_ids, rope_deltas


def _temporal_positions(cfg, t_index, is_video, second_per_grid_ts, num, dev, span=None):
    """The T-axis position of temporal patch `t_index`. Qwen2-VL: the index itself. Qwen2.5-VL: 0 for images,
    floor(t * second_per_grid_t * tokens_per_second) for videos (multiplied in float, then truncated, as the
    original release; one transformers 4.5x release truncated second_per_grid_t first)."""
    if cfg.model_type != QWEN2_5_VL:
        return t_index
    if not is_video:
        return torch.zeros_like(t_index)
    if second_per_grid_ts is None:
        spg = torch.ones(num, dtype=torch.float64, device=dev)
    else:
        spg = torch.as_tensor(second_per_grid_ts, dtype=torch.float64, device=dev).reshape(-1)
        if spg.shape[0] != num:
            raise InputError(f"second_per_grid_ts has {spg.shape[0]} entries for {num} videos")
    if span is not None:
        spg = spg[span]
    return (t_index.double() * spg * cfg.vision.tokens_per_second).long()


def _text_only_positions(input_ids, attention_mask):
    b, L = input_ids.shape
    if attention_mask is None:
        pos = torch.arange(L, device=input_ids.device).view(1, 1, -1).expand(3, b, -1)
        return pos, torch.zeros(b, 1, dtype=torch.long, device=input_ids.device)
    mask = attention_mask.to(input_ids.device).long()
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    deltas = pos.max(-1, keepdim=True)[0] + 1 - L
    return pos.unsqueeze(0).expand(3, -1, -1), deltas


def _describe_mismatch(cfg, input_ids, valid, image_grid_thw, video_grid_thw) -> str:
    """The error message for placeholder/grid disagreement (only built when the check has failed)."""
    merge2 = cfg.vision.spatial_merge_size ** 2
    parts = []
    for name, grid, token_id in (("image", image_grid_thw, cfg.image_token_id),
                                 ("video", video_grid_thw, cfg.video_token_id)):
        have = int(((input_ids == token_id) & valid).sum())
        want = 0 if grid is None else int(torch.as_tensor(grid).long().reshape(-1, 3).prod(-1).sum()) // merge2
        parts.append(f"{have} <|{name}_pad|> tokens for {want} expected from {name}_grid_thw")
    return ("vision placeholders do not match the grids: " + "; ".join(parts)
            + " (each image/video needs grid_thw.prod() // 4 consecutive pad tokens in one row)")


# --- Vision tower metadata -------------------------------------------------------------------------------

@dataclass(frozen=True)
class VisionMeta:
    """Everything the vision tower needs besides weights and pixels, built once per batch.

    cos, sin: (N, head_dim) fp32 rotary tables in the order the tower runs (window order for Qwen2.5-VL);
    full: per-frame segments; window: 64-token windows (Qwen2.5-VL) or None; window_index: merged-unit
    permutation into window order and reverse_index its inverse (None without windows).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    full: VarlenMeta
    window: Optional[VarlenMeta]
    window_index: Optional[torch.Tensor]
    reverse_index: Optional[torch.Tensor]
    num_patches: int


def vision_metadata(cfg: ModelConfig, grid_thw, device) -> VisionMeta:
    """Build the tower's metadata from grid_thw (one host read of the small grid tensor per batch)."""
    grids = [tuple(int(x) for x in row) for row in torch.as_tensor(grid_thw).reshape(-1, 3).tolist()]
    v = cfg.vision
    for t, h, w in grids:
        if t <= 0 or h <= 0 or w <= 0 or h % v.spatial_merge_size or w % v.spatial_merge_size:
            raise InputError(f"grid_thw row {[t, h, w]} is invalid: t, h, w must be positive and h, w multiples "
                             f"of spatial_merge_size {v.spatial_merge_size}")
    units = v.window_units if v.uses_windows else 0
    device = _concrete(device)
    tables = [_device_rotary_table(v.head_dim, v.spatial_merge_size, units, *g, device) for g in grids]
    full_lengths = [h * w for t, h, w in grids for _ in range(t)]
    window = window_index = reverse = None
    if v.uses_windows:
        idx_parts, lengths, offset = [], [], 0
        for t, h, w in grids:
            order, sizes = _window_order(t, h // v.spatial_merge_size, w // v.spatial_merge_size, units)
            idx_parts.append(order + offset)
            lengths.extend(int(s) * v.merge_unit for s in sizes)
            offset += order.numel()
        window_index = torch.cat(idx_parts)
        window = VarlenMeta.from_lengths(lengths, device)
        reverse = torch.argsort(window_index).to(device)
        window_index = window_index.to(device)
    cos = torch.cat([c for c, _ in tables])  # a copy on the device: callers may write what they get
    sin = torch.cat([s for _, s in tables])
    return VisionMeta(cos=cos, sin=sin, full=VarlenMeta.from_lengths(full_lengths, device), window=window,
                      window_index=window_index, reverse_index=reverse, num_patches=cos.shape[0])


TABLE_CACHE_ENV = "QWEN2VL_FAST_TABLE_CACHE_MB"
TABLE_CACHE = ByteLRU(budget_env=TABLE_CACHE_ENV, default_mb=64)


def _concrete(device) -> torch.device:
    """`device` with its index: "cuda" is the current CUDA device, so a cached table is keyed by where it lives."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _device_rotary_table(head_dim: int, merge: int, window_units: int, t: int, h: int, w: int, device):
    """_rotary_table's (cos, sin) on `device`, kept there too (TABLE_CACHE). Why: uploading a 1344x896 image's
    tables (2 x 2 MB at head_dim 80, from pageable memory) is ~1 ms of host time in front of every ViT call, with
    the GPU idle; a cached copy costs one device-to-device copy (the `torch.cat` in vision_metadata)."""
    if device.type == "cpu":
        return _rotary_table(head_dim, merge, window_units, t, h, w)
    return _device_rotary_table_cached(head_dim, merge, window_units, t, h, w, device)


@byte_lru_cache(TABLE_CACHE)
def _device_rotary_table_cached(head_dim: int, merge: int, window_units: int, t: int, h: int, w: int, device):
    """The device copy of _rotary_table (not kept on the host as well: it is built and dropped there)."""
    cos, sin = _rotary_table.__wrapped__(head_dim, merge, window_units, t, h, w)
    return cos.to(device), sin.to(device)


@byte_lru_cache(TABLE_CACHE)
def _rotary_table(head_dim: int, merge: int, window_units: int, t: int, h: int, w: int):
    """cos, sin (t*h*w, head_dim) fp32 for one grid, in the order the tower runs its tokens: merge-group order,
    permuted window by window when `window_units` > 0 (windows never cross items, so the permutation of a
    batch is the per-item permutations placed side by side). Built once per (t, h, w) and kept in TABLE_CACHE."""
    angles = _rotary_angles(head_dim, merge, t, h, w)
    if window_units:
        unit = merge * merge
        order, _ = _window_order(t, h // merge, w // merge, window_units)
        angles = angles.view(-1, unit, angles.shape[-1])[order].reshape(-1, angles.shape[-1])
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def _rotary_angles(head_dim: int, merge: int, t: int, h: int, w: int) -> torch.Tensor:
    """(t*h*w, head_dim/2) fp32 angles [h * f_0..f_{k-1} | w * f_0..f_{k-1}] in merge-group token order.

    Built on the host in fp32 as transformers does (outer product of positions and inverse frequencies).
    Not cached: its only caller, `_rotary_table`, is, and a second copy would cost a fifth more bytes per grid."""
    dim = head_dim // 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    table = torch.outer(torch.arange(max(h, w), dtype=torch.float), inv_freq)
    hpos = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
    wpos = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
    # token order: (h/merge, w/merge, mh, mw)
    hpos, wpos = hpos.permute(0, 2, 1, 3).reshape(-1), wpos.permute(0, 2, 1, 3).reshape(-1)
    angles = torch.cat([table[hpos], table[wpos]], dim=-1)
    return angles.repeat(t, 1)


@byte_lru_cache(TABLE_CACHE)
def _window_order(t: int, lh: int, lw: int, units: int):
    """Merged units of a (t, lh, lw) grid reordered window by window.

    Windows are `units` x `units` merged units, laid from the top-left; those at the bottom/right border are
    cut short. Order: frame, window row, window column, then raster inside the window. Returns the unit
    permutation (t*lh*lw,) and the unit count of each non-empty window, in order.
    """
    nww = -(-lw // units)
    y = torch.arange(lh).view(-1, 1).expand(lh, lw)
    x = torch.arange(lw).view(1, -1).expand(lh, lw)
    window_id = (y // units) * nww + (x // units)
    key = window_id * units * units + (y % units) * units + (x % units)
    order = torch.argsort(key.reshape(-1))
    sizes = torch.bincount(window_id.reshape(-1))
    sizes = sizes[sizes > 0]
    frame = torch.arange(t).view(-1, 1) * (lh * lw)
    return (order.view(1, -1) + frame).reshape(-1), tuple(sizes.tolist()) * t
