"""Fused projection weights without a second copy: the q/k/v (and gate/up) weights of a decoder layer are
concatenated once into one tensor, and the modules' own parameters re-pointed (`param.data = view`) to slices of
it, so memory holds one copy, transformers' modules, `state_dict()` and `save_pretrained` still see their
weights, and our forwards run one GEMM on the whole tensor.

What can separate the parameters from the fused tensor is handled: `model.to(...)` / `.half()` / `.cuda()` (each
fused module's `_apply` is wrapped to fuse again after the conversion), and a parameter replaced or re-pointed
by hand (every eager call checks that the parameters still are the fused tensor's slices and fuses again if
not; inside a torch.compile trace the check is skipped). In-place edits (`load_state_dict`, `copy_`) write
into the fused tensor itself. `unfuse` gives every parameter its own storage back."""

from __future__ import annotations

import torch

FUSED_ATTR = "_qwen2vl_fast_fused"


class Fused:
    """One module's fused weight (and bias) over the linears `names` (e.g. q_proj, k_proj, v_proj)."""

    def __init__(self, module, names):
        self.module, self.names = module, tuple(names)
        self.weight = self.bias = None

    def linears(self):
        return [getattr(self.module, n) for n in self.names]

    def params(self):
        lins = self.linears()
        return [lin.weight for lin in lins] + [lin.bias for lin in lins if lin.bias is not None]

    def valid(self) -> bool:
        """The parameters are still the slices of our fused tensors (same storage, offsets, dtype, device)."""
        w = self.weight
        if w is None:
            return False
        offset = 0
        for lin in self.linears():
            p = lin.weight
            if p.dtype != w.dtype or p.device != w.device or p.data_ptr() != w.data_ptr() + offset * w.element_size():
                return False
            offset += p.numel()
        if self.bias is not None:
            offset, b = 0, self.bias
            for lin in self.linears():
                p = lin.bias
                if p is None or p.dtype != b.dtype or p.data_ptr() != b.data_ptr() + offset * b.element_size():
                    return False
                offset += p.numel()
        return True

    @torch.no_grad()
    def fuse(self):
        """Concatenate the parameters' current values and re-point the parameters to slices of the result."""
        with torch.inference_mode(False):
            lins = self.linears()
            sizes = [lin.weight.shape[0] for lin in lins]
            weight = torch.cat([lin.weight.detach() for lin in lins], 0)
            for lin, part in zip(lins, weight.split(sizes, 0)):
                lin.weight.data = part
            bias = None
            if all(lin.bias is not None for lin in lins):
                bias = torch.cat([lin.bias.detach() for lin in lins], 0)
                for lin, part in zip(lins, bias.split(sizes, 0)):
                    lin.bias.data = part
        self.weight, self.bias = weight, bias

    @torch.no_grad()
    def unfuse(self):
        with torch.inference_mode(False):
            for p in self.params():
                p.data = p.data.clone()
        self.weight = self.bias = None


def fuse_group(module, names, shared: set):
    """Fuse `module`'s linears `names` in place; None (nothing changed) where that is not safe: a parameter tied to
    or sharing storage with another (`shared`: their ids), biases on some linears only, mixed dtypes or devices,
    different input widths."""
    lins = [getattr(module, n) for n in names]
    params = [lin.weight for lin in lins] + [lin.bias for lin in lins if lin.bias is not None]
    has_bias = [lin.bias is not None for lin in lins]
    if (any(id(p) in shared for p in params) or (any(has_bias) and not all(has_bias))
            or len({(p.dtype, p.device) for p in params}) != 1 or len({lin.weight.shape[1] for lin in lins}) != 1):
        return None
    group = Fused(module, names)
    group.fuse()
    module.__dict__[FUSED_ATTR] = group
    cls_apply = type(module)._apply

    def _apply(fn, *args, **kwargs):  # model.to(...) and friends: convert, then fuse the converted values again
        out = cls_apply(module, fn, *args, **kwargs)
        if module.__dict__.get(FUSED_ATTR) is group and not group.valid():  # a no-op conversion keeps the slices
            group.fuse()
        return out

    module._apply = _apply
    return group


def current(module):
    """(weight, bias) of `module`'s fused projection, fused again first if its parameters were re-pointed since;
    None for a module that is not fused."""
    group = module.__dict__.get(FUSED_ATTR)
    if group is None:
        return None
    if not torch.compiler.is_compiling() and not group.valid():
        group.fuse()
    return group.weight, group.bias


def unfuse(group: Fused):
    """Every parameter back on its own storage (bit-identical values), the module's `_apply` its class's."""
    module = group.module
    if module.__dict__.get(FUSED_ATTR) is group:
        del module.__dict__[FUSED_ATTR]
        module.__dict__.pop("_apply", None)
    group.unfuse()
