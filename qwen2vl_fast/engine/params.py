"""Sampling parameters, validated once per request (a bad value is refused before any device work)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    ignore_eos: bool = False
    stop: tuple = ()  # stop strings: the text ends before the first one generated (finish_reason "stop")

    def __post_init__(self):
        def bad(name, why):
            raise InputError(f"{name}={getattr(self, name)!r} is out of range: {why}")

        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an integer >= 1")
        if not _real(self.temperature) or self.temperature < 0:
            bad("temperature", "must be >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 = off)")
        if not _real(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not _real(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0 (1 = off)")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad("seed", "must be an integer or None")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if stop is None:
            stop = ()
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            bad("stop", "must be a string or a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")
