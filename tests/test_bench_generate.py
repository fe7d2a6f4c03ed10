"""bench/bench_generate.py end to end in its smoke mode: tiny preset, small batches, few tokens, a small image.

Runs on the test device (the CPU here; QWEN2VL_FAST_TEST_DEVICE=cuda adds the CUDA-graph and eager variants of
ours), transformers eager included, compile skipped. Checks the result file's layout and that the numbers are
there and positive, not their values (a tiny model on a CPU says nothing about speed).
"""

import json

import pytest

from helpers_bench import bench_module

bench_generate = bench_module("bench_generate")


@pytest.fixture()
def result(tmp_path, monkeypatch, device):
    monkeypatch.setenv("QWEN2VL_FAST_BENCH_CACHE", str(tmp_path / "ckpt"))
    monkeypatch.delenv("QWEN2VL_FAST_BENCH_OUT", raising=False)
    out = tmp_path / "results"
    rc = bench_generate.main(["--presets", "tiny-qwen2-vl", "--batches", "1", "2", "--new-tokens", "4",
                              "--prompt-tokens", "8", "--image", "56x84", "--device", str(device),
                              "--dtype", "float32", "--reps", "1", "--skip-compile", "--out-dir", str(out)])
    files = sorted(out.glob("generate-*.json"))
    assert len(files) == 1
    return rc, json.loads(files[0].read_text())


def test_smoke_writes_the_expected_result(result):
    rc, doc = result
    assert rc == 0
    assert doc["name"] == "generate" and "gpu" in doc["environment"]
    r = doc["result"]
    assert {"dtype", "device", "batches", "new_tokens", "prompt_tokens", "ceilings", "presets"} <= r.keys()
    p = r["presets"]["tiny-qwen2-vl"]
    assert {"decode", "decode_costs", "prefill", "speedups", "goals"} <= p.keys()
    rows = {(d["impl"], d["batch"]): d for d in p["decode"]}
    for b in (1, 2):
        for impl in ("ours", "transformers-eager"):
            d = rows[(impl, b)]
            assert "error" not in d, d.get("error")
            assert d["tokens_per_s"] > 0 and d["ms_per_step"] > 0
            assert d["roofline"]["floor_ms"] > 0 and d["pct_of_bandwidth_roofline"] > 0
        assert rows[("ours", b)]["all_rows_full"]
        assert p["speedups"][str(b)]["vs_transformers-eager"] > 0
    cost = p["decode_costs"]["2"]
    assert cost["bytes"] == cost["weight_bytes"] + cost["kv_bytes"] and cost["kv_bytes"] > 0
    pf = p["prefill"]
    assert pf["image_grid_thw"] == [[1, 6, 4]] and pf["flops"]["total"] > 0
    for impl in ("ours", "transformers"):
        assert pf["impls"][impl]["timing"]["median_ms"] > 0 and pf["impls"][impl]["tflops"] > 0
    assert set(p["goals"]) == {"decode_b1_pct_bandwidth_roofline_ge_80", "decode_b1_vs_eager_ge_10x",
                               "decode_b1_vs_compile_ge_1_5x", "prefill_pct_matmul_ge_60"}


def test_decode_cost_counts_weights_once_and_kv_per_row():
    from qwen2vl_fast.config import parse_config
    from qwen2vl_fast.presets import preset_config

    t = parse_config(preset_config("qwen2-vl-7b")).text
    c = bench_generate.decode_cost(t, weight_bytes=10**9, batch=4, prompt=64, new=129, dsize=2)
    assert c["steps"] == 128 and c["mean_context"] == 64 + 64.5  # step s attends over 64 + s + 1 keys
    assert c["kv_bytes_per_token"] == 2 * 28 * 4 * 128 * 2
    assert c["kv_bytes"] == 4 * c["kv_bytes_per_token"] * c["mean_context"]
