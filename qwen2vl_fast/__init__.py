"""qwen2vl_fast: a custom-kernel inference engine for Qwen2-VL and Qwen2.5-VL."""

from . import ops
from .config import ModelConfig, load_config
from .errors import BackendError, CheckpointError, ConfigError, InputError, Qwen2VLFastError
from .hf_patch import patch, unpatch

__version__ = "0.1.0"
__all__ = ["load", "tune", "patch", "unpatch", "load_config", "ModelConfig", "ops", "Processor", "Engine", "Qwen2VLFastError", "ConfigError", "CheckpointError",
           "InputError", "BackendError", "__version__"]


def load(path, device="cpu", dtype=None, backend="auto", progress=None, dispatch="measure", dispatch_cache=None,
         tensor_parallel=False):
    """Load a checkpoint directory into a model with the call signature of transformers' model. See `model.load`."""
    from .model import load as _load

    return _load(path, device=device, dtype=dtype, backend=backend, progress=progress, dispatch=dispatch,
                 dispatch_cache=dispatch_cache, tensor_parallel=tensor_parallel)


def tune(model, inputs=None, remeasure=False):
    """Measure every raced op of `model` at the shapes of `inputs` and keep the winners. See `tuning.tune`."""
    from .tuning import tune as _tune

    return _tune(model, inputs, remeasure=remeasure)


def __getattr__(name):
    # Lazy: the processor pulls in Pillow, PyAV and tokenizers, which the model alone does not need.
    if name in ("Engine", "Completion", "SamplingParams"):
        from . import engine

        return getattr(engine, name)
    if name == "Processor":
        from .processing.processor import Processor

        return Processor
    if name == "processing":
        import importlib

        return importlib.import_module(".processing", __name__)
    raise AttributeError(f"module 'qwen2vl_fast' has no attribute {name!r}")
