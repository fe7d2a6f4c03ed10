"""Measured dispatch: with backend="auto", an op that has more than one implementation able to run on the device
(the PyTorch reference - cuBLAS, SDPA - our Triton kernels, our CUDA C++ kernels) runs whichever was fastest *at
this shape on this device*, as measured here, never a choice made by assumption.

- A call's **shape key** names what its speed depends on: dtype, the bucketed token count (next power of two,
  so a prompt of 1,000 tokens and one of 1,020 share a measurement) and the widths (N and K of a linear exactly;
  for other ops every dim but the last bucketed too, so no call-to-call size makes a key of its own).
- **Measuring** (mode "measure"): the first call with a new shape key times every candidate on that call's own
  arguments (`timing.time_call`: same method for all, L2 flushed between repetitions), records the winner and
  the times in the tuning cache (`tuning_cache.py`, persistent across processes) and returns the winner's
  result. The engine's warm-up and `qwen2vl-fast tune` are such calls; so is the first call of each new shape.
  Nothing is measured while a CUDA graph is being captured (the capture records the winner's kernels).
- **Before any measurement** a shape key runs the op's untuned default: the PyTorch reference for the GEMM family
  (cuBLAS is the strongest general GEMM we know of until a measurement says otherwise), the first of cuda,
  triton, torch for the rest. Mode "cached" never measures (cache hits and defaults only); mode "default"
  ignores the cache.
- Ties go to the default: a candidate must be more than `TIE` faster to replace it, so timing noise does not
  flip a choice between two equal implementations.
- **Checked before timed**: each candidate's result on the call's own arguments is compared with the PyTorch
  reference's (relative Frobenius error within `AGREE[dtype]`, no non-finite value where the reference has
  none). A candidate that disagrees cannot win, whatever its speed, and one warning names it: a kernel that has
  never run on this GPU (a new architecture, a compiler change) is verified where it runs before it is used.

The choice is never hidden: `OpTable.dispatch_report()` and `qwen2vl-fast ops` list every measured shape
with the winner and every candidate's time.
"""

from __future__ import annotations

import inspect
import logging
from typing import Callable, Optional

import torch

from .timing import _fresh_args, time_call
from .tuning_cache import TuningCache, fingerprint

MODES = ("measure", "cached", "default")
TIE = 0.02  # a challenger must beat the default by more than 2% (timing noise on a quiet GPU is ~1%)

# Arguments an implementation writes in place and that must be fresh for every timed repetition. Ops that write
# the KV cache write the same values at the same slots every time (idempotent) and need no copy.
MUTATED_ARGS = {"vision_rotary": (0,), "rope_decode_attention": (0, 1)}  # its unfused candidate rotates q, k in place
# How far a candidate's floating-point result may be from the reference's (||a - ref|| / ||ref||): different
# accumulation orders (split-K, tensor cores, TF32 for fp32 GEMMs) stay well inside; a wrong kernel is O(1) off.
AGREE = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}
log = logging.getLogger("qwen2vl_fast.dispatch")


def bucket(n: int) -> int:
    """The power of two at or above n (1 for n <= 1): token counts are measured per bucket."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _dt(x: torch.Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else x.numel()


def _linear_key(x, w, b=None, act=None) -> str:
    act = "" if act in (None, "none") else f" {act}"
    return f"{_dt(x)} M{bucket(_rows(x))} N{w.shape[0]} K{w.shape[1]}{' bias' if b is not None else ''}{act}"


def _quant_linear_key(x, w, b=None) -> str:
    return (f"{_dt(x)} M{bucket(_rows(x))} N{w.out_features} K{w.in_features} int{w.bits} "
            f"g{w.group_size}{' perm' if w.perm is not None else ''}{' bias' if b is not None else ''}")


def _numel_key(x, *rest) -> str:
    """Ops whose first argument's size varies in its last dim (position ids (3, B, L), frames (T, C, H, W)):
    bucket the element count, keep the other arguments' shapes."""
    return f"{_dt(x)} n{bucket(x.numel())} " + _generic_key(*rest)


def _part(a) -> str:
    if isinstance(a, torch.Tensor):
        if a.dim() == 0:
            return "scalar"
        # every dim but the last (a width: exact) bucketed: token counts vary from call to call, and which dim
        # holds them differs between ops ((S, H, D), (B, L, E), (3, B, L) ...), so none may stay exact
        return "x".join([*(str(bucket(d)) for d in a.shape[:-1]), str(a.shape[-1])])
    if a is None or isinstance(a, (bool, int, float, str)):
        return repr(a)
    if isinstance(a, torch.dtype):
        return str(a).removeprefix("torch.")
    if isinstance(a, (tuple, list)) and len(a) <= 8:
        return repr(tuple(a))
    if hasattr(a, "max_seqlen"):  # VarlenMeta: attention cost grows with the segment length
        return f"seg{bucket(a.max_seqlen)}"
    return type(a).__name__


