"""Ops of the generation path (references): M-RoPE fused with the KV-cache write, causal prefill attention
over a packed batch, decode attention over the cache.

KV cache layout, per layer: (max_batch, max_len, kv_heads, head_dim), one row per sequence slot. A token's K/V
go to [slot, position]; rows a CUDA graph pads with point at spare slots, so writing them is harmless.
"""

from __future__ import annotations

import torch

from .attention import VarlenMeta, sdpa_gqa
from .registry import reference
from .rotary import rotate_half


@reference("rope_kv_write")
def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor):
    """Rotate q (T, Hq, D) and k (T, Hkv, D) by cos/sin (T, D) (in the model dtype, as transformers), write the
    rotated k and v (T, Hkv, D) into k_cache/v_cache[slots[t], positions[t]]; returns the rotated (q, k).
    Decode passes cos/sin of plain positions (all three M-RoPE rows equal position + rope_delta)."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * c + rotate_half(q) * s
    k = k * c + rotate_half(k) * s
    k_cache[slots, positions] = k
    v_cache[slots, positions] = v
    return q, k


@reference("prefill_attention")
def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VarlenMeta, scale: float):
    """Causal GQA attention within each sequence of a packed batch. q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D);
    kv head g serves q heads g*r .. g*r + r - 1 (r = Hq / Hkv)."""
    out = torch.empty_like(q)
    start = 0
    for n in meta.lengths:
        sl = slice(start, start + n)
        # 4-D (1, H, n, D), never 3-D: 3-D inputs send SDPA to the math path and its n x n score matrix.
        qs, ks, vs = (t[sl].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out[sl] = sdpa_gqa(qs, ks, vs, is_causal=True, scale=scale)[0].transpose(0, 1)
        start += n
    return out


@reference("decode_attention")
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, scale: float):
    """One query per sequence against its cached keys. q (B, Hq, D); slots (B,) cache rows; lengths (B,) valid
    keys per row (the current token's included) -> (B, Hq, D). Softmax in fp32. No host sync: the whole cache
    row is read and masked, so shapes never depend on the lengths."""
    b, hq, d = q.shape
    k, v = k_cache[slots], v_cache[slots]  # (B, L, Hkv, D)
    hkv = k.shape[2]
    qg = q.view(b, hkv, hq // hkv, d).float()
    scores = torch.einsum("bgrd,blgd->bgrl", qg, k.float()) * scale
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < lengths.view(-1, 1)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.einsum("bgrl,blgd->bgrd", probs, v).reshape(b, hq, d)


@reference("rope_decode_attention")
def rope_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
                          scale: float):
    """A decode step's attention: rotate q (B, Hq, D) and the new k (B, Hkv, D), write k and v into the cache at
    position lengths - 1 of rows `slots`, attend over the lengths (B,) valid keys -> (B, Hq, D). Exactly
    rope_kv_write then decode_attention; writes k_cache / v_cache. Callers must not reuse q and k afterwards: the
    reference and the fused kernel leave them as they are, but `auto` may run the unfused candidate below, which
    rotates them in place (as rope_kv_write's kernel does)."""
    q, _ = rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slots, lengths - 1)
    return decode_attention(q, k_cache, v_cache, slots, lengths, scale)


# ------------------------------------------------------------------------------- fast implementations
from .registry import implementation, triton_auto_on, triton_runs_on  # noqa: E402


@implementation("prefill_attention", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def prefill_attention_triton(q, k, v, meta: VarlenMeta, scale: float):
    """Triton causal GQA prefill attention (kernels/llm_attention.py), imported on first call so importing the
    op layer never needs Triton."""
    from qwen2vl_fast.kernels.llm_attention import prefill_attention as launch

    return launch(q, k, v, meta, scale)


@implementation("decode_attention", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def decode_attention_triton(q, k_cache, v_cache, slots, lengths, scale: float):
    """Triton split-K (flash-decoding) attention over the KV cache (kernels/llm_attention.py); no host sync,
    CUDA-graph capturable."""
    from qwen2vl_fast.kernels.llm_attention import decode_attention as launch

    return launch(q, k_cache, v_cache, slots, lengths, scale)


# ------------------------------------------------------------------ rope_kv_write: Triton (kernels/mrope.py)
from .registry import implementation as _implementation  # noqa: E402
from .registry import triton_auto_on as _triton_auto_on, triton_runs_on as _triton_runs_on  # noqa: E402


@_implementation("rope_kv_write", "triton", runs_on=_triton_runs_on, auto_on=_triton_auto_on)
def rope_kv_write_triton(q, k, v, cos, sin, k_cache, v_cache, slots, positions):
    """Rotates q and k IN PLACE (they are views of the qkv projection output, never copied) and returns them;
    callers must not reuse the un-rotated q/k. Bit-identical to the reference; no host sync."""
    from qwen2vl_fast.kernels.mrope import rope_kv_write as launch

    return launch(q, k, v, cos, sin, k_cache, v_cache, slots, positions)


# ------------------------------------------------------ rope_decode_attention: Triton (kernels/llm_attention.py)
from .registry import variant as _variant  # noqa: E402


@_implementation("rope_decode_attention", "triton", runs_on=_triton_runs_on, auto_on=_triton_auto_on)
def rope_decode_attention_triton(q, k, v, cos, sin, k_cache, v_cache, slots, lengths, scale: float):
    """One launch per call: rotary of q and the new k, the cache write, flash-decoding and the split merge (last
    program of each group, ticket counters). q, k, v untouched; no host sync, CUDA-graph capturable."""
    from qwen2vl_fast.kernels.llm_attention import rope_decode_attention as launch

    return launch(q, k, v, cos, sin, k_cache, v_cache, slots, lengths, scale)


# A candidate of `auto` only: what the decoder ran before the fused kernel (rope_kv_write's Triton kernel, then the
# Triton split + reduce decode attention), so the one-launch kernel wins a shape only by being measured faster
# there. Like rope_kv_write's Triton implementation it rotates q and k IN PLACE (the decoder discards them; the
# dispatch clones them per timed call: dispatch.MUTATED_ARGS).
@_variant("rope_decode_attention", "triton-unfused", runs_on=_triton_runs_on, auto_on=_triton_auto_on)
def rope_decode_attention_unfused(q, k, v, cos, sin, k_cache, v_cache, slots, lengths, scale: float):
    # lengths - 1 is one more tiny kernel per layer than language.py used to run (once per step): ~1-2 us of
    # device time on this candidate's side of the race
    q, _ = rope_kv_write_triton(q, k, v, cos, sin, k_cache, v_cache, slots, lengths - 1)
    return decode_attention_triton(q, k_cache, v_cache, slots, lengths, scale)
