"""Finding and checking what `patch` replaces, by structure: the vision tower is the module with a Conv3d patch
embedding, blocks and a merger; the decoder the one with embed_tokens, layers, norm and rotary_emb; each block,
layer, norm and linear is checked for the shapes and kinds our ops assume. Class names are never consulted, so a
renamed class still patches and a changed layout is refused, naming what is missing."""

from __future__ import annotations

import dataclasses
import inspect
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import Qwen2VLFastError


def tf_version() -> str:
    import transformers

    return transformers.__version__


class LayoutError(Qwen2VLFastError):
    """The model's module layout is not one `patch` knows (a part is missing, of another kind or shape)."""


def need(cond, what):
    if not cond:
        raise LayoutError(f"qwen2vl_fast.patch does not know this module layout (transformers {tf_version()}): "
                          f"{what}")


def _linear(m) -> bool:
    """A dense nn.Linear (quantized or wrapped linears are refused)."""
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward and m.weight.is_floating_point()


def norm_eps(m) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(m, name, None)
        if isinstance(value, float):
            return value
    return None


def _rms_norm(m, width) -> bool:
    """A weight-only (RMS) norm of `width`: a (width,) weight, no bias, an epsilon."""
    w = getattr(m, "weight", None)
    return (isinstance(w, torch.Tensor) and tuple(w.shape) == (width,) and getattr(m, "bias", None) is None
            and norm_eps(m) is not None and not list(m.children()))


def _layer_norm(m, width) -> bool:
    return (isinstance(m, nn.LayerNorm) and type(m).forward is nn.LayerNorm.forward
            and tuple(m.normalized_shape) == (width,) and m.bias is not None)


def _is_silu(fn) -> bool:
    """The activation computes SiLU (checked on values: its class is renamed between versions)."""
    if not callable(fn):
        return False
    x = torch.linspace(-6, 6, 25)
    with torch.no_grad():
        return torch.allclose(fn(x), F.silu(x))


def _is_vision_tower(m) -> bool:
    pe = getattr(m, "patch_embed", None)
    return (isinstance(getattr(pe, "proj", None), nn.Conv3d) and isinstance(getattr(m, "blocks", None), nn.ModuleList)
            and hasattr(getattr(m, "merger", None), "ln_q"))


def _is_decoder(m) -> bool:
    return (isinstance(getattr(m, "embed_tokens", None), nn.Embedding)
            and isinstance(getattr(m, "layers", None), nn.ModuleList) and hasattr(m, "norm")
            and hasattr(m, "rotary_emb"))


def _find_one(model, pred, what):
    found = [(name, m) for name, m in model.named_modules() if pred(m)]
    need(len(found) == 1, f"expected one {what}, found {len(found)} ({[n for n, _ in found]})")
    return found[0]


