"""Drop-in for transformers: `patch(model)` runs a transformers Qwen2-VL / Qwen2.5-VL model on our ops.

The user keeps `from_pretrained`, the processor and `model.generate()`; `qwen2vl_fast.patch(model)` swaps the
model's compute, in place, on the model's own parameters (no second copy of any weight):

- the vision tower's forward runs our `VisionTower` (patch embedding as a GEMM on a view of the Conv3d weight,
  2D rotary, varlen/window attention, fused residual + norms, MLPs, the merger);
- each decoder layer's forward is ours: RMSNorm, the attention module (one GEMM on the fused q/k/v weight, our
  rotation by the M-RoPE tables, transformers' own `Cache.update` called as the installed version calls it, the
  attention function, o_proj), the residual add fused with the post-attention norm (`add_rms_norm`), the MLP
  (`linear_swiglu` on the fused gate/up weight), the second residual add;
- the fused weights (decoder q/k/v and gate/up, Qwen2.5-VL's vision gate/up) are built once and the modules'
  parameters re-pointed to slices of them (fused.py): one copy in memory, transformers' modules, `state_dict`,
  `save_pretrained`, `load_state_dict` and `.to()` keep working; tied or storage-sharing parameters stay unfused;
- the attention function is registered with transformers' `AttentionInterface` (and SDPA-style masks with
  `AttentionMaskInterface`) under "qwen2vl_fast" and the text config's attention implementation set to it:
  unmasked prefill runs our prefill kernel, unmasked decode our decode kernel, masked steps (left padding, every
  StaticCache step) our causal attention with the mask's key mask, or the valid tokens packed for the prefill
  kernel (attention.py); only a masked multi-token step inside a torch.compile trace, or a mask of another form,
  runs SDPA with the mask;
- the final RMSNorm and the M-RoPE tables are instance-level forwards too.

Modules are found by structure (a vision tower is what has a Conv3d patch embedding, blocks and a merger; a
decoder is what has embed_tokens, layers, norm and rotary_emb; ...), never by class name, and every part is
checked before anything changes: a layout we do not know raises `Qwen2VLFastError` naming what is missing,
nothing is half patched. After patching, a short probe (a few tokens through the decoder without a cache, a
left-padded pair with a DynamicCache for a prefill and a step, a small grid through the vision tower) compares
against transformers' own forwards and undoes the patch if they disagree, so a
transformers release that changes the math under unchanged module names is refused rather than run wrongly.

Inference only: a patched forward called with gradients enabled on parameters that require them raises
(`on_grad="raise"`, the default) or runs transformers' original forward for that call (`on_grad="original"`).
`unpatch(model)` puts every original forward and attention setting back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ModelConfig, parse_config
from ..errors import Qwen2VLFastError
from ..ops import resolve
from .attention import ATTN_NAME, attention_forward, register_attention
from .forwards import State, apply, undo
from .layout import Plan, tf_version
from .probes import check_probes, run_probes

__all__ = ["ATTN_NAME", "PatchReport", "attention_forward", "is_patched", "patch", "unpatch"]

_STATE = "_qwen2vl_fast_state"
SUPPORTED = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
ON_GRAD = ("raise", "original")


@dataclass
class PatchReport:
    """What `patch` did: `patched` rows are (module path, part, what runs now); `ops` the op table's choice per
    op used; `notes` what stays transformers' own."""

    model_class: str
    transformers_version: str
    backend: str
    patched: list = field(default_factory=list)
    ops: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def parts(self) -> set:
        return {part for _, part, _ in self.patched}

    def __str__(self) -> str:
        counts: dict = {}
        for _, part, how in self.patched:
            counts.setdefault((part, how), 0)
            counts[(part, how)] += 1
        head = f"qwen2vl_fast patch of {self.model_class} (transformers {self.transformers_version}, "
        lines = [head + f"backend {self.backend!r}):"]
        lines += [f"  {n} x {part}: {how}" for (part, how), n in counts.items()]
        lines += ["  ops: " + ", ".join(f"{k}={v}" for k, v in sorted(self.ops.items()))]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def patch(model, backend: str = "auto", dispatch: str = "measure", on_grad: str = "raise", verify: bool = True):
    """Run `model` (transformers Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration) on
    qwen2vl_fast's ops, in place; returns the model. `backend`, `dispatch`: as `qwen2vl_fast.load`.
    `on_grad`: "raise" (default) or "original" (run transformers' forward) when called with gradients enabled on
    parameters that require them. `verify`: compare a short probe with transformers' own forwards and refuse
    (undo, raise) on disagreement. Patching again with the same arguments does nothing; with others, re-patches.
    The report is `model.qwen2vl_fast_report`."""
    _check_class(model)
    if on_grad not in ON_GRAD:
        raise Qwen2VLFastError(f"on_grad must be one of {ON_GRAD}, got {on_grad!r}")
    args = (backend, dispatch, on_grad)
    state = getattr(model, _STATE, None)
    if state is not None:
        if state.args == args:
            return model
        unpatch(model)
    device = _placement(model)
    cfg = _model_config(model)
    plan = Plan(model, cfg)  # every structural check, before anything changes
    ops = resolve(backend, device, plan.cfg, dispatch=dispatch)
    register_attention()
    probes = run_probes(model, plan, verify)  # also what the tower and the rotary return here
    state = State(args=args, forwards=[], configs=[], tagged=[])
    report = PatchReport(type(model).__name__, tf_version(), ops.backend)
    try:
        apply(plan, ops, on_grad, state, report)
        setattr(model, _STATE, state)
        if verify:
            check_probes(model, plan, probes)
    except BaseException:
        undo(state)
        if getattr(model, _STATE, None) is state:
            delattr(model, _STATE)
        raise
    used = ("patch_embed", "vision_rotary", "varlen_attention", "layer_norm", "add_layer_norm", "rms_norm",
            "add_rms_norm", "linear", "linear_act", "linear_swiglu", "silu_and_mul", "merger", "mrope_cos_sin",
            "apply_rotary", "prefill_attention", "decode_attention", "causal_attention")
    report.ops = {name: ops.chosen[name] for name in used if name in ops.chosen}
    report.notes += [
        "stay transformers': the token embedding, lm_head, the KV cache (its own Cache.update), the masks",
        ("masked attention steps (left padding, every StaticCache step) run ops.causal_attention, whose only "
         "implementation so far is the PyTorch reference (SDPA with the key mask), except a masked prefill from an "
         "empty cache: its real tokens packed for ops.prefill_attention"),
        ("attention with a mask of L > 1 queries inside a torch.compile trace, or with a mask that is not 'causal "
         "+ key mask' (e.g. packed sequences), runs torch SDPA with that mask (transformers' 'sdpa' math)"),
        ("each decoder layer's second residual add is a plain add (fusing it into the next layer's input norm "
         "would carry the residual across layers, which transformers' layer loop does not do)"),
        "the vision tower records no per-block hidden states or attentions (transformers 5's output capture)",
    ]
    model.qwen2vl_fast_report = report
    return model


