"""The op registry: every op has a PyTorch reference and zero or more fast implementations.

An implementation is registered under a backend name ("torch", "triton", "cuda") with a predicate saying
whether it can run on a device (Triton needs CUDA or the interpreter, the CUDA extension needs a build and a
GPU). `resolve(backend, device)` turns a backend request into one callable per op, once, at model load:

- "torch": the references everywhere;
- "triton" / "cuda": that backend's implementation for every op that has one that runs on the device, the
  next one down the chain (cuda -> triton -> torch) for the others; asking for a backend that runs no op at
  all on this device is an error rather than a silent run of the references;
- "auto": per op, every implementation that runs fast on the device is a candidate; with more than one, the op
  is dispatched by measurement (dispatch.py): per shape, the fastest measured here. Before a shape is measured it
  runs the op's untuned default: the reference for ops registered with `prefer_reference=True` (the GEMMs:
  cuBLAS), else the first of cuda, triton, torch.

`OpTable.chosen` records each op's untuned default and `OpTable.dispatch_report()` the measured winners, so the
choice is never hidden.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..errors import BackendError
from .dispatch import MODES, Dispatch, MeasuredOp

BACKENDS = ("torch", "triton", "cuda")
BACKEND_ENV = "QWEN2VL_FAST_BACKEND"
DISPATCH_ENV = "QWEN2VL_FAST_DISPATCH"  # measure | cached | default: overrides the `dispatch` mode of resolve()
_CHAIN = {"cuda": ("cuda", "triton", "torch"), "triton": ("triton", "torch"), "torch": ("torch",),
          "auto": ("cuda", "triton", "torch")}


def _always(device: torch.device) -> bool:
    return True


@dataclass
class Op:
    name: str
    doc: str
    impls: dict = field(default_factory=dict)  # backend -> (fn, runs_on(device) -> bool)
    auto_on: dict = field(default_factory=dict)  # backend -> predicate for `auto` (default: runs_on)
    supports: dict = field(default_factory=dict)  # backend -> predicate on the ModelConfig (default: all)
    prefer_reference: bool = False  # untuned default of `auto` is the reference (GEMMs: cuBLAS until measured)
    variants: dict = field(default_factory=dict)  # label -> (fn, auto_on): extra candidates `auto` races, never
    #                                               picked by name (e.g. cuBLAS GEMM + our activation kernel)

    @property
    def reference(self) -> Callable:
        return self.impls["torch"][0]

    def implementations(self, device=None, config=None) -> list[str]:
        """Backends implemented for this op; with `device`, only those that run there; with `config` (a
        ModelConfig), only those that support that model's shapes."""
        names = [b for b in BACKENDS if b in self.impls]
        if device is not None:
            dev = torch.device(device)
            names = [b for b in names if self.impls[b][1](dev)]
        if config is not None:
            names = [b for b in names if self.supports.get(b, lambda c: True)(config)]
        return names

    def candidates(self, device, config=None, interpreted: bool = False) -> list[str]:
        """What `auto` may run on `device`: the implementations that run there and that `auto_on` admits (Triton
        under the CPU interpreter runs, but is never a fast choice); `interpreted=True` admits those too (tests
        of the dispatch itself)."""
        runnable = self.implementations(device, config)
        dev = torch.device(device)
        if not interpreted:
            runnable = [b for b in runnable if self.auto_on.get(b, self.impls[b][1])(dev)]
        return runnable + [label for label, (_, ok) in self.variants.items() if ok(dev, interpreted)]

    def candidate_fn(self, name: str) -> Callable:
        return self.impls[name][0] if name in self.impls else self.variants[name][0]

    def untuned(self, candidates: list[str]) -> str:
        """The candidate that runs before (or without) a measurement."""
        if self.prefer_reference and "torch" in candidates:
            return "torch"
        return next(b for b in _CHAIN["auto"] if b in candidates)

    def pick(self, backend: str, device, config=None) -> str:
        if backend == "auto":
            return self.untuned(self.candidates(device, config))
        runnable = self.implementations(device, config)
        return next(b for b in _CHAIN[backend] if b in runnable)


