"""The instance-level forwards `patch` installs (vision tower, RMSNorms, decoder layers, their attention modules
and MLPs, M-RoPE tables), the fused weights it builds, the attention setting it changes, and how all of it is
undone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..errors import Qwen2VLFastError
from ..ops import OpTable
from .attention import ATTN_NAME, OPS_ATTR, PROBE_NAME, _probe_attention, attention_forward
from .fused import FUSED_ATTR, current, fuse_group, unfuse
from .layout import Plan, norm_eps


@dataclass
class State:
    args: tuple
    forwards: list  # (module, had instance forward, previous instance forward)
    configs: list  # (config, previous _attn_implementation)
    tagged: list  # modules given the OPS_ATTR attribute
    fused: list = None  # Fused groups (gate/up; q/k/v weights and biases), un-fused by undo


def _guard(params: Callable, original: Callable, on_grad: str, what: str):
    """Wrap a new forward: with gradients enabled on parameters that require them, raise or run `original`."""

    def decorate(fn):
        def forward(*args, **kwargs):
            # what autograd would track: parameters that require grad, or an input that does (a trainable module
            # upstream, e.g. an adapter added after patching)
            x = args[0] if args else kwargs.get("hidden_states")  # transformers passes it by name to attention
            tracked = params().requires_grad or (torch.is_tensor(x) and x.requires_grad)
            if tracked and torch.is_grad_enabled():
                if on_grad == "original":
                    return original(*args, **kwargs)
                raise Qwen2VLFastError(
                    f"{what} is patched by qwen2vl_fast for inference only, and was called with gradients enabled "
                    "on parameters that require them: wrap the call in torch.inference_mode() / torch.no_grad(), "
                    "call model.requires_grad_(False), patch with on_grad='original', or qwen2vl_fast.unpatch(model)")
            return fn(*args, **kwargs)

        forward.__wrapped__ = fn
        return forward

    return decorate


def _set_forward(module, new, state):
    had = "forward" in module.__dict__
    state.forwards.append((module, had, module.__dict__.get("forward")))
    module.forward = new


def apply(plan: Plan, ops: OpTable, on_grad: str, state: State, report):
    cfg = plan.cfg
    vis, text = plan.visual, plan.text

    # Vision tower: our VisionTower over a weights dict of the module's own parameters (views only), rebuilt per
    # call (attribute reads): `model.to(...)` and in-place weight edits are always seen.
    vis_original, output = vis.forward, plan.vision_output

    @_guard(lambda: vis.patch_embed.proj.weight, vis_original, on_grad, plan.vision_path)
    def vision_forward(hidden_states, grid_thw=None, **kwargs):
        from ..vision import VisionTower

        tower = VisionTower(cfg, _vision_weights(vis, cfg), ops)
        if output is None:
            return tower(hidden_states, grid_thw)
        merged, hidden = tower(hidden_states, grid_thw, return_hidden=True)
        return output(last_hidden_state=hidden, pooler_output=merged)

    _set_forward(vis, vision_forward, state)
    report.patched.append((plan.vision_path, "vision tower", "qwen2vl_fast VisionTower"))

    for norm in plan.norms:
        _set_forward(norm, _norm_forward(norm, norm_eps(norm), ops, on_grad), state)
    report.patched += [(_path(text, plan.text_path, n), "rms_norm", "ops.rms_norm") for n in plan.norms]

    # One fused weight per group, the modules' parameters re-pointed to views of it: one copy in memory.
    state.fused = []
    shared = _shared_parameters(plan.model)
    unfused = []
    for i, (attn, mlp) in enumerate(zip(plan.attns, plan.mlps)):
        for module, names, what in ((mlp, ("gate_proj", "up_proj"), "mlp"),
                                    (attn, ("q_proj", "k_proj", "v_proj"), "self_attn")):
            group = fuse_group(module, names, shared)
            state.fused.append(group)
            if group is None:
                unfused.append(f"{plan.text_path}.layers.{i}.{what}")
    if cfg.vision.uses_windows:  # Qwen2.5-VL's vision MLPs: gate/up (with biases) fused the same way
        for i, blk in enumerate(vis.blocks):
            group = fuse_group(blk.mlp, ("gate_proj", "up_proj"), shared)
            state.fused.append(group)
            if group is None:
                unfused.append(f"{plan.vision_path}.blocks.{i}.mlp")
    groups = sum(g is not None for g in state.fused)
    report.notes.append(f"{groups} fused weight groups (decoder q/k/v and gate/up" + (", vision gate/up" if
                        cfg.vision.uses_windows else "") + "): the modules' parameters are slices of them, one copy")
    if unfused:
        report.notes.append("not fused (a parameter tied to or sharing storage with another): " + ", ".join(unfused))
    for mlp in plan.mlps:
        _set_forward(mlp, _mlp_forward(mlp, ops, on_grad), state)
    report.patched += [(_path(text, plan.text_path, m), "mlp",
                        "ops.linear_swiglu (fused gate/up weight) + ops.linear" if m.__dict__.get(FUSED_ATTR)
                        else "ops.linear x3 + ops.silu_and_mul") for m in plan.mlps]
    for attn in plan.attns:
        _set_forward(attn, _attention_module_forward(attn, plan, ops, on_grad), state)
    how = ("ops.linear (fused q/k/v) + ops.apply_rotary + transformers' Cache.update + attention + ops.linear "
           "(o_proj)")
    report.patched += [(_path(text, plan.text_path, a), "attention module", how) for a in plan.attns]
    eps = cfg.text.rms_norm_eps
    for layer in plan.layers:
        _set_forward(layer, _layer_forward(layer, plan, eps, ops, on_grad), state)
    report.patched += [(_path(text, plan.text_path, layer), "decoder layer",
                        "ops.rms_norm, attention, ops.add_rms_norm (residual add + post-attention norm), mlp, add")
                       for layer in plan.layers]

    rot = text.rotary_emb
    _set_forward(rot, _rotary_forward(rot, cfg.text.mrope_section, ops, plan.rotary_rows), state)
    report.patched.append((plan.text_path + ".rotary_emb", "mrope tables", "ops.mrope_cos_sin"))

    for attn in plan.attns:
        setattr(attn, OPS_ATTR, (ops, on_grad))
        state.tagged.append(attn)
    for c in plan.configs:
        state.configs.append((c, c._attn_implementation))
        c._attn_implementation = ATTN_NAME
    how = f"AttentionInterface {ATTN_NAME!r}: ops.prefill_attention / ops.decode_attention / ops.causal_attention"
    report.patched += [(_path(text, plan.text_path, a), "attention", how) for a in plan.attns]


def _path(root, root_path, module) -> str:
    for name, m in root.named_modules():
        if m is module:
            return f"{root_path}.{name}" if name else root_path
    return root_path


def undo(state: State):
    for module, had, previous in reversed(state.forwards):
        if had:
            module.forward = previous
        else:
            module.__dict__.pop("forward", None)
    for c, previous in reversed(state.configs):
        c._attn_implementation = previous
    for m in state.tagged:
        m.__dict__.pop(OPS_ATTR, None)
    for group in state.fused or ():
        if group is not None:
            unfuse(group)
    state.forwards, state.configs, state.tagged, state.fused = [], [], [], []


def _shared_parameters(model) -> set:
    """ids of the parameters that are not one module's own storage: one Parameter under two names (tied), or
    two Parameters over one storage. Those are never re-pointed into a fused tensor."""
    count, storages, shared = {}, {}, set()
    for _, p in model.named_parameters(remove_duplicate=False):
        count[id(p)] = count.get(id(p), 0) + 1
    for p in {id(p): p for p in model.parameters()}.values():
        storages.setdefault((p.device, p.untyped_storage().data_ptr()), []).append(p)
    for group in storages.values():
        if len(group) > 1:
            shared.update(id(p) for p in group)
    return shared | {i for i, n in count.items() if n > 1}


def _vision_weights(vis, cfg: ModelConfig) -> dict:
    """The tower's parameters under the names VisionTower reads; the Conv3d weight as a (E, C*t*p*p) view."""
    v = cfg.vision
    conv_w = vis.patch_embed.proj.weight
    w = {"visual.patch_embed.weight": conv_w.view(conv_w.shape[0], -1)}
    for i, blk in enumerate(vis.blocks):
        p = f"visual.blocks.{i}."
        for n in ("norm1", "norm2"):
            norm = getattr(blk, n)
            w[p + n + ".weight"] = norm.weight
            if getattr(norm, "bias", None) is not None:
                w[p + n + ".bias"] = norm.bias
        for n in ("qkv", "proj"):
            lin = getattr(blk.attn, n)
            w[p + f"attn.{n}.weight"], w[p + f"attn.{n}.bias"] = lin.weight, lin.bias
        names = ("gate_proj", "up_proj", "down_proj") if v.uses_windows else ("fc1", "fc2")
        fused = current(blk.mlp) if v.uses_windows else None
        if fused is not None:  # Qwen2.5-VL: the fused [gate; up] weight, our SwiGLU GEMM
            w[p + "mlp.gate_up_proj.weight"], w[p + "mlp.gate_up_proj.bias"] = fused
            names = ("down_proj",)
        for n in names:
            lin = getattr(blk.mlp, n)
            w[p + f"mlp.{n}.weight"], w[p + f"mlp.{n}.bias"] = lin.weight, lin.bias
    m = vis.merger
    w["visual.merger.ln_q.weight"] = m.ln_q.weight
    if getattr(m.ln_q, "bias", None) is not None:
        w["visual.merger.ln_q.bias"] = m.ln_q.bias
    w["visual.merger.fc1.weight"], w["visual.merger.fc1.bias"] = m.mlp[0].weight, m.mlp[0].bias
    w["visual.merger.fc2.weight"], w["visual.merger.fc2.bias"] = m.mlp[2].weight, m.mlp[2].bias
    return w