def _generic_key(*args) -> str:
    """The first tensor's dtype, bucketed rows and width; the other arguments' shapes with every dim but the last
    bucketed (see _part), scalars and options as they are."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is None:
        return " ".join(_part(a) for a in args)
    parts = [f"{_dt(first)} rows{bucket(_rows(first))}x{first.shape[-1] if first.dim() else 1}"]
    parts += [_part(a) for a in args if a is not first]
    return " ".join(parts)


SHAPE_KEYS: dict = {"linear": _linear_key, "linear_act": _linear_key, "linear_swiglu": _linear_key,
                    "patch_embed": _linear_key, "quant_linear": _quant_linear_key,
                    "mrope_cos_sin": _numel_key, "patch_embed_frames": _numel_key}


def shape_key(op: str, args: tuple) -> str:
    return SHAPE_KEYS.get(op, _generic_key)(*args)


class Dispatch:
    """The per-model state of measured dispatch: mode, the environment's tuning cache, the timer."""

    def __init__(self, device, mode: str = "measure", cache_path=None, timer: Optional[Callable] = None):
        if mode not in MODES:
            raise ValueError(f"dispatch mode must be one of {MODES}, got {mode!r}")
        self.device, self.mode = torch.device(device), mode
        self.cache = TuningCache(cache_path, fingerprint(self.device))
        if mode == "default":
            self.cache.entries = {}
        self.timer = timer or self._time_on_device
        self.ops: dict = {}  # op name -> MeasuredOp

    def _time_on_device(self, op: str, backend: str, fn: Callable, args: tuple) -> float:
        return time_call(fn, args, self.device, MUTATED_ARGS.get(op, ()))

    def can_measure(self) -> bool:
        # Never inside a torch.compile trace (transformers' compiled static-cache decode step under hf_patch): the
        # trace takes the shape's known winner or the default.
        if self.mode != "measure" or torch.compiler.is_compiling():
            return False
        return not (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing())

    def measure(self, op: "MeasuredOp", key: str, args: tuple) -> str:
        """Time every candidate of `op` on `args`; record and return the winner. A candidate that raises on these
        arguments cannot win; if the default raises, its error is the call's error (e.g. a bad input)."""
        times = {}
        mutated = MUTATED_ARGS.get(op.name, ())
        reference = op.fns.get("torch")
        expected = None
        if reference is not None:
            try:
                expected = _floats(reference(*_fresh_args(args, mutated)))
            except Exception:  # the reference's own error surfaces below if it is the default
                expected = None
        for backend, fn in op.fns.items():
            try:
                if expected and fn is not reference:
                    why = _disagreement(_floats(fn(*_fresh_args(args, mutated))), expected)
                    if why is not None:
                        if backend == op.default:
                            raise RuntimeError(f"{op.name}: the default {backend!r} disagrees with the reference "
                                               f"at {key} ({why})")
                        log.warning("%s: candidate %r disagrees with the PyTorch reference at %s (%s); it is not "
                                    "used for this shape", op.name, backend, key, why)
                        times[backend] = None
                        continue
                times[backend] = float(self.timer(op.name, backend, fn, args))
            except Exception:
                if backend == op.default:
                    raise
                times[backend] = None
        winner = choose(times, op.default)
        self.cache.put(op.name, key, winner, times)
        self.cache.save()
        return winner

    def report(self) -> list:
        """[(op, shape key, winner, {backend: microseconds})] of every measured shape of this model's ops."""
        rows = []
        for name in sorted(self.ops):
            for key, rec in sorted(self.cache.entries.get(name, {}).items()):
                rows.append((name, key, rec["winner"], dict(rec.get("times_us", {}))))
        return rows


def _floats(out) -> list:
    """The floating-point tensors of an op's result (a tensor or a tuple/list of them), flattened."""
    items = out if isinstance(out, (tuple, list)) else (out,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _disagreement(got: list, expected: list) -> Optional[str]:
    """None if `got` matches `expected` within AGREE, else what differs."""
    if len(got) != len(expected):
        return f"{len(got)} outputs, the reference has {len(expected)}"
    for i, (a, ref) in enumerate(zip(got, expected)):
        if a.shape != ref.shape:
            return f"output {i} shape {tuple(a.shape)}, the reference's {tuple(ref.shape)}"
        a32, r32 = a.float(), ref.float()
        finite = torch.isfinite(r32)
        if bool((~torch.isfinite(a32) & finite).any()):
            return f"output {i} has non-finite values where the reference has none"
        a32, r32 = torch.where(finite, a32, 0), torch.where(finite, r32, 0)
        err = float((a32 - r32).norm() / r32.norm().clamp_min(1e-30))
        tol = AGREE.get(ref.dtype, 4e-2)
        if err > tol:
            return f"output {i} relative error {err:.2e} > {tol:.0e}"
    return None


def choose(times: dict, default: str) -> str:
    """The fastest candidate; the default keeps its place unless beaten by more than TIE."""
    valid = {b: t for b, t in times.items() if t is not None}
    best = min(valid, key=valid.get)
    if default in valid and valid[best] >= valid[default] * (1 - TIE):
        return default
    return best


class MeasuredOp:
    """What the model calls for an op with several candidates: looks up the winner for the call's shape key
    (a dict lookup), measures on a miss when allowed, else runs the untuned default."""

    def __init__(self, name: str, fns: dict, default: str, dispatch: Dispatch, reference: Callable):
        self.name, self.fns, self.default, self.dispatch = name, fns, default, dispatch
        self._signature = inspect.signature(reference)
        cached = dispatch.cache.entries.get(name, {})
        # a recorded winner that is not a candidate here (e.g. the extension is not built now) is remeasured
        self.winners = {k: r["winner"] for k, r in cached.items() if r["winner"] in fns}
        dispatch.ops[name] = self

    def __call__(self, *args, **kwargs):
        if kwargs:  # keys are computed on positional arguments, as the model passes them
            bound = self._signature.bind(*args, **kwargs)
            bound.apply_defaults()
            args, kwargs = bound.args, {}
        key = shape_key(self.name, args)
        backend = self.winners.get(key)
        if backend is None:
            if not self.dispatch.can_measure():
                return self.fns[self.default](*args)
            backend = self.dispatch.measure(self, key, args)
            self.winners[key] = backend
        return self.fns[backend](*args)

    def __repr__(self) -> str:
        return f"MeasuredOp({self.name}: {'/'.join(self.fns)}, default {self.default}, {len(self.winners)} measured)"