_OPS: dict[str, Op] = {}


def reference(name: str, prefer_reference: bool = False):
    """Decorator: register `fn` as the PyTorch reference of op `name` (creating the op). `prefer_reference`: under
    `auto`, shapes not yet measured run this reference rather than a fast implementation."""

    def wrap(fn):
        if name in _OPS:
            raise RuntimeError(f"op {name!r} registered twice")
        _OPS[name] = Op(name=name, doc=(fn.__doc__ or "").strip().split("\n")[0], impls={"torch": (fn, _always)},
                        prefer_reference=prefer_reference)
        return fn

    return wrap


def implementation(name: str, backend: str, runs_on: Callable[[torch.device], bool], auto_on=None, supports=None):
    """Decorator: register a fast implementation of an existing op for `backend`. `runs_on(device)` says
    whether it can run there; `auto_on(device)` (default: runs_on) whether `auto` may pick it there;
    `supports(model_config)` (default: always) whether it handles that model's shapes, so a model is never
    given a kernel that would have to fall back at run time."""
    if backend not in ("triton", "cuda"):
        raise ValueError(f"fast implementations are 'triton' or 'cuda', not {backend!r}")

    def wrap(fn):
        _OPS[name].impls[backend] = (fn, runs_on)
        if auto_on is not None:
            _OPS[name].auto_on[backend] = auto_on
        if supports is not None:
            _OPS[name].supports[backend] = supports
        return fn

    return wrap


def variant(name: str, label: str, runs_on: Callable[[torch.device], bool], auto_on: Callable[[torch.device], bool]):
    """Decorator: register `fn` as a further candidate of op `name` that only `auto` races (under `label`), for
    combinations that are no backend of their own: cuBLAS's GEMM followed by our activation kernel races both the
    all-PyTorch reference and our fused-epilogue GEMM. `runs_on` admits it with interpreted=True (tests)."""

    def wrap(fn):
        _OPS[name].variants[label] = (fn, lambda dev, interpreted: (runs_on if interpreted else auto_on)(dev))
        return fn

    return wrap


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, and on the CPU under the interpreter (TRITON_INTERPRET=1)."""
    if device.type not in ("cuda", "cpu") or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"):
        return False
    return _triton_importable()


def triton_auto_on(device: torch.device) -> bool:
    """`auto` picks Triton on CUDA only: the interpreter is for testing, far slower than the references."""
    return device.type == "cuda" and _triton_importable()


def cuda_ext_runs_on(device: torch.device) -> bool:
    """CUDA C++ kernels need a CUDA device and the built extension qwen2vl_fast._C."""
    return device.type == "cuda" and _cuda_ext_importable()


def _triton_importable() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401

            _TRITON_OK = True
        except ImportError:
            _TRITON_OK = False
    return _TRITON_OK


def _cuda_ext_importable() -> bool:
    global _CUDA_EXT_OK
    if _CUDA_EXT_OK is None:
        try:
            from qwen2vl_fast import _C  # noqa: F401

            _CUDA_EXT_OK = True
        except ImportError:
            _CUDA_EXT_OK = False
    return _CUDA_EXT_OK


_TRITON_OK = None
_CUDA_EXT_OK = None


def get_op(name: str) -> Op:
    return _OPS[name]


def all_ops() -> dict[str, Op]:
    return dict(_OPS)


def normalize_backend(backend: str | None) -> str:
    """Apply the environment override and validate the name."""
    env = os.environ.get(BACKEND_ENV)
    chosen = env if env else (backend or "auto")
    if chosen not in _CHAIN:
        source = f"environment variable {BACKEND_ENV}" if env else "backend argument"
        raise BackendError(f"unknown backend {chosen!r} from the {source}; choose one of auto, torch, triton, cuda")
    return chosen


class OpTable:
    """One resolved callable per op, as attributes: `table.rms_norm(x, w, eps)`. Under `auto`, an op with several
    candidates is a `MeasuredOp`; `chosen` holds every op's untuned default, `dispatch` the measurement state."""

    def __init__(self, backend: str, device, fns: dict[str, Callable], chosen: dict[str, str],
                 dispatch: Optional[Dispatch] = None):
        self.backend, self.device, self.chosen, self.dispatch = backend, torch.device(device), chosen, dispatch
        self.__dict__.update(fns)

    @property
    def measured(self) -> dict[str, MeasuredOp]:
        """The ops dispatched by measurement: name -> MeasuredOp (candidates, winners per shape key)."""
        return dict(self.dispatch.ops) if self.dispatch is not None else {}

    def dispatch_report(self) -> list:
        """[(op, shape key, winner, {backend: microseconds})] for every shape measured on this device."""
        return self.dispatch.report() if self.dispatch is not None else []

    def __repr__(self) -> str:
        picked = ", ".join(f"{k}={'measured:' if k in self.measured else ''}{v}" for k, v in sorted(self.chosen.items()))
        return f"OpTable(backend={self.backend!r}, device={self.device}, {picked})"


