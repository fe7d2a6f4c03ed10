"""Generation: KV cache, packed prefill, decode steps on CUDA graphs, sampling, streaming."""

from .cache import KVCache
from .engine import Completion, Engine, TokenEvent
from .params import SamplingParams

__all__ = ["Engine", "Completion", "TokenEvent", "SamplingParams", "KVCache"]