class Plan:
    """The modules to patch, found by structure and checked against the config."""

    def __init__(self, model, cfg: ModelConfig):
        v, t = cfg.vision, cfg.text
        self.model = model
        self.vision_path, self.visual = _find_one(model, _is_vision_tower, "vision tower (patch_embed.proj Conv3d, "
                                                  "blocks, merger.ln_q)")
        self.text_path, self.text = _find_one(model, _is_decoder, "decoder (embed_tokens, layers, norm, rotary_emb)")
        vis, text = self.visual, self.text
        # --- vision tower
        conv = vis.patch_embed.proj
        need(conv.bias is None and tuple(conv.kernel_size) == tuple(conv.stride)
             and tuple(conv.weight.shape) == (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size,
                                              v.patch_size), f"patch embedding {tuple(conv.weight.shape)}")
        need(len(vis.blocks) == v.depth, f"{len(vis.blocks)} vision blocks for depth {v.depth}")
        eps = set()
        gated = v.uses_windows
        for i, blk in enumerate(vis.blocks):
            where = f"{self.vision_path}.blocks.{i}"
            for n in ("norm1", "norm2"):
                norm = getattr(blk, n, None)
                ok = _rms_norm(norm, v.embed_dim) if gated else _layer_norm(norm, v.embed_dim)
                need(ok, f"{where}.{n} is not a {'RMS' if gated else 'Layer'}Norm of width {v.embed_dim}")
                eps.add(norm_eps(norm))
            attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
            need(_linear(getattr(attn, "qkv", None)) and attn.qkv.weight.shape == (3 * v.embed_dim, v.embed_dim)
                 and attn.qkv.bias is not None and _linear(getattr(attn, "proj", None))
                 and attn.proj.bias is not None, f"{where}.attn needs qkv and proj linears with biases")
            names = ("gate_proj", "up_proj", "down_proj") if gated else ("fc1", "fc2")
            need(all(_linear(getattr(mlp, n, None)) and getattr(mlp, n).bias is not None for n in names),
                 f"{where}.mlp needs linears {names} with biases")
        merger = vis.merger
        mlp = getattr(merger, "mlp", None)
        ok_ln = _rms_norm(merger.ln_q, v.embed_dim) if gated else _layer_norm(merger.ln_q, v.embed_dim)
        need(ok_ln and isinstance(mlp, nn.Sequential) and len(mlp) == 3 and _linear(mlp[0]) and _linear(mlp[2])
             and isinstance(mlp[1], nn.GELU) and mlp[1].approximate == "none",
             f"{self.vision_path}.merger needs ln_q and mlp = Sequential(Linear, GELU, Linear)")
        eps.add(norm_eps(merger.ln_q))
        need(len(eps) == 1, f"vision norms with different epsilons {sorted(eps)}")
        vision_eps = eps.pop()
        # --- decoder
        need(len(text.layers) == t.num_hidden_layers, f"{len(text.layers)} decoder layers for {t.num_hidden_layers}")
        need(_rms_norm(text.norm, t.hidden_size), f"{self.text_path}.norm is not an RMSNorm of {t.hidden_size}")
        rot = text.rotary_emb
        inv = getattr(rot, "inv_freq", None)
        need(isinstance(inv, torch.Tensor) and inv.shape == (t.head_dim // 2,),
             f"{self.text_path}.rotary_emb has no inv_freq of {t.head_dim // 2} frequencies")
        need(getattr(rot, "rope_type", "default") in ("default", "mrope")
             and float(getattr(rot, "attention_scaling", 1.0)) == 1.0,
             f"rotary type {getattr(rot, 'rope_type', None)!r} (only plain M-RoPE is implemented)")
        self.norms, self.mlps, self.attns, self.layers = [text.norm], [], [], []
        text_eps = {norm_eps(text.norm)}
        for i, layer in enumerate(text.layers):
            where = f"{self.text_path}.layers.{i}"
            for n in ("input_layernorm", "post_attention_layernorm"):
                norm = getattr(layer, n, None)
                need(_rms_norm(norm, t.hidden_size), f"{where}.{n} is not an RMSNorm of width {t.hidden_size}")
                self.norms.append(norm)
                text_eps.add(norm_eps(norm))
            mlp, attn = getattr(layer, "mlp", None), getattr(layer, "self_attn", None)
            need(all(_linear(getattr(mlp, n, None)) for n in ("gate_proj", "up_proj", "down_proj"))
                 and _is_silu(getattr(mlp, "act_fn", None)),
                 f"{where}.mlp needs dense gate_proj, up_proj, down_proj linears and a SiLU act_fn")
            self.mlps.append(mlp)
            need(all(_linear(getattr(attn, n, None)) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
                 and hasattr(attn, "config") and isinstance(getattr(attn, "scaling", None), float)
                 and getattr(attn, "layer_idx", None) == i, f"{where}.self_attn needs q/k/v/o linears, config, "
                 "scaling and layer_idx")
            need(getattr(attn, "sliding_window", None) is None, f"{where}.self_attn uses a sliding window")
            source = inspect.getsource(type(attn).forward)
            need("ALL_ATTENTION_FUNCTIONS" in source and "_attn_implementation" in source,
                 f"{where}.self_attn does not dispatch through transformers' AttentionInterface")
            self.attns.append(attn)
            self.layers.append(layer)
        self._calling_conventions()
        need(len(text_eps) == 1, f"decoder norms with different epsilons {sorted(text_eps)}")
        self.cfg = cfg.replace(vision=_replace(v, norm_eps=vision_eps), text=_replace(t, rms_norm_eps=text_eps.pop()))
        # The configs whose attention implementation selects the decoder's attention and masks.
        configs = [model.config.get_text_config(decoder=True), text.config] + [a.config for a in self.attns]
        self.configs = list({id(c): c for c in configs}.values())
        need(all(hasattr(c, "_attn_implementation") for c in self.configs), "configs without _attn_implementation")


    def _calling_conventions(self):
        """How the installed transformers calls a decoder layer and its attention, and how the attention updates
        the cache (our forwards of both do the same): the cache argument's name (`past_key_values` in 4.x and
        5.x before 5.24, `cache` after), whether `cache_position` / `output_attentions` are passed on, and the
        arguments of `Cache.update` after the layer index (4.x: a dict of sin, cos and cache_position; 5.x
        before 5.24: none; 5.24: `kwargs=kwargs`)."""
        layer, attn = self.layers[0], self.attns[0]
        tparams = inspect.signature(type(self.text).forward).parameters
        need(sum(n in tparams for n in ("cache", "past_key_values")) == 1,
             f"{self.text_path} forward without one cache argument: {list(tparams)}")
        self.text_cache_name = "cache" if "cache" in tparams else "past_key_values"
        lparams = inspect.signature(type(layer).forward).parameters
        aparams = inspect.signature(type(attn).forward).parameters
        names = [n for n in ("cache", "past_key_values") if n in lparams and n in aparams]
        need(len(names) == 1, "decoder layer / attention forwards without one cache argument (cache or "
             f"past_key_values): {list(lparams)}, {list(aparams)}")
        self.cache_name = names[0]
        need("position_embeddings" in aparams and "position_embeddings" in lparams,
             "decoder layer / attention forwards without position_embeddings")
        self.cache_position = "cache_position" in aparams and "cache_position" in lparams
        self.output_attentions = "output_attentions" in lparams
        source = inspect.getsource(type(attn).forward)
        calls = re.findall(r"\.update\(\s*key_states\s*,\s*value_states\s*,\s*self\.layer_idx\s*(?:,\s*([^)]*?))?\s*\)",
                           source)
        need(len(calls) == 1, f"{self.text_path} attention: no single cache.update(key_states, value_states, "
             "self.layer_idx, ...) call")
        tail = calls[0].strip().rstrip(",").strip()
        known = {"": "none", "cache_kwargs": "cache_kwargs", "kwargs=kwargs": "kwargs"}
        need(tail in known, f"{self.text_path} attention: cache.update(..., {tail}) is not a call we know")
        self.update_args = known[tail]
        if self.update_args == "cache_kwargs":
            need(re.search(r"cache_kwargs\s*=\s*\{\s*\"sin\"\s*:\s*sin\s*,\s*\"cos\"\s*:\s*cos\s*,\s*"
                           r"\"cache_position\"\s*:\s*cache_position\s*\}", source) is not None,
                 f"{self.text_path} attention: cache_kwargs of another form")
        lsource = inspect.getsource(type(layer).forward)
        need(all(w in lsource for w in ("input_layernorm", "post_attention_layernorm", "residual + hidden_states")),
             f"{self.text_path} decoder layer: not the pre-norm residual form (input_layernorm, attention, "
             "residual add, post_attention_layernorm, mlp, residual add)")


def _replace(obj, **changes):
    return dataclasses.replace(obj, **changes)
