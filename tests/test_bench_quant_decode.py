"""bench/bench_quant_decode.py end to end in its smoke mode (tiny preset, bf16 / int8 / int4 built in memory,
small batches, few tokens), and the arithmetic it reports with: group-size fallback, the bytes of a plan.

Runs on the test device (the CPU here: the quantized linears go through the reference op). Checks the result
file's layout and that the numbers are there and consistent, not their values (a tiny model on a CPU says
nothing about speed).
"""

import json

import pytest
import torch

from helpers_bench import bench_module

bqd = bench_module("bench_quant_decode")


@pytest.fixture()
def result(tmp_path, monkeypatch, device):
    monkeypatch.delenv("QWEN2VL_FAST_BENCH_OUT", raising=False)
    out = tmp_path / "results"
    rc = bqd.main(["--presets", "tiny-qwen2-vl", "--device", str(device), "--dtype", "float32",
                   "--batches", "1", "2", "--new-tokens", "4", "--prompt-tokens", "8", "--reps", "1",
                   "--out-dir", str(out)])
    files = sorted(out.glob("quant_decode-*.json"))
    assert len(files) == 1
    return rc, json.loads(files[0].read_text())


def test_smoke_writes_a_row_per_weights_and_batch(result):
    rc, doc = result
    assert rc == 0
    assert doc["name"] == "quant_decode" and "gpu" in doc["environment"]
    r = doc["result"]
    assert {"dtype", "device", "batches", "new_tokens", "prompt_tokens", "group_size", "ceilings", "models",
            "rows"} <= r.keys()
    assert [m["weights"] for m in r["models"]] == ["bf16", "int8", "int4"]
    rows = {(d["weights"], d["batch"]): d for d in r["rows"]}
    assert set(rows) == {(w, b) for w in ("bf16", "int8", "int4") for b in (1, 2)}
    for (kind, b), d in rows.items():
        assert "error" not in d and "skipped" not in d, d
        assert d["preset"] == "tiny-qwen2-vl" and d["all_rows_full"] and d["steps"] == 3
        assert d["tokens_per_s"] > 0 and d["ms_per_step"] > 0 and d["speedup_vs_bf16"] > 0
        assert d["bytes_per_step"] == d["weight_bytes"] + d["kv_bytes"] and d["kv_bytes"] > 0
        assert d["pct_of_bandwidth"] > d["pct_of_bandwidth_weights"] > 0
        assert d["tokens_per_s"] == pytest.approx(b * d["steps"] / d["decode_s"])
    assert rows[("bf16", 1)]["speedup_vs_bf16"] == 1
    # the tiny dims are not multiples of 128: each quantized row says which group size each layer got
    assert rows[("int4", 1)]["group_fallbacks"] == {"qkv(K=64)": 64, "o(K=64)": 64, "gate_up(K=64)": 64,
                                                    "down(K=96)": 32}
    assert rows[("bf16", 1)]["group_fallbacks"] is None
    # fewer bytes per step for fewer bits (the tied fp32 lm_head dominates the tiny model, so only just)
    assert rows[("int4", 1)]["weight_bytes"] < rows[("int8", 1)]["weight_bytes"] < rows[("bf16", 1)]["weight_bytes"]


def test_group_size_falls_back_to_a_divisor():
    assert bqd.pick_group_size(3584, 128) == 128
    assert bqd.pick_group_size(96, 128) == 32
    assert bqd.pick_group_size(200, 128) == -1  # 200 = 8 * 25: no 16-multiple divides it
    assert bqd.pick_group_size(96, 64) == 32
    assert bqd.pick_group_size(64, -1) == -1


def _nbytes(w) -> int:
    parts = [w] if isinstance(w, torch.Tensor) else [w.qweight, w.scales, w.zeros]
    return sum(t.numel() * t.element_size() for t in parts)


def test_plan_bytes_match_the_built_weights():
    from qwen2vl_fast.config import parse_config
    from qwen2vl_fast.presets import preset_config

    cfg = parse_config(preset_config("tiny-qwen2.5-vl"))  # untied: every tensor is its own
    for bits in (None, 8, 4):
        plan = bqd.weight_plan(cfg, bits, 128)
        weights = bqd.build_weights(cfg, plan, torch.float16, torch.device("cpu"), seed=0)
        assert bqd.plan_bytes(cfg, plan, 2) == sum(_nbytes(w) for w in weights.values())
        down = weights["model.layers.0.mlp.down_proj.weight"]  # K = 96: group 32
        if bits is None:
            assert isinstance(down, torch.Tensor)
        else:
            assert (down.bits, down.group_size, down.perm) == (bits, 32, None)
            assert down.scales.dtype == torch.float16 and bool((down.zeros == 2 ** (bits - 1)).all())
        assert isinstance(weights["model.embed_tokens.weight"], torch.Tensor)  # never quantized
