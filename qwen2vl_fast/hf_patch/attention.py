"""The decoder's attention as a transformers `AttentionInterface` function ("qwen2vl_fast"), with SDPA-style
masks registered for it in `AttentionMaskInterface`."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..errors import Qwen2VLFastError
from ..ops import VarlenMeta
from ..ops.attention import gqa_kv
from .layout import LayoutError, tf_version

ATTN_NAME = "qwen2vl_fast"
PROBE_NAME = "qwen2vl_fast_probe"
OPS_ATTR = "_qwen2vl_fast_ops"


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """The "qwen2vl_fast" AttentionInterface function. query (B, Hq, L, D), key/value (B, Hkv, S, D) (the cache's
    keys included), attention_mask an SDPA-style boolean (B, 1, L, S') mask (S' >= S) or None -> ((B, L, Hq, D),
    None). Every case runs one of our ops:

    - no mask: L == 1 a decode step over all S keys (`ops.decode_attention`); L > 1 a causal prefill over the
      first L keys (`ops.prefill_attention` over the batch's rows; L < S is transformers 5's StaticCache prefill
      from an empty cache, whose mask it skips for SDPA's top-left is_causal);
    - a mask and L == 1 (a decode step with left padding, every StaticCache step): the mask's row is a key mask,
      `ops.causal_attention` with the query after all S keys (no causality left to apply): no shape depends on
      the data, so it compiles;
    - a mask and L > 1 (a left-padded prefill, a StaticCache prefill): keys cut to the last one the mask lets any
      query see (S_eff), the mask checked to be exactly "causal, queries at the end of the S_eff keys, and a key
      mask"; with S_eff == L the valid tokens are packed for `ops.prefill_attention`, else
      `ops.causal_attention`. This needs the host (S_eff, the check): inside a torch.compile trace, and for a mask
      of any other form, SDPA with the mask runs instead (transformers' "sdpa" path; counted in PATHS)."""
    ctx = getattr(module, OPS_ATTR, None)
    if ctx is None:
        raise Qwen2VLFastError(f"attention implementation {ATTN_NAME!r} is set on a model that qwen2vl_fast.patch "
                               "did not patch; use qwen2vl_fast.patch(model)")
    ops, on_grad = ctx
    grad = torch.is_grad_enabled() and (query.requires_grad or module.q_proj.weight.requires_grad)
    if grad or dropout:  # training: transformers' SDPA (dropout in train mode), or the inference-only error
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if grad and on_grad != "original":
            raise Qwen2VLFastError(
                "decoder attention is patched by qwen2vl_fast for inference only, and was called with gradients "
                "enabled: wrap the call in torch.inference_mode() / torch.no_grad(), call model.requires_grad_(False), "
                "patch with on_grad='original', or qwen2vl_fast.unpatch(model)")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    b, hq, L, d = query.shape
    S = key.shape[2]
    scale = float(scaling) if scaling is not None else d ** -0.5
    causal = True if is_causal is None else bool(is_causal)
    if attention_mask is None and L == 1:
        _count("decode")
        lengths = torch.full((b,), S, dtype=torch.int32, device=query.device)
        slots = torch.arange(b, dtype=torch.int32, device=query.device)
        out = ops.decode_attention(query[:, :, 0], key.transpose(1, 2), value.transpose(1, 2), slots, lengths, scale)
        return out.unsqueeze(1), None
    if attention_mask is None and L <= S and causal:
        # L < S without a mask: transformers 5 skips the mask of a StaticCache prefill from an empty cache and its
        # SDPA runs is_causal (top-left: the queries are the first L keys; the rest are empty slots)
        _count("prefill")
        q, k, v = (t[:, :, :L].transpose(1, 2).reshape(b * L, t.shape[1], d) for t in (query, key, value))
        out = ops.prefill_attention(q, k, v, VarlenMeta.from_lengths([L] * b, query.device), scale)
        return out.view(b, L, hq, d), None
    mask = attention_mask
    if (mask is not None and causal and mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1
            and mask.shape[2] == L and mask.shape[-1] >= S):
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if L == 1:
            _count("masked decode")
            return ops.causal_attention(q, k, v, mask[:, 0, 0, :S].expand(b, S), scale), None
        if not torch.compiler.is_compiling():
            out = _masked_prefill(ops, q, k, v, mask, scale)
            if out is not None:
                return out, None
    _count("sdpa")
    return _masked_attention(query, key, value, attention_mask, scale, causal), None


def _masked_prefill(ops, q, k, v, mask, scale):
    """L > 1 queries (B, L, H, D) after keys (B, S, Hkv, D) under a boolean (B, 1, L, S' >= S) mask, on our ops
    when the mask is "causal with the queries ending at key S_eff - 1, and a key mask" on every query row that is
    itself a real token (other rows are padding: their outputs are never read); None for any other mask."""
    b, L, hq, d = q.shape
    layout = _mask_layout(mask, b, L, k.shape[1])
    if layout is None:
        return None
    s_eff, keys, idx, meta = layout
    k, v = k[:, :s_eff], v[:, :s_eff]
    if idx is not None:  # a prefill from an empty cache: the real tokens of each row, packed, causal among themselves
        _count("masked prefill, packed")
        qp, kp, vp = (t.reshape(b * L, t.shape[2], d).index_select(0, idx) for t in (q, k, v))
        out = q.new_zeros(b * L, hq, d)
        out.index_copy_(0, idx, ops.prefill_attention(qp, kp, vp, meta, scale))
        return out.view(b, L, hq, d)
    _count("masked prefill")
    return ops.causal_attention(q, k, v, keys, scale)


_LAYOUT = [None, None, None]  # the mask tensor last seen, (B, L, S), its layout: a forward's layers share one mask


def _mask_layout(mask, b, L, S):
    """(S_eff, key mask (B, S_eff), packed token index or None, VarlenMeta or None) of a (B, 1, L, S') boolean mask
    of the form above (its first S keys), else None; computed once per mask tensor (host syncs), reused by the
    following layers."""
    if _LAYOUT[0] is not None and _LAYOUT[0]() is mask and _LAYOUT[1] == (b, L, S):
        return _LAYOUT[2]
    layout = _layout_of(mask[:, 0, :, :S].expand(b, L, S), L)
    _LAYOUT[:] = [weakref.ref(mask), (b, L, S), layout]  # weak: the mask is freed with its forward
    return layout


def _layout_of(mask, L):
    keys = mask[:, -1, :]  # what the last query sees: every real key up to it
    seen = keys.any(0).nonzero()
    if seen.numel() == 0:
        return None
    s_eff = int(seen[-1]) + 1
    if s_eff < L:
        return None
    keys = keys[:, :s_eff]
    own = keys[:, s_eff - L:]  # (B, L): query rows that are real tokens
    pos = torch.arange(s_eff, device=mask.device)
    expected = (pos[None, :] <= pos[s_eff - L:, None])[None] & keys[:, None, :]
    ok = ((mask[:, :, :s_eff] == expected) | ~own[:, :, None]).all()
    if mask.shape[-1] > s_eff:
        ok = ok & (~mask[:, :, s_eff:] | ~own[:, :, None]).all()
    if not bool(ok):
        return None
    if s_eff != L:
        return s_eff, keys, None, None
    idx = own.reshape(-1).nonzero()[:, 0]
    return s_eff, keys, idx, VarlenMeta.from_lengths(own.sum(1).tolist(), mask.device)


def _masked_attention(query, key, value, mask, scale, causal=True):
    """SDPA with an explicit mask (boolean: True attends; float: added to the scores), as transformers' "sdpa"."""
    if mask is not None:
        mask = mask[:, :, :, : key.shape[-2]]
    k, v, extra = gqa_kv(query, key, value)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale,
                                         is_causal=causal and mask is None and query.shape[2] > 1, **extra)
    return out.transpose(1, 2).contiguous()


PATHS: dict = {}  # which of the paths above ran, and how often (eager calls only: a compiled step counts once)


def _count(path):
    if not torch.compiler.is_compiling():
        PATHS[path] = PATHS.get(path, 0) + 1


PROBE_CALLS = []  # attention modules that ran under PROBE_NAME (the probe checks every layer's attention ran)


def _probe_attention(module, *args, **kwargs):
    PROBE_CALLS.append(module)
    return attention_forward(module, *args, **kwargs)


def register_attention():
    from transformers import AttentionInterface

    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        raise LayoutError(f"transformers {tf_version()} has no masking_utils.AttentionMaskInterface: the decoder's "
                          "masks cannot be built for a custom attention function") from None
    AttentionInterface.register(ATTN_NAME, attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    AttentionInterface.register(PROBE_NAME, _probe_attention)
    AttentionMaskInterface.register(PROBE_NAME, sdpa_mask)
