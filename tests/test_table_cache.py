"""The byte-bounded LRU (`qwen2vl_fast.bytes_lru`) and the positions table cache built on it (issue 11, item 3).

The soak runs 1,000 random image grids through `vision_metadata` at the real Qwen2-VL-2B vision width
(head_dim 80) in a fresh interpreter and bounds the resident-memory growth at the 64 MiB table budget plus a
128 MiB allowance for building one table (a 180x180 grid builds ~50 MiB of temporaries) and allocator slack:
192 MiB. The three `lru_cache(maxsize=256)` caches this replaced grew RSS by ~1.8 GiB on the same run.
"""

import dataclasses
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

import qwen2vl_fast
from qwen2vl_fast import positions
from qwen2vl_fast.bytes_lru import MIB, ByteLRU, byte_lru_cache, value_nbytes
from qwen2vl_fast.config import parse_config
from qwen2vl_fast.errors import ConfigError
from qwen2vl_fast.positions import TABLE_CACHE, TABLE_CACHE_ENV, vision_metadata
from qwen2vl_fast.presets import preset_config

BUDGET_MB = 64
RSS_BOUND_MB = BUDGET_MB + 128
SOAK_REQUESTS = 1000


def _t(nbytes):
    return torch.zeros(nbytes, dtype=torch.uint8)


def _raw(value):
    """Bytes of the tensors alone (value_nbytes adds the containers' Python objects)."""
    return sum(v.untyped_storage().nbytes() for v in value) if isinstance(value, tuple) else value.nbytes


@pytest.fixture
def fresh_table_cache():
    TABLE_CACHE.clear()
    yield TABLE_CACHE
    TABLE_CACHE.budget = None
    TABLE_CACHE.clear()


# ------------------------------------------------------------------------------------------------ the LRU itself

def test_value_nbytes_counts_each_storage_once_through_containers():
    @dataclasses.dataclass
    class Pair:
        a: torch.Tensor
        b: object

    big = torch.zeros(1000, dtype=torch.float32)
    assert value_nbytes(big) == 4000
    assert value_nbytes(big[:10]) == 4000  # a view keeps its whole storage alive
    assert value_nbytes((big, big[5:], big.view(10, 100))) == 4000 + sys.getsizeof((1, 2, 3))
    nested = Pair(_t(300), [_t(200), {"k": _t(100)}, (1, 2)])
    assert 600 < value_nbytes(nested) < 600 + 2000
    assert value_nbytes(torch.zeros(3, 5, dtype=torch.float64)) == 120


def test_evicts_least_recently_used_past_the_byte_budget():
    cache = ByteLRU(budget_bytes=3 * 1000 + 3 * 200)  # three 1000-byte values and their Python overhead
    for key in "abc":
        assert cache.put(key, _t(1000))
    assert cache.keys() == ["a", "b", "c"] and cache.info().evictions == 0
    assert cache.get("a") is not None  # a becomes the most recent
    cache.put("d", _t(1000))
    assert cache.keys() == ["c", "a", "d"] and cache.info().evictions == 1
    cache.put("e", _t(2000))  # needs two slots: c, then a, go
    assert cache.keys() == ["d", "e"] and cache.info().evictions == 3
    assert cache.bytes == value_nbytes(_t(1000)) + value_nbytes(_t(2000)) <= cache.budget
    cache.put("d", _t(10))  # replacing a key re-counts its bytes
    assert cache.bytes == value_nbytes(_t(10)) + value_nbytes(_t(2000))


def test_decorator_counts_hits_and_misses_and_returns_the_cached_value():
    cache = ByteLRU(budget_bytes=MIB)
    calls = []

    @byte_lru_cache(cache)
    def table(n, m):
        calls.append((n, m))
        return torch.full((n, m), float(n)), torch.zeros(m)

    first = table(4, 8)
    again = table(4, 8)
    assert again is first and calls == [(4, 8)]
    table(8, 8)
    info = cache.info()
    assert (info.hits, info.misses, info.entries) == (1, 2, 2)
    assert info.bytes == value_nbytes(first) + value_nbytes(table(8, 8)) and cache.info().hits == 2
    assert table.__wrapped__(4, 8)[0].shape == (4, 8) and len(calls) == 3


