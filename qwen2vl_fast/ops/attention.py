"""Attention (references): block-diagonal varlen attention for the ViT, causal GQA attention for the LLM.

Neither builds a dense S x S mask over the whole vision sequence: transformers <= 4.51 did, which is what
made large images allocate tens of GB (REFERENCE.md §8). The ViT reference batches segments of equal length
(a 64-token window, a frame) into one SDPA call each, so thousands of windows cost a handful of calls.

Every reference here (and in decoding.py) runs in memory linear in the sequence, on the CPU as on the GPU:
SDPA gets 4-D (batch, heads, seq, dim) inputs and no explicit mask where it can (3-D inputs or a dense mask
send it to the math path, which builds the full score matrix: 5.8 GiB for 12k tokens of the tiny model);
where a mask is unavoidable (padded batches) the queries go in blocks, so mask and scores are O(seq * block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .registry import reference

# SDPA takes `enable_gqa` from torch 2.5. Only on the CPU do we use it: there the fused (flash) kernel serves
# GQA with and without a mask; on CUDA only the flash backend does, so fp32 or masked calls would fall back
# to the math path, and expanding k/v (memory linear in the sequence) is the cheaper side of that trade.
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
# Elements of the (batch, query block, keys) mask a padded causal call builds per block: 4M (16 MB as float).
MASK_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class VarlenMeta:
    """Segment boundaries of a packed sequence, built once per batch on the host.

    cu_seqlens: int32 (n + 1,) on the device, what kernels read; lengths: the same on the host, so the
    reference never syncs; max_seqlen: the longest segment (kernels size their grid with it).
    """

    cu_seqlens: torch.Tensor
    lengths: tuple
    max_seqlen: int

    @staticmethod
    def from_lengths(lengths, device) -> "VarlenMeta":
        lengths = tuple(int(x) for x in lengths if int(x) > 0)
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        return VarlenMeta(torch.tensor(cu, dtype=torch.int32, device=device), lengths, max(lengths, default=0))

    def groups(self):
        """(length, starts) for each distinct segment length: starts is a host list of offsets."""
        by_len, pos = {}, 0
        for n in self.lengths:
            by_len.setdefault(n, []).append(pos)
            pos += n
        return sorted(by_len.items())


def gqa_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """GQA for SDPA: q (B, Hq, L, D), k/v (B, Hkv, S, D), kv head g serving q heads g*r .. g*r + r - 1.
    -> (k, v, extra SDPA kwargs): k/v as they are with enable_gqa, or expanded to Hq heads."""
    rep = q.shape[1] // k.shape[1]
    if rep == 1:
        return k, v, {}
    if _SDPA_GQA and q.device.type == "cpu":
        return k, v, {"enable_gqa": True}
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), {}


def sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """SDPA with GQA (shapes as gqa_kv). 4-D inputs, so the fused kernels apply (CPU flash included) and no
    score matrix is materialised."""
    k, v, extra = gqa_kv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, **kwargs, **extra)


@reference("varlen_attention")
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VarlenMeta, scale: float):
    """Non-causal attention within each segment of a packed sequence.

    q, k, v: (S, H, D) with S = sum(meta.lengths); returns (S, H, D). Softmax in fp32 where SDPA does it.
    """
    groups = meta.groups()
    if len(groups) == 1 and q.shape[0]:
        # One length covering the whole sequence (one image's full-attention layer): SDPA's fused kernels write
        # (B, L, H, D) memory, so the run's output is returned as a view, with no copy into an (S, H, D) `out`
        # (a 16 MB round trip per ViT layer at 1344x896).
        length, starts = groups[0]
        return _sdpa_run(q, k, v, 0, len(starts), length, scale)
    out = torch.empty_like(q)
    for length, starts in groups:
        n = len(starts)
        if starts[-1] - starts[0] == (n - 1) * length:  # one contiguous run (a full-attention layer, a grid of
            # equal windows): views, no gather; this is as fast as SDPA on the segments themselves
            out[starts[0]:starts[0] + n * length] = _sdpa_run(q, k, v, starts[0], n, length, scale)
            continue
        idx = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)).reshape(-1)
        qs, ks, vs = (t.index_select(0, idx).view(n, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        out.index_copy_(0, idx, o.transpose(1, 2).reshape(n * length, *q.shape[1:]))
    return out


def _sdpa_run(q, k, v, start: int, n: int, length: int, scale: float) -> torch.Tensor:
    """SDPA over n back-to-back segments of `length` rows from `start`, on views of q, k, v: (n * length, H, D)."""
    span = slice(start, start + n * length)
    qs, ks, vs = (t[span].view(n, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
    return o.transpose(1, 2).reshape(n * length, *q.shape[1:])


@reference("causal_attention")
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask, scale: float):
    """Causal GQA attention. q (B, L, Hq, D), k/v (B, S, Hkv, D) with S >= L: the queries are the last L
    positions of the keys (S == L: self-attention over the sequence; S > L: new tokens after S - L cached ones);
    kv head g serves q heads g*r .. g*r + r-1.

    key_padding_mask: (B, S) bool, True for real tokens, or None. A query row that would see no real key (a
    left-padding row) attends to itself only, so it stays finite; such outputs are never read. (Keys past the
    real ones, e.g. a StaticCache's empty slots, are simply masked: a row that sees real keys sees only those.)
    """
    b, L = q.shape[:2]
    S = k.shape[1]
    off = S - L
    if off < 0:
        raise ValueError(f"causal_attention: {L} queries after {S} keys (the queries are the last keys)")
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if key_padding_mask is None and off == 0:
        return sdpa_gqa(qt, kt, vt, is_causal=True, scale=scale).transpose(1, 2)
    # An explicit mask: query blocks [i0, i1) against keys [0, off + i1) (the causal prefix), so the mask, and the
    # scores where SDPA has no fused kernel for it, take O(L * block) memory instead of O(L^2).
    kt, vt, extra = gqa_kv(qt, kt, vt)  # expand (where needed) once, not per block
    out = torch.empty_like(q)
    keep = None if key_padding_mask is None else key_padding_mask.bool()
    block = max(64, MASK_BLOCK_ELEMENTS // max(1, b * S))
    pos = torch.arange(S, device=q.device)
    for i0 in range(0, L, block):
        i1 = min(L, i0 + block)
        rows, cols = pos[off + i0:off + i1, None], pos[None, :off + i1]
        mask = (cols <= rows)[None]
        if keep is not None:
            mask = mask & keep[:, None, :off + i1]
            mask = mask | ((cols == rows)[None] & ~mask.any(-1, keepdim=True))
        o = F.scaled_dot_product_attention(qt[:, :, i0:i1], kt[:, :, :off + i1], vt[:, :, :off + i1],
                                           attn_mask=mask[:, None], scale=scale, **extra)
        out[:, i0:i1] = o.transpose(1, 2)
    return out


# ------------------------------------------------------------------------------- fast implementations
from .registry import implementation, triton_auto_on, triton_runs_on, variant  # noqa: E402


@implementation("varlen_attention", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def varlen_attention_triton(q, k, v, meta: VarlenMeta, scale: float):
    """Triton varlen attention (kernels/varlen_attention.py), imported on first call so importing the op layer
    never needs Triton."""
    from qwen2vl_fast.kernels.varlen_attention import varlen_attention as launch

    return launch(q, k, v, meta, scale)


def _varlen_attention_variant(name: str):
    """The Triton kernel with its LONG_VARIANTS[name] launch configuration (long 16-bit segments), which `auto`
    races against the default configuration and SDPA at the call's shape."""
    def run(q, k, v, meta: VarlenMeta, scale: float):
        from qwen2vl_fast.kernels.varlen_attention import varlen_attention as launch

        return launch(q, k, v, meta, scale, variant=name)

    run.__name__ = run.__qualname__ = f"varlen_attention_triton_{name}"
    return variant("varlen_attention", f"triton-{name}", runs_on=triton_runs_on, auto_on=triton_auto_on)(run)


varlen_attention_triton_n128 = _varlen_attention_variant("n128")
varlen_attention_triton_2cta = _varlen_attention_variant("2cta")
