"""Attention (references): block-diagonal varlen attention for the ViT, causal GQA attention for the LLM.

Neither builds a dense S x S mask over the whole vision sequence: transformers <= 4.51 did, which is what
made large images allocate tens of GB (REFERENCE.md §8). The ViT reference batches segments of equal length
(a 64-token window, a frame) into one SDPA call each, so thousands of windows cost a handful of calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .registry import reference


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
        starts, by_len, pos = {}, {}, 0
        for n in self.lengths:
            by_len.setdefault(n, []).append(pos)
            pos += n
        return sorted(by_len.items())


@reference("varlen_attention")
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VarlenMeta, scale: float):
    """Non-causal attention within each segment of a packed sequence.

    q, k, v: (S, H, D) with S = sum(meta.lengths); returns (S, H, D). Softmax in fp32 where SDPA does it.
    """
    out = torch.empty_like(q)
    for length, starts in meta.groups():
        idx = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)).reshape(-1)
        n = len(starts)
        qs, ks, vs = (t.index_select(0, idx).view(n, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        out.index_copy_(0, idx, o.transpose(1, 2).reshape(n * length, *q.shape[1:]))
    return out


@reference("causal_attention")
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask, scale: float):
    """Causal GQA attention. q (B, L, Hq, D), k/v (B, L, Hkv, D); kv head g serves q heads g*r .. g*r + r-1.

    key_padding_mask: (B, L) bool, True for real tokens, or None. Padded query rows (left padding) attend to
    themselves only, so they stay finite; their outputs are never read.
    """
    b, L, hq, _ = q.shape
    rep = hq // k.shape[2]
    qt = q.transpose(1, 2)
    kt = k.transpose(1, 2).repeat_interleave(rep, dim=1)
    vt = v.transpose(1, 2).repeat_interleave(rep, dim=1)
    if key_padding_mask is None:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
    else:
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        mask = causal[None] & key_padding_mask[:, None, :].bool()
        mask = mask | torch.eye(L, dtype=torch.bool, device=q.device)[None]
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None], scale=scale)
    return o.transpose(1, 2)


# ------------------------------------------------------------------------------- fast implementations
from .registry import implementation, triton_auto_on, triton_runs_on  # noqa: E402


@implementation("varlen_attention", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def varlen_attention_triton(q, k, v, meta: VarlenMeta, scale: float):
    """Triton varlen attention (kernels/varlen_attention.py), imported on first call so importing the op layer
    never needs Triton."""
    from qwen2vl_fast.kernels.varlen_attention import varlen_attention as launch

    return launch(q, k, v, meta, scale)