def test_a_value_larger_than_the_budget_is_returned_but_not_kept():
    cache = ByteLRU(budget_bytes=10_000)

    @byte_lru_cache(cache, name="make")
    def make(n):
        return _t(n)

    make(1000)
    big = make(50_000)
    assert big.numel() == 50_000
    assert cache.keys() == [("make", 1000)] and cache.bytes == value_nbytes(_t(1000))
    make(50_000)
    assert cache.info().misses == 3 and cache.info().hits == 0


def test_budget_from_the_environment_and_shrinking(monkeypatch):
    cache = ByteLRU(budget_env="TEST_TABLE_MB", default_mb=2)
    monkeypatch.delenv("TEST_TABLE_MB", raising=False)
    assert cache.budget == 2 * MIB
    monkeypatch.setenv("TEST_TABLE_MB", "0.5")
    assert cache.budget == MIB // 2
    for i in range(4):
        cache.put(i, _t(100_000))
    assert len(cache) == 4
    cache.budget = 250_000  # an explicit budget wins over the environment and evicts at once
    assert cache.keys() == [2, 3] and cache.bytes <= 250_000
    cache.budget = None
    monkeypatch.setenv("TEST_TABLE_MB", "0")  # 0 turns caching off: the next insertion empties the cache
    assert not cache.put("x", _t(1)) and cache.keys() == [] and cache.bytes == 0
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv("TEST_TABLE_MB", bad)
        with pytest.raises(ConfigError, match="TEST_TABLE_MB"):
            cache.put("y", _t(1))


# ----------------------------------------------------------------------------------- the positions table cache

def test_vision_metadata_hands_out_copies_so_the_cached_tables_stay_intact(fresh_table_cache):
    cfg = parse_config(preset_config("qwen2.5-vl-7b"))
    grid = torch.tensor([[2, 12, 20], [1, 8, 8]])
    first = vision_metadata(cfg, grid, "cpu")
    assert fresh_table_cache.info().misses > 0 and len(fresh_table_cache) > 0
    for t in (first.cos, first.sin, first.window_index, first.reverse_index):
        t.fill_(-7)  # a caller scribbling on what it got must not reach the cache
    second = vision_metadata(cfg, grid, "cpu")
    assert fresh_table_cache.info().hits > 0
    TABLE_CACHE.clear()
    fresh = vision_metadata(cfg, grid, "cpu")
    for name in ("cos", "sin", "window_index", "reverse_index"):
        assert torch.equal(getattr(second, name), getattr(fresh, name)), name
    kept = fresh_table_cache.keys()
    assert kept
    for key in kept:  # every entry equals a recomputation
        fn = getattr(positions, key[0])
        cached, recomputed = fn(*key[1:]), fn.__wrapped__(*key[1:])
        assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                   for a, b in zip(cached, recomputed))


def test_device_tables_are_kept_on_the_device_and_handed_out_as_device_copies(fresh_table_cache, monkeypatch):
    """For a device other than the CPU ("meta" stands in for CUDA here) the tables are cached where they live, so
    a repeated grid costs one device-side copy and no upload; the host copy is not kept beside them."""
    cfg = parse_config(preset_config("qwen2-vl-2b"))
    uploads = []
    real_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        if self.device.type == "cpu" and self.numel() > 1000:
            uploads.append(tuple(self.shape))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    grid = torch.tensor([[1, 64, 96]])
    first = vision_metadata(cfg, grid, "meta")
    assert first.cos.device.type == "meta" and first.cos.shape == (6144, 80) and len(uploads) == 2
    second = vision_metadata(cfg, grid, "meta")
    assert len(uploads) == 2  # no new upload: the cached device tables were copied on the device
    assert fresh_table_cache.keys() == [("_device_rotary_table_cached", 80, 2, 0, 1, 64, 96, torch.device("meta"))]
    cached_cos, cached_sin = fresh_table_cache.get(fresh_table_cache.keys()[0])
    assert second.cos is not cached_cos and second.sin is not cached_sin and second.cos is not first.cos


