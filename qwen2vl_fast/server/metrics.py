"""/metrics: the engine's counters and the server's responses in the Prometheus text exposition format 0.0.4."""

from __future__ import annotations

import math
import threading
from collections import Counter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "qwen2vl_fast_"


class HTTPCounters:
    """Responses by route and status code (requests refused before the engine saw them included)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: Counter = Counter()

    def add(self, route: str, status: int):
        with self._lock:
            self._counts[(route, str(status))] += 1

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._counts)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v) -> str:
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class _Writer:
    def __init__(self):
        self.lines: list = []

    def family(self, name: str, kind: str, help_text: str, samples):
        """samples: [(labels dict, value)]."""
        name = PREFIX + name
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def histogram(self, name: str, help_text: str, hist: dict):
        """hist: {"buckets": [(le, cumulative count), ...], "sum": s, "count": n} (the engine's shape)."""
        name = PREFIX + name
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} histogram")
        hist = hist or {}
        count = int(hist.get("count", 0))
        for le, n in hist.get("buckets", ()):
            if math.isinf(float(le)):
                continue
            self.lines.append(f'{name}_bucket{{le="{_number(le)}"}} {int(n)}')
        self.lines.append(f'{name}_bucket{{le="+Inf"}} {count}')
        self.lines.append(f"{name}_sum {_number(hist.get('sum', 0.0))}")
        self.lines.append(f"{name}_count {count}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(engine_metrics: dict, http: dict, shutting_down: bool = False) -> str:
    m = engine_metrics or {}
    w = _Writer()
    requests = m.get("requests", {})
    w.family("requests_total", "counter", "Engine requests by outcome (finished, cancelled, failed, rejected).",
             [({"outcome": k}, requests.get(k, 0)) for k in ("finished", "cancelled", "failed", "rejected")])
    w.family("http_responses_total", "counter", "HTTP responses by route and status code.",
             [({"route": route, "code": code}, n) for (route, code), n in sorted(http.items())])
    w.family("queue_depth", "gauge", "Requests waiting for a KV cache slot.", [({}, m.get("queue_depth", 0))])
    w.family("running_requests", "gauge", "Requests in the running batch.", [({}, m.get("running", 0))])
    w.family("kv_slots_in_use", "gauge", "KV cache slots (sequences) in use.", [({}, m.get("kv_slots_in_use", 0))])
    w.family("kv_slots_total", "gauge", "KV cache slots (the engine's max_batch).", [({}, m.get("kv_slots_total", 0))])
    w.family("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.",
             [({}, m.get("prompt_tokens_total", 0))])
    w.family("generated_tokens_total", "counter", "Generated tokens.", [({}, m.get("generated_tokens_total", 0))])
    vc = m.get("vision_cache", {})
    w.family("vision_cache_hits_total", "counter", "Vision encoder cache hits.", [({}, vc.get("hits", 0))])
    w.family("vision_cache_misses_total", "counter", "Vision encoder cache misses.", [({}, vc.get("misses", 0))])
    w.family("vision_cache_evictions_total", "counter", "Vision encoder cache evictions.",
             [({}, vc.get("evictions", 0))])
    w.family("vision_cache_bytes", "gauge", "Bytes held by the vision encoder cache.", [({}, vc.get("bytes", 0))])
    w.family("vision_cache_capacity_bytes", "gauge", "Capacity of the vision encoder cache.",
             [({}, vc.get("capacity_bytes", 0))])
    w.histogram("time_to_first_token_seconds", "Time from submission to the first generated token.",
                m.get("ttft_seconds"))
    w.histogram("inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                m.get("inter_token_seconds"))
    w.family("shutting_down", "gauge", "1 while the server is shutting down.", [({}, int(shutting_down))])
    return w.text()
