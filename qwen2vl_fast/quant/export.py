"""Quantize a dense checkpoint into the published GPTQ or AWQ formats (`qwen2vl-fast quantize`).

The language model's linears (q/k/v/o, gate/up/down) are quantized; the vision tower, embeddings, norms,
biases and the LM head stay as they are (as Qwen's own GPTQ/AWQ releases). Methods:
- "rtn": round to nearest per group;
- "gptq": GPTQ with Hessians 2 X^T X of each linear's inputs, collected by running the dense model (torch
  backend) on calibration chats with images. All Hessians come from one dense pass (not layer by layer on
  the partly quantized model, which the GPTQ paper does): simpler, and it still uses the real input
  statistics. q/k/v share one Hessian (same input), as do gate/up.
The output follows the published formats exactly (tensor names, packing, config keys) so other tools read it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..align import mlp_weights
from ..checkpoint import checkpoint_files
from ..config import load_config
from ..errors import CheckpointError
from ..layout import canonical_hub_name
from .formats import to_awq, to_gptq
from .quantizer import HessianAccumulator, quantize_gptq, quantize_rtn

# hub linear -> the runtime weight whose input it shares (where its Hessian is collected)
_INPUT_OF = {"self_attn.q_proj": "self_attn.qkv_proj", "self_attn.k_proj": "self_attn.qkv_proj",
             "self_attn.v_proj": "self_attn.qkv_proj", "self_attn.o_proj": "self_attn.o_proj",
             "mlp.gate_proj": "mlp.gate_up_proj", "mlp.up_proj": "mlp.gate_up_proj", "mlp.down_proj": "mlp.down_proj"}


def _linear_of(name: str):
    """'model.layers.3.mlp.up_proj.weight' -> ('model.layers.3.', 'mlp.up_proj'), else None."""
    if not (name.startswith("model.layers.") and name.endswith(".weight")):
        return None
    head, _, rest = name[len("model.layers."):].partition(".")
    module = rest[: -len(".weight")]
    return (f"model.layers.{head}.", module) if module in _INPUT_OF else None


def default_calibration_chats(n: int = 4) -> list:
    from ..cli import _demo_picture

    texts = ["Describe this picture in detail.", "What colours do you see?", "Is there a circle? Where?",
             "Write a short caption."]
    return [[{"role": "user", "content": [{"type": "image", "image": _demo_picture(112 + 28 * i, 168 - 14 * i)},
                                          {"type": "text", "text": texts[i % len(texts)]}]}] for i in range(n)]


def calibration_hessians(model_dir, chats=None, device="cpu") -> dict:
    """{runtime linear name: Hessian over the checkpoint's input width} from running the dense model on
    calibration chats."""
    import qwen2vl_fast
    from ..processing.processor import Processor

    model = qwen2vl_fast.load(model_dir, device=device, dtype=torch.float32, backend="torch")
    processor = Processor.from_pretrained(model_dir)
    lm = model.language_model
    names = {id(w): n[: -len(".weight")] for n, w in model.weights.items()
             if n.startswith("model.layers.") and isinstance(w, torch.Tensor)}
    acc: dict = {}

    def recorder(fn):  # wraps a linear-like callable (x, w, ...) to accumulate x's Hessian per weight
        def wrapped(x, w, *rest):
            name = names.get(id(w))
            if name is not None:
                rows = x.reshape(-1, x.shape[-1])
                acc.setdefault(name, HessianAccumulator(x.shape[-1], device=x.device)).add(rows)
            return fn(x, w, *rest)
        return wrapped

    real_linear, real_swiglu = lm._linear, lm.ops.linear_swiglu
    lm._linear, lm.ops.linear_swiglu = recorder(real_linear), recorder(real_swiglu)  # gate/up runs fused
    try:
        for chat in chats or default_calibration_chats():
            model(**processor([chat], device=device))
    finally:
        lm._linear, lm.ops.linear_swiglu = real_linear, real_swiglu
    # The model runs with its MLPs zero-padded (align.py): down_proj's padded inputs are exactly zero, so its
    # Hessian cut to the checkpoint's width is the unpadded model's.
    widths = {mlp.down[: -len(".weight")]: mlp.width for mlp in mlp_weights(model.config)}
    return {name: _leading_block(a.hessian, widths.get(name, a.in_features)) for name, a in acc.items()}


def _leading_block(h: torch.Tensor, k: int) -> torch.Tensor:
    return h[:k, :k].contiguous()


def quantize_checkpoint(model_dir, out_dir, bits: int = 4, group_size: int = 128, fmt: str = "gptq",
                        method: str = "rtn", sym: bool = False, act_order: bool = False, chats=None,
                        device="cpu") -> Path:
    if fmt not in ("gptq", "awq"):
        raise CheckpointError(f"unknown output format {fmt!r}: gptq or awq")
    if method not in ("rtn", "gptq"):
        raise CheckpointError(f"unknown quantization method {method!r}: rtn or gptq")
    if fmt == "awq" and (bits != 4 or act_order):
        raise CheckpointError("the AWQ format stores 4-bit weights without act-order")
    cfg = load_config(model_dir)
    if "quantization_config" in cfg.raw:
        raise CheckpointError(f"{model_dir} is already quantized")
    hessians = calibration_hessians(model_dir, chats, device) if method == "gptq" else {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict = {}
    for file in checkpoint_files(model_dir):
        with safe_open(file, framework="pt") as f:
            for stored in f.keys():
                name = canonical_hub_name(stored)
                if cfg.text.tie_word_embeddings and name == "lm_head.weight":
                    continue
                t = f.get_tensor(stored)
                where = _linear_of(name)
                if where is None:
                    tensors[name] = t.contiguous()
                    continue
                prefix, module = where
                w = t.to(device, torch.float32)
                if method == "gptq":
                    h = hessians[prefix + _INPUT_OF[module]]
                    qw = quantize_gptq(w, h, bits, group_size, sym=sym, act_order=act_order)
                else:
                    qw = quantize_rtn(w, bits, group_size, sym=sym)
                packed = to_gptq(qw, version=1) if fmt == "gptq" else to_awq(qw)
                for suffix, value in packed.items():
                    tensors[f"{prefix}{module}.{suffix}"] = value.cpu().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    raw = dict(cfg.raw)
    raw["quantization_config"] = (
        {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym, "desc_act": act_order,
         "checkpoint_format": "gptq", "damp_percent": 0.01, "true_sequential": False}
        if fmt == "gptq" else
        {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True, "version": "gemm"})
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    for extra in os.listdir(model_dir):
        if extra.endswith((".json", ".txt", ".jinja")) and extra not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(os.path.join(model_dir, extra), out / extra)
    return out
