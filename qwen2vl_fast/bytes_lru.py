"""A least-recently-used cache bounded in bytes, not entries.

`functools.lru_cache(maxsize=N)` bounds how many values it keeps, not how large they are: per-grid tables grow
with the image size and with the model's width, so 256 entries of one model's tables can be a few MiB on the
tiny test model and GiBs on a real one. `ByteLRU` counts the bytes of every value it keeps (tensor storages,
plus the Python containers around them: tuples, lists, dicts, dataclasses) and evicts the least recently used
entries once the total passes its budget. A value larger than the whole budget is returned to the caller but
not kept.

Budget: an explicit `budget_bytes`, or else the environment variable named by `budget_env` in MiB (read on every
insertion, so a change takes effect at the next one), or else `default_mb`. The positions caches use
`QWEN2VL_FAST_TABLE_CACHE_MB` (default 64; 0 turns caching off).

Cached values are shared between callers: callers must treat them as read-only.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .errors import ConfigError

MIB = 1 << 20


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    budget: int


def value_nbytes(value: Any) -> int:
    """Bytes a cached value holds: each distinct tensor storage once (a view counts its whole storage), plus
    `sys.getsizeof` of the containers and other leaves around the tensors."""
    seen: set = set()

    def walk(v) -> int:
        if isinstance(v, torch.Tensor):
            storage = v.untyped_storage()
            key = (v.device, storage.data_ptr(), storage.nbytes())
            if key in seen:
                return 0
            seen.add(key)
            return storage.nbytes()
        if isinstance(v, (tuple, list)):
            return sys.getsizeof(v) + sum(walk(x) for x in v)
        if isinstance(v, dict):
            return sys.getsizeof(v) + sum(walk(k) + walk(x) for k, x in v.items())
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return sys.getsizeof(v) + sum(walk(getattr(v, f.name)) for f in dataclasses.fields(v))
        return sys.getsizeof(v)

    return walk(value)


class ByteLRU:
    """A thread-safe LRU mapping bounded by the summed `value_nbytes` of its values."""

    def __init__(self, budget_bytes: int | None = None, budget_env: str | None = None, default_mb: float = 64):
        self._fixed, self.budget_env, self.default_mb = budget_bytes, budget_env, default_mb
        self._data: OrderedDict = OrderedDict()  # key -> (value, nbytes), least recently used first
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = self.bytes = 0

    @property
    def budget(self) -> int:
        """The budget in bytes now (see the module docstring for where it comes from)."""
        if self._fixed is not None:
            return int(self._fixed)
        raw = os.environ.get(self.budget_env) if self.budget_env else None
        if not raw:
            return int(self.default_mb * MIB)
        try:
            mb = float(raw)
        except ValueError:
            mb = -1.0
        if not mb >= 0:  # also rejects nan
            raise ConfigError(f"environment variable {self.budget_env}={raw!r} must be a cache size in MiB >= 0 "
                              f"(default {self.default_mb:g}; 0 turns the cache off)")
        return int(mb * MIB)

    @budget.setter
    def budget(self, budget_bytes: int | None) -> None:
        """Fix the budget (None: back to the environment / default); shrinking evicts at once."""
        self._fixed = budget_bytes
        budget = self.budget
        with self._lock:
            self._evict(budget)

    def get(self, key, default=None):
        """The value for `key` (counted as a hit, made most recent), or `default` (counted as a miss)."""
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.misses += 1
                return default
            self._data.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key, value) -> bool:
        """Keep `value` under `key` unless it alone exceeds the budget; evict the oldest entries past the budget.
        Returns whether the value was kept."""
        size, budget = value_nbytes(value), self.budget
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            if size > budget:
                self._evict(budget)
                return False
            self._data[key] = (value, size)
            self.bytes += size
            self._evict(budget)
            return True

    def _evict(self, budget: int) -> None:
        while self.bytes > budget and self._data:
            _, (_, size) = self._data.popitem(last=False)
            self.bytes -= size
            self.evictions += 1

    def keys(self) -> list:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._data)

    def clear(self) -> None:
        """Drop every entry and zero the counters."""
        with self._lock:
            self._data.clear()
            self.hits = self.misses = self.evictions = self.bytes = 0

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self.hits, self.misses, self.evictions, len(self._data), self.bytes, self.budget)

    def __len__(self) -> int:
        return len(self._data)


_MISSING = object()


def byte_lru_cache(cache: ByteLRU, name: str | None = None) -> Callable:
    """Memoise a function of hashable positional arguments in `cache` (which several functions may share: keys
    are prefixed with the function's name). The wrapper has `.cache` and `.__wrapped__`."""

    def decorate(fn):
        prefix = name or fn.__qualname__

        @functools.wraps(fn)
        def wrapper(*args):
            key = (prefix, *args)
            value = cache.get(key, _MISSING)
            if value is _MISSING:
                value = fn(*args)
                cache.put(key, value)
            return value

        wrapper.cache = cache
        return wrapper

    return decorate