def test_table_cache_budget_comes_from_its_environment_variable(fresh_table_cache, monkeypatch):
    cfg = parse_config(preset_config("qwen2-vl-2b"))
    monkeypatch.setenv(TABLE_CACHE_ENV, "0")
    vision_metadata(cfg, torch.tensor([[1, 16, 16]]), "cpu")
    assert len(fresh_table_cache) == 0
    monkeypatch.setenv(TABLE_CACHE_ENV, "1")
    vision_metadata(cfg, torch.tensor([[1, 16, 16]]), "cpu")  # 256 patches x 80 x 4 B x 2 = 160 KiB
    vision_metadata(cfg, torch.tensor([[1, 48, 48]]), "cpu")  # 1.4 MiB of cos/sin: over the budget, not kept
    assert fresh_table_cache.keys() == [("_rotary_table", 80, 2, 0, 1, 16, 16)]


def _soak_grids(n=SOAK_REQUESTS, seed=0):
    """Random single-image grids (even sides 4..180 patches, i.e. 56..2520 px): up to 32400 patches."""
    rng = random.Random(seed)
    return [[1, 2 * rng.randint(2, 90), 2 * rng.randint(2, 90)] for _ in range(n)]


SOAK = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from qwen2vl_fast.config import parse_config
    from qwen2vl_fast.positions import TABLE_CACHE, vision_metadata
    from qwen2vl_fast.presets import preset_config

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    cfg = parse_config(preset_config("qwen2-vl-2b"))
    grids = json.loads(sys.stdin.read())
    for _ in range(3):
        vision_metadata(cfg, torch.tensor([[1, 8, 8]]), "cpu")
    before, peak, most = rss(), 0, 0
    for i, g in enumerate(grids):
        vision_metadata(cfg, torch.tensor([g]), "cpu")
        most = max(most, TABLE_CACHE.bytes)
        if i % 25 == 24:
            peak = max(peak, rss())
    info = TABLE_CACHE.info()
    print(json.dumps(dict(growth=max(peak, rss()) - before, most=most, budget=info.budget, hits=info.hits,
                          misses=info.misses, entries=info.entries)))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_soak_of_1000_image_sizes_keeps_rss_within_the_table_budget():
    grids = _soak_grids()
    root = os.path.dirname(os.path.dirname(os.path.abspath(qwen2vl_fast.__file__)))
    env = {**os.environ, TABLE_CACHE_ENV: str(BUDGET_MB),
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SOAK], input=json.dumps(grids), env=env, cwd=root, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["budget"] == BUDGET_MB * MIB
    assert got["most"] <= got["budget"], got  # the direct check: never more than the budget held
    assert got["growth"] <= RSS_BOUND_MB * MIB, f"RSS grew {got['growth'] / MIB:.0f} MiB > {RSS_BOUND_MB}: {got}"

    # What the replaced caches would have held at the end of the same run: the last 256 distinct grids in each
    # of lru_cache(256) _rotary_table (cos + sin, N x 80 fp32 each) and _rotary_angles (N x 40 fp32).
    distinct = list(dict.fromkeys(tuple(g) for g in reversed(grids)))[:256]
    per_patch = 2 * 80 * 4 + 40 * 4
    old_bytes = sum(t * h * w for t, h, w in distinct) * per_patch
    assert value_nbytes(positions._rotary_table(80, 2, 0, 1, 8, 8)) >= 64 * 2 * 80 * 4  # the accounting above
    assert old_bytes > 4 * RSS_BOUND_MB * MIB, old_bytes / MIB  # ~2.1 GiB: the old caches fail this bound