def normalize_dispatch(mode) -> str:
    env = os.environ.get(DISPATCH_ENV)
    chosen = env if env else mode
    if chosen not in MODES:
        source = f"environment variable {DISPATCH_ENV}" if env else "dispatch argument"
        raise BackendError(f"unknown dispatch mode {chosen!r} from the {source}; choose one of {', '.join(MODES)}")
    return chosen


def resolve(backend: str | None = "auto", device="cpu", config=None, dispatch="measure", cache_path=None,
            timer=None, interpreted: bool = False) -> OpTable:
    """One callable per op for `backend` on `device`; with `config` (the model's ModelConfig), implementations
    that do not support its shapes are passed over for the next in the chain (visible in `chosen`).

    Under `auto`, ops with several candidates are dispatched by measurement (dispatch.py): `dispatch` is the
    mode ("measure", "cached", "default"; QWEN2VL_FAST_DISPATCH overrides it) or a `Dispatch` to share;
    `cache_path` the tuning cache file (default ~/.cache/qwen2vl_fast/dispatch.json); `timer(op, backend, fn,
    args) -> seconds` replaces the device timing (tests inject timings); `interpreted=True` lets Triton under
    the CPU interpreter be a candidate (tests of the dispatch)."""
    backend = normalize_backend(backend)
    dev = torch.device(device)
    chosen = {name: op.pick(backend, dev, config) for name, op in _OPS.items()}
    if backend in ("triton", "cuda") and backend not in chosen.values():
        have = sorted({b for op in _OPS.values() for b in op.implementations()})
        raise BackendError(
            f"backend {backend!r} has no op that runs on {dev} here (implemented backends: {', '.join(have)}); "
            f"use backend='auto' or 'torch'")
    fns = {name: _OPS[name].impls[b][0] for name, b in chosen.items()}
    table_dispatch = None
    if backend == "auto":
        raced = {name: op.candidates(dev, config, interpreted) for name, op in _OPS.items()}
        raced = {name: c for name, c in raced.items() if len(c) > 1}
        if raced:  # only then is there anything to measure (never on a CPU without the interpreter)
            table_dispatch = dispatch if isinstance(dispatch, Dispatch) else \
                Dispatch(dev, normalize_dispatch(dispatch), cache_path, timer)
            for name, cands in raced.items():
                op = _OPS[name]
                chosen[name] = op.untuned(cands)
                fns[name] = MeasuredOp(name, {b: op.candidate_fn(b) for b in cands}, chosen[name], table_dispatch,
                                       op.reference)
    return OpTable(backend, dev, fns, chosen, table_dispatch)


def available(device=None) -> dict[str, dict]:
    """Every op: its implementations, the ones that run on `device` (default: cuda if present, else cpu), the
    candidates `auto` races there and the one it runs before a measurement (`auto`)."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return {
        name: {"implementations": op.implementations(), "runs_here": op.implementations(dev),
               "candidates": op.candidates(dev), "auto": op.pick("auto", dev), "doc": op.doc}
        for name, op in sorted(_OPS.items())
    }