def unpatch(model):
    """Undo `patch`: transformers' original forwards and attention settings, bit-identical behaviour. A model
    that is not patched is returned unchanged."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    undo(state)
    delattr(model, _STATE)
    if "qwen2vl_fast_report" in model.__dict__:
        del model.__dict__["qwen2vl_fast_report"]
    return model


def is_patched(model) -> bool:
    return getattr(model, _STATE, None) is not None


def _check_class(model):
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is what is being patched
        raise Qwen2VLFastError("qwen2vl_fast.patch needs transformers installed") from None
    classes = tuple(getattr(transformers, name) for name in SUPPORTED if hasattr(transformers, name))
    if not isinstance(model, classes):
        raise Qwen2VLFastError(f"qwen2vl_fast.patch supports {' and '.join(SUPPORTED)} (transformers); got "
                               f"{type(model).__module__}.{type(model).__name__}")


def _placement(model):
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        raise Qwen2VLFastError(f"patch needs all parameters on one device; found {sorted(map(str, devices))} "
                               "(models split with device_map or offloaded are not supported)")
    if any(getattr(m, "_hf_hook", None) is not None for m in model.modules()):
        raise Qwen2VLFastError("patch does not support models with accelerate hooks (device_map / offload)")
    return next(iter(devices))


def _model_config(model) -> ModelConfig:
    raw = model.config.to_dict()
    return parse_config(raw)