def _norm_forward(norm, eps, ops, on_grad):
    @_guard(lambda: norm.weight, norm.forward, on_grad, "an RMSNorm")
    def forward(hidden_states):
        return ops.rms_norm(hidden_states, norm.weight, eps)

    return forward


def _mlp_forward(mlp, ops, on_grad):
    @_guard(lambda: mlp.down_proj.weight, mlp.forward, on_grad, "a decoder MLP")
    def forward(x):
        fused = current(mlp)
        if fused is not None:  # one GEMM on the fused [gate; up] weight, SwiGLU in its epilogue
            up = ops.linear_swiglu(x, fused[0], fused[1])
        else:  # gate and up are two tensors: two GEMMs, then our SwiGLU on their concatenated outputs
            gate = ops.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)
            up = ops.silu_and_mul(torch.cat([gate, ops.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)], dim=-1))
        return ops.linear(up, mlp.down_proj.weight, mlp.down_proj.bias)

    return forward


def _cache_of(cache, past_key_values, past_key_value):
    return cache if cache is not None else past_key_values if past_key_values is not None else past_key_value


def _attention_module_forward(attn, plan: Plan, ops, on_grad):
    """The decoder attention module: fused q/k/v GEMM, our rotation by the M-RoPE tables, transformers' own
    `Cache.update` (called as the installed version calls it), the registered attention function, o_proj."""
    t = plan.cfg.text
    hq, hkv, d = t.num_attention_heads, t.num_key_value_heads, t.head_dim
    split = (hq * d, hkv * d, hkv * d)
    update_args = plan.update_args

    @_guard(lambda: attn.q_proj.weight, attn.forward, on_grad, "a decoder attention")
    def forward(hidden_states, attention_mask=None, position_ids=None, cache=None, *, past_key_values=None,
                past_key_value=None, position_embeddings=None, cache_position=None, output_attentions=False,
                use_cache=False, **kwargs):
        cache = _cache_of(cache, past_key_values, past_key_value)
        b, L, _ = hidden_states.shape
        fused = current(attn)
        if fused is not None:
            q, k, v = ops.linear(hidden_states, fused[0], fused[1]).split(split, dim=-1)
        else:
            q, k, v = (ops.linear(hidden_states, m.weight, m.bias) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k, v = q.view(b, L, hq, d), k.view(b, L, hkv, d), v.view(b, L, hkv, d)
        cos, sin = position_embeddings
        # transformers 4's tables are (3, B, L, D), one row per M-RoPE axis; ours (rotary_emb is patched) are
        # already per section, the three rows one expanded tensor
        c, s = (cos[0], sin[0]) if cos.dim() == 4 else (cos, sin)
        q, k = ops.apply_rotary(q, k, c, s)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D), as transformers'
        if cache is not None:
            if update_args == "cache_kwargs":
                k, v = cache.update(k, v, attn.layer_idx, {"sin": sin, "cos": cos, "cache_position": cache_position})
            elif update_args == "kwargs":
                k, v = cache.update(k, v, attn.layer_idx, kwargs=kwargs)
            else:
                k, v = cache.update(k, v, attn.layer_idx)
        fn = _probe_attention if attn.config._attn_implementation == PROBE_NAME else attention_forward
        out, weights = fn(attn, q, k, v, attention_mask, dropout=attn.attention_dropout if attn.training else 0.0,
                          scaling=attn.scaling, sliding_window=None, position_ids=position_ids, **kwargs)
        return ops.linear(out.reshape(b, L, -1), attn.o_proj.weight, attn.o_proj.bias), weights

    return forward


