"""Every error this package raises on purpose derives from `Qwen2VLFastError`.

Callers catch one class; the subclasses say which layer refused the input, and the message says what was
wrong (the file, the tensor, the key, the value) and, where one exists, how to fix it.
"""


class Qwen2VLFastError(Exception):
    """Base class of every error qwen2vl_fast raises on purpose."""


class ConfigError(Qwen2VLFastError, ValueError):
    """A config.json (or a config dict) is unreadable, of an unknown model type or inconsistent."""


class CheckpointError(Qwen2VLFastError):
    """A checkpoint directory is missing files or tensors, or holds truncated, mismatched or unexpected data."""


class DeviceError(Qwen2VLFastError, ValueError):
    """A device string is not a device, or names one this machine does not have (CUDA on a CPU-only torch)."""


class InputError(Qwen2VLFastError, ValueError):
    """Model inputs (ids, masks, pixel values, grids) are malformed or disagree with each other."""


class BackendError(Qwen2VLFastError, ValueError):
    """An unknown backend was asked for, or an op has no implementation for the requested backend/device."""


class ProcessingError(InputError):
    """Preprocessing refused an input (image, video, prompt); the message says which and why."""


class ImageError(ProcessingError):
    """An image is unreadable, corrupt, empty, of an unsupported kind, or cannot meet the pixel budget."""


class VideoError(ProcessingError):
    """A video is unreadable, has no frames, or cannot be sampled as asked."""


class PromptError(ProcessingError):
    """A prompt or chat is malformed, its placeholders disagree with the media, or it exceeds the context."""


class TokenizerError(ProcessingError):
    """A checkpoint's tokenizer files exist but cannot be loaded (corrupt, or lacking the Qwen special tokens).

    Not a `PromptError`: a missing tokenizer is tolerated at load (processed dicts still work), a broken one
    is not."""


class EngineError(Qwen2VLFastError):
    """The engine cannot serve a request as asked (cache too small, out of memory, batch too large)."""


class QueueFullError(EngineError):
    """The engine's request queue is full: retry later (the server answers 429)."""


class EngineClosedError(EngineError):
    """The engine was closed (or is shutting down) and takes no new requests (the server answers 503)."""


class RequestCancelledError(EngineError):
    """`result()` of a request that was cancelled before it produced any token."""
