"""The op layer: every operation the model performs, each with a PyTorch reference and a dispatch point for
Triton (`qwen2vl_fast.kernels`) and CUDA C++ (`qwen2vl_fast._C`) implementations. See registry.py."""

from . import activations, attention, basic, decoding, merger, norms, quant_linear, rotary, sampling  # noqa: F401
from . import step_state  # noqa: F401,E402
from . import cuda_ext  # noqa: F401,E402  (registers the CUDA C++ implementations)
from .attention import VarlenMeta
from .registry import BACKEND_ENV, BACKENDS, OpTable, all_ops, available, get_op, normalize_backend, resolve

__all__ = ["available", "resolve", "get_op", "all_ops", "normalize_backend", "OpTable", "VarlenMeta",
           "BACKENDS", "BACKEND_ENV"]
