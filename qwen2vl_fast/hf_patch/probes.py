"""The probe `patch` runs: transformers' own forwards and the patched ones on a few tokens and a small grid, and
the output formats of the installed version (what the vision tower and the rotary embedding return)."""

from __future__ import annotations

import torch

from .attention import PROBE_CALLS, PROBE_NAME
from .layout import LayoutError, Plan, need

# Probe tolerances (relative L2 of the outputs): catch a changed formula, not rounding.
_PROBE_RTOL = {torch.float32: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.1}


def _probe_inputs(plan: Plan, device):
    v, dtype = plan.cfg.vision, plan.visual.patch_embed.proj.weight.dtype
    gen = torch.Generator().manual_seed(0)
    m = v.spatial_merge_size
    # 4 x 6 merged units: crosses Qwen2.5-VL's window border (windows of window_units merged units)
    grid = torch.tensor([[1, 4 * m, 6 * m]])
    pixels = torch.randn(int(grid.prod()), v.patch_dim, generator=gen).to(device, dtype)
    ids = torch.randint(0, min(plan.cfg.text.vocab_size, 1000), (2, 8), generator=gen).to(device)
    return grid.to(device), pixels, ids


def _text_probe(plan: Plan, ids):
    """The decoder on the probe tokens three ways: without a cache (row 0, 7 tokens); with a DynamicCache, row 1
    left-padded by 2, a 7-token prefill and a 1-token step (the cache update, the masked prefill and decode
    paths). -> the three outputs, padding positions zeroed."""
    from transformers import DynamicCache

    text = plan.text
    plain = text(input_ids=ids[:1, :7], use_cache=False)[0]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    cache = DynamicCache()
    kw = {plan.text_cache_name: cache}
    first = text(input_ids=ids[:, :7], attention_mask=mask[:, :7], use_cache=True, **kw)[0]
    step = text(input_ids=ids[:, 7:], attention_mask=mask, use_cache=True, **kw)[0]
    return plain, first * mask[:, :7, None], step


@torch.no_grad()
def run_probes(model, plan: Plan, verify: bool):
    """transformers' own outputs on the probe inputs (the decoder's only with `verify`). Sets the output formats
    of the plan: the tower's (a tensor in 4.x; a ModelOutput with pooler_output in 5.x), the rotary's
    (3, B, L, D) per-axis tables (4.x) or (B, L, D) tables already per section (5.x), and the decoder layers'
    (a tuple in 4.x, a tensor in 5.x)."""
    device = next(model.parameters()).device
    grid, pixels, ids = _probe_inputs(plan, device)
    out = plan.visual(pixels, grid_thw=grid)
    plan.vision_output = None if isinstance(out, torch.Tensor) else type(out)
    need(plan.vision_output is None or isinstance(getattr(out, "pooler_output", None), torch.Tensor),
         f"the vision tower returns {type(out).__name__} without pooler_output")
    vision = _as_tensor(out)
    t = plan.cfg.text
    cos, _ = plan.text.rotary_emb(torch.zeros(1, dtype=plan.text.embed_tokens.weight.dtype, device=device),
                                  torch.arange(4, device=device).view(1, 1, 4).expand(3, 1, 4))
    need(tuple(cos.shape) in ((3, 1, 4, t.head_dim), (1, 4, t.head_dim)),
         f"rotary tables of shape {tuple(cos.shape)} (expected (3, B, L, {t.head_dim}) or (B, L, {t.head_dim}))")
    plan.rotary_rows = cos.dim() == 4
    seen = []
    hook = plan.layers[0].register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        if verify:
            text = _text_probe(plan, ids)
        else:  # only the layers' output format
            text = None
            plan.text(input_ids=ids[:1, :3], use_cache=False)
    finally:
        hook.remove()
    need(isinstance(seen[0], (tuple, torch.Tensor)), f"decoder layers return {type(seen[0]).__name__}")
    plan.layer_tuple = isinstance(seen[0], tuple)  # transformers 4: (hidden_states, ...); 5: hidden_states
    return vision, text


@torch.no_grad()
def check_probes(model, plan: Plan, expected):
    device = next(model.parameters()).device
    grid, pixels, ids = _probe_inputs(plan, device)
    vision = _as_tensor(plan.visual(pixels, grid_thw=grid))
    _agree(vision, expected[0], _PROBE_RTOL.get(pixels.dtype, 0.1), "the vision tower")
    saved = [(c, c._attn_implementation) for c in plan.configs]
    PROBE_CALLS.clear()
    try:
        for c in plan.configs:
            c._attn_implementation = PROBE_NAME
        text = _text_probe(plan, ids)
    finally:
        for c, name in saved:
            c._attn_implementation = name
    called = {id(m) for m in PROBE_CALLS}
    PROBE_CALLS.clear()
    missing = [i for i, a in enumerate(plan.attns) if id(a) not in called]
    need(not missing, f"decoder layers {missing} never called the registered attention function")
    for ours, ref, what in zip(text, expected[1], ("", " with a cache and padding", " (a cached decode step)")):
        _agree(ours, ref, _PROBE_RTOL.get(ours.dtype, 0.1), "the decoder" + what)


def _as_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    for name in ("pooler_output", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise LayoutError(f"unexpected vision tower output {type(out).__name__}")


def _agree(ours, ref, tol, what):
    need(ours.shape == ref.shape, f"{what}: patched output shape {tuple(ours.shape)} != {tuple(ref.shape)}")
    err = float((ours.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
    need(err <= tol, f"{what}: patched output differs from transformers' by {err:.2e} (relative; allowed {tol:g})")
