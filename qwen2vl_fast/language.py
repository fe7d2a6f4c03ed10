"""The Qwen2 decoder with M-RoPE. Composes ops; holds no math of its own.

Each layer: h = h + o_proj(attn(rms(h))); h = h + down(silu(gate) * up)(rms(h)), with q/k/v biases, GQA and
the norm of the next sub-layer fused with the residual add (`add_rms_norm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import ModelConfig
from .ops import OpTable
from .parallel import GatheredInput
from .quant.weight import QuantizedParts


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    o_w: torch.Tensor
    post_norm: torch.Tensor
    # The MLP's width is the weights' own, never the config's: load() may have zero-padded it (align.py).
    gate_up_w: torch.Tensor
    down_w: torch.Tensor


class LanguageModel:
    def __init__(self, cfg: ModelConfig, weights: dict, ops: OpTable, tensor_parallel=None):
        """tensor_parallel: a `parallel.TensorParallel` when `weights` are one rank's shard (cfg is then the
        rank's config, `TensorParallel.local_config`): the embedding, o_proj, down_proj and the LM head then
        end in their collective; None: the whole model, no collective."""
        t = cfg.text
        self.t, self.ops, self.tp = t, ops, tensor_parallel
        self.embed_w = weights["model.embed_tokens.weight"]
        self.layers = []
        for i in range(t.num_hidden_layers):
            p = f"model.layers.{i}."
            self.layers.append(DecoderLayer(
                input_norm=weights[p + "input_layernorm.weight"],
                qkv_w=weights[p + "self_attn.qkv_proj.weight"], qkv_b=weights[p + "self_attn.qkv_proj.bias"],
                o_w=weights[p + "self_attn.o_proj.weight"],
                post_norm=weights[p + "post_attention_layernorm.weight"],
                gate_up_w=weights[p + "mlp.gate_up_proj.weight"], down_w=weights[p + "mlp.down_proj.weight"],
            ))
        self.norm_w = weights["model.norm.weight"]
        self.lm_head_w = weights["lm_head.weight"]
        self.dtype, self.device = self.embed_w.dtype, self.embed_w.device  # the embedding is never quantized
        dim = t.head_dim
        # inv_freq as transformers builds it: fp32, theta ** (arange(0, D, 2) / D)
        self.inv_freq = (1.0 / (t.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
                         ).to(self.device)
        self.scale = dim ** -0.5
        self.split = (t.num_attention_heads * dim, t.num_key_value_heads * dim, t.num_key_value_heads * dim)

    def _linear(self, x, w, b=None):
        """A dense linear, or a weight-only quantized one (qwen2vl_fast.quant.QuantizedWeight), or QuantizedParts
        (act-order parts with different permutations: one GEMM per part, concatenated along N)."""
        if isinstance(w, GatheredInput):  # tensor parallel, a quantized row split off the groups (parallel.py)
            x, w = w.input(x), w.weight
        if isinstance(w, torch.Tensor):
            return self.ops.linear(x, w, b)
        if isinstance(w, QuantizedParts):
            biases = b.split(w.splits) if b is not None else [None] * len(w.parts)
            return torch.cat([self.ops.quant_linear(x, p, pb) for p, pb in zip(w.parts, biases)], dim=-1)
        return self.ops.quant_linear(x, w, b)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is not None:  # vocab-parallel: this rank's rows, summed over the ranks
            return self.tp.embed(self.ops, input_ids, self.embed_w)
        return self.ops.embedding(input_ids, self.embed_w)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """After a row-parallel linear (o_proj, down_proj): the sum over the ranks; identity without them."""
        return x if self.tp is None else self.tp.all_reduce(x)

    def __call__(self, embeds: torch.Tensor, position_ids: torch.Tensor,
                 attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Cache-less forward (transformers' prefill): embeds (B, L, hidden), position_ids (3, B, L) ->
        final-normed hidden states (B, L, hidden)."""
        ops, t = self.ops, self.t
        b, L, _ = embeds.shape
        cos, sin = ops.mrope_cos_sin(position_ids, self.inv_freq, t.mrope_section, embeds.dtype)
        key_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()

        def attend(i, q, k, v):
            q, k = ops.apply_rotary(q, k, cos, sin)
            return ops.causal_attention(q, k, v, key_mask, self.scale)
        return self._layers(embeds, attend)

    def prefill(self, embeds: torch.Tensor, position_ids: torch.Tensor, meta, cache, slots: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        """A packed batch of prompts: embeds (T, hidden), M-RoPE ids (3, T), `meta` the prompts' boundaries;
        K/V of token i go to cache slot slots[i], position positions[i]. -> hidden (T, hidden)."""
        ops = self.ops
        cos, sin = ops.mrope_cos_sin(position_ids.unsqueeze(1), self.inv_freq, self.t.mrope_section, embeds.dtype)
        cos, sin = cos[0], sin[0]

        def attend(i, q, k, v):
            q, k = ops.rope_kv_write(q, k, v, cos, sin, cache.k[i], cache.v[i], slots, positions)
            return ops.prefill_attention(q, k, v, meta, self.scale)
        return self._layers(embeds, attend)

    def decode(self, embeds: torch.Tensor, rope_positions: torch.Tensor, cache, slots: torch.Tensor,
               lengths: torch.Tensor) -> torch.Tensor:
        """One new token per sequence: embeds (B, hidden), rope_positions (B,) (= cache position + rope delta,
        the same on all three M-RoPE axes), cache rows `slots`, `lengths` (B,) valid keys after this token's
        write (its cache position is lengths - 1). -> hidden (B, hidden). No host sync: graph-capturable."""
        ops = self.ops
        cos, sin = ops.mrope_cos_sin(rope_positions.view(1, 1, -1).expand(3, 1, -1), self.inv_freq,
                                     self.t.mrope_section, embeds.dtype)
        cos, sin = cos[0], sin[0]

        def attend(i, q, k, v):
            # rotary + cache write at lengths - 1 + attention: one op (one kernel launch on Triton)
            return ops.rope_decode_attention(q, k, v, cos, sin, cache.k[i], cache.v[i], slots, lengths, self.scale)
        return self._layers(embeds, attend)

    def _layers(self, embeds: torch.Tensor, attend) -> torch.Tensor:
        """The decoder stack over (..., hidden) activations; attend(layer, q, k, v) -> (..., Hq, D) does the
        rotary, the cache and the attention (each caller its own way)."""
        ops, t, eps = self.ops, self.t, self.t.rms_norm_eps
        lead = embeds.shape[:-1]
        residual = embeds
        h = ops.rms_norm(embeds, self.layers[0].input_norm, eps)
        for i, layer in enumerate(self.layers):
            qkv = self._linear(h, layer.qkv_w, layer.qkv_b)
            q, k, v = qkv.split(self.split, dim=-1)
            q = q.view(*lead, t.num_attention_heads, t.head_dim)
            k = k.view(*lead, t.num_key_value_heads, t.head_dim)
            v = v.view(*lead, t.num_key_value_heads, t.head_dim)
            attn = self._reduce(self._linear(attend(i, q, k, v).reshape(*lead, -1), layer.o_w))
            h, residual = ops.add_rms_norm(attn, residual, layer.post_norm, eps)
            if isinstance(layer.gate_up_w, torch.Tensor):
                up = ops.linear_swiglu(h, layer.gate_up_w, None)
            else:
                up = ops.silu_and_mul(self._linear(h, layer.gate_up_w))
            mlp = self._reduce(self._linear(up, layer.down_w))
            next_norm = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm_w
            h, residual = ops.add_rms_norm(mlp, residual, next_norm, eps)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self._linear(hidden, self.lm_head_w)
        return out if self.tp is None else self.tp.gather_logits(out)  # vocab-parallel: every rank gets all
