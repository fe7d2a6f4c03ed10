"""Generation: one scheduler thread with continuous batching over a KV cache, packed prefill, decode steps on
CUDA graphs, per-request sampling, a vision-tower cache, streaming to threads and asyncio."""

from .cache import KVCache
from .engine import Engine
from .params import SamplingParams
from .request import Completion, RequestHandle, TokenEvent

__all__ = ["Engine", "Completion", "TokenEvent", "RequestHandle", "SamplingParams", "KVCache"]
