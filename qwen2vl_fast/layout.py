"""Tensor names and shapes: the hub's checkpoint layout and the fused layout the runtime uses.

`hub_tensor_shapes(cfg)` lists every tensor a released checkpoint stores, under the original (hub) names of
REFERENCE.md §7. The checkpoint loader checks files against it, the random-checkpoint writer writes exactly it.

`fused_tensor_shapes(cfg)` is what the model consumes after loading: the Conv3d patch embedding as a
(1280, 1176) GEMM weight, q/k/v fused into one projection, gate/up fused into one projection, the merger's
`mlp.0`/`mlp.2` renamed `fc1`/`fc2`, and `lm_head.weight` present even for tied checkpoints.
"""

from __future__ import annotations

from .config import QWEN2_VL, ModelConfig

# Key prefixes of the transformers >= 4.52 module tree, mapped back to the hub names (REFERENCE.md §7).
HUB_PREFIX_ALIASES = (
    ("model.visual.", "visual."),
    ("model.language_model.", "model."),
)


def canonical_hub_name(name: str) -> str:
    """Map a tensor name of either key scheme to the hub scheme (`visual.*`, `model.*`, `lm_head.*`)."""
    for new, old in HUB_PREFIX_ALIASES:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def hub_tensor_shapes(cfg: ModelConfig, include_lm_head: bool | None = None) -> dict[str, tuple]:
    """Every tensor of a checkpoint in hub naming, with its shape.

    `include_lm_head`: None lists `lm_head.weight` only for untied models (what the hub stores).
    """
    v, t = cfg.vision, cfg.text
    e, m = v.embed_dim, v.mlp_hidden_size
    out: dict[str, tuple] = {
        "visual.patch_embed.proj.weight": (e, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
    }
    qwen2 = v.family == QWEN2_VL
    for i in range(v.depth):
        p = f"visual.blocks.{i}."
        out[p + "norm1.weight"] = (e,)
        out[p + "norm2.weight"] = (e,)
        if qwen2:
            out[p + "norm1.bias"] = (e,)
            out[p + "norm2.bias"] = (e,)
        out[p + "attn.qkv.weight"] = (3 * e, e)
        out[p + "attn.qkv.bias"] = (3 * e,)
        out[p + "attn.proj.weight"] = (e, e)
        out[p + "attn.proj.bias"] = (e,)
        if qwen2:
            out[p + "mlp.fc1.weight"] = (m, e)
            out[p + "mlp.fc1.bias"] = (m,)
            out[p + "mlp.fc2.weight"] = (e, m)
            out[p + "mlp.fc2.bias"] = (e,)
        else:
            for proj in ("gate_proj", "up_proj"):
                out[p + f"mlp.{proj}.weight"] = (m, e)
                out[p + f"mlp.{proj}.bias"] = (m,)
            out[p + "mlp.down_proj.weight"] = (e, m)
            out[p + "mlp.down_proj.bias"] = (e,)
    mh = v.merger_hidden_size
    out["visual.merger.ln_q.weight"] = (e,)
    if qwen2:
        out["visual.merger.ln_q.bias"] = (e,)
    out["visual.merger.mlp.0.weight"] = (mh, mh)
    out["visual.merger.mlp.0.bias"] = (mh,)
    out["visual.merger.mlp.2.weight"] = (v.out_hidden_size, mh)
    out["visual.merger.mlp.2.bias"] = (v.out_hidden_size,)

    h, d = t.hidden_size, t.head_dim
    q, kv = t.num_attention_heads * d, t.num_key_value_heads * d
    out["model.embed_tokens.weight"] = (t.vocab_size, h)
    for i in range(t.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (q, h)
        out[p + "self_attn.q_proj.bias"] = (q,)
        out[p + "self_attn.k_proj.weight"] = (kv, h)
        out[p + "self_attn.k_proj.bias"] = (kv,)
        out[p + "self_attn.v_proj.weight"] = (kv, h)
        out[p + "self_attn.v_proj.bias"] = (kv,)
        out[p + "self_attn.o_proj.weight"] = (h, q)
        out[p + "mlp.gate_proj.weight"] = (t.intermediate_size, h)
        out[p + "mlp.up_proj.weight"] = (t.intermediate_size, h)
        out[p + "mlp.down_proj.weight"] = (h, t.intermediate_size)
    out["model.norm.weight"] = (h,)
    if include_lm_head or (include_lm_head is None and not t.tie_word_embeddings):
        out["lm_head.weight"] = (t.vocab_size, h)
    return out


# How the loader fuses hub tensors: fused name -> the hub names concatenated along dim 0, in order.
def fusion_plan(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    plan: dict[str, tuple[str, ...]] = {}
    if cfg.vision.family != QWEN2_VL:
        for i in range(cfg.vision.depth):
            p = f"visual.blocks.{i}.mlp."
            for kind in ("weight", "bias"):
                plan[p + f"gate_up_proj.{kind}"] = (p + f"gate_proj.{kind}", p + f"up_proj.{kind}")
    for i in range(cfg.text.num_hidden_layers):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            plan[p + f"self_attn.qkv_proj.{kind}"] = tuple(p + f"self_attn.{x}_proj.{kind}" for x in "qkv")
        plan[p + "mlp.gate_up_proj.weight"] = (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
    return plan


# Hub name -> fused-layout name for tensors that are only renamed (and, for the Conv3d, reshaped).
RENAMES = {
    "visual.patch_embed.proj.weight": "visual.patch_embed.weight",
    "visual.merger.mlp.0.weight": "visual.merger.fc1.weight",
    "visual.merger.mlp.0.bias": "visual.merger.fc1.bias",
    "visual.merger.mlp.2.weight": "visual.merger.fc2.weight",
    "visual.merger.mlp.2.bias": "visual.merger.fc2.bias",
}


def fused_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Every tensor the runtime model holds, with its shape (see the module docstring)."""
    hub = hub_tensor_shapes(cfg, include_lm_head=True)
    plan = fusion_plan(cfg)
    consumed = {name for parts in plan.values() for name in parts}
    out: dict[str, tuple] = {}
    for name, shape in hub.items():
        if name in consumed:
            continue
        if name == "visual.patch_embed.proj.weight":
            out[RENAMES[name]] = (shape[0], cfg.vision.patch_dim)
        else:
            out[RENAMES.get(name, name)] = shape
    for fused, parts in plan.items():
        rows = sum(hub[p][0] for p in parts)
        out[fused] = (rows,) + tuple(hub[parts[0]][1:])
    return out