def _layer_forward(layer, plan: Plan, eps, ops, on_grad):
    """The decoder layer: h = h + attn(norm(h)); h = h + mlp(norm(h)), the first add fused with the second norm
    (`ops.add_rms_norm`). Arguments and return value as the installed transformers' layer (a tuple in 4.x)."""
    cache_name, with_position, with_attentions = plan.cache_name, plan.cache_position, plan.output_attentions
    tuple_out = plan.layer_tuple
    post = layer.post_attention_layernorm

    @_guard(lambda: layer.self_attn.q_proj.weight, layer.forward, on_grad, "a decoder layer")
    def forward(hidden_states, attention_mask=None, position_ids=None, cache=None, *, past_key_values=None,
                past_key_value=None, use_cache=False, cache_position=None, position_embeddings=None,
                output_attentions=False, **kwargs):
        kwargs[cache_name] = _cache_of(cache, past_key_values, past_key_value)
        if with_position:
            kwargs["cache_position"] = cache_position
        if with_attentions:
            kwargs["output_attentions"] = output_attentions
        residual = hidden_states
        h = layer.input_layernorm(hidden_states)
        h, weights = layer.self_attn(hidden_states=h, attention_mask=attention_mask, position_ids=position_ids,
                                     use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        h, residual = ops.add_rms_norm(h, residual, post.weight, eps)
        out = residual + layer.mlp(h)
        if not tuple_out:
            return out
        return (out, weights) if output_attentions else (out,)

    return forward


def _rotary_forward(rot, section, ops, rows: bool):
    # No parameters, no gradient: nothing to guard. transformers 4 returns (3, B, L, D) tables and its attention
    # takes row i % 3 for section i; ours are already per section, so there the three rows are one expanded
    # tensor (no copy). transformers 5 returns the (B, L, D) per-section tables, as ours.
    @torch.no_grad()
    def forward(x, position_ids):
        position_ids = position_ids.expand(3, -1, -1) if position_ids.dim() == 3 else \
            position_ids.unsqueeze(0).expand(3, -1, -1)
        cos, sin = ops.mrope_cos_sin(position_ids, rot.inv_freq, section, x.dtype)
        if rows:
            return cos.unsqueeze(0).expand(3, -1, -1, -1), sin.unsqueeze(0).expand(3, -1, -1, -1)
        return cos, sin

    return forward
