"""The engine's counters and latency histograms, updated by the engine thread and read from any thread
(`Engine.metrics()`, the server's /metrics). Histograms are cumulative in the Prometheus manner."""

from __future__ import annotations

import bisect
import threading

# seconds; TTFT spans a text prompt on a GPU (ms) to an image prefill on a CPU (s)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
OUTCOMES = ("finished", "cancelled", "failed", "rejected")


class Histogram:
    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> dict:
        cumulative, total = [], 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            total += n
            cumulative.append((bound, total))
        return {"buckets": cumulative, "sum": self.sum, "count": self.count}


class EngineMetrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.inter_token = Histogram(ITL_BUCKETS)

    def outcome(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.requests[name] += n

    def first_token(self, ttft_s: float, prompt_tokens: int) -> None:
        with self.lock:
            self.ttft.observe(ttft_s)
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += 1

    def next_tokens(self, gaps) -> None:
        with self.lock:
            for gap in gaps:
                self.inter_token.observe(gap)
            self.generated_tokens += len(gaps)

    def snapshot(self) -> dict:
        with self.lock:
            return {"requests": dict(self.requests), "prompt_tokens_total": self.prompt_tokens,
                    "generated_tokens_total": self.generated_tokens, "ttft_seconds": self.ttft.snapshot(),
                    "inter_token_seconds": self.inter_token.snapshot()}
