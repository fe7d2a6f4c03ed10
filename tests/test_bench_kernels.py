"""The kernel benchmarks end to end in their CPU smoke mode (tiny shapes; ours under the Triton interpreter, which
the conftest turns on without a GPU), and the GEMM shapes they take from the presets.

Checks the result files' layout and that every candidate ran and was compared, not the numbers: a tiny problem on
a CPU says nothing about speed (each file says so: "cpu_smoke": true).
"""

import importlib.util
import json

import pytest
import torch

from helpers_bench import bench_module

bench_gemm = bench_module("bench_gemm")
bench_llm_kernels = bench_module("bench_llm_kernels")
bench_quant = bench_module("bench_quant")
bench_vision_kernels = bench_module("bench_vision_kernels")

ROW_KEYS = {"kernel", "impl", "side", "median_ms", "p20_ms", "p80_ms", "method", "achieved_tflops", "achieved_gbps",
            "pct_of_roofline", "memory_bound", "flops", "bytes"}


@pytest.fixture()
def one_thread(monkeypatch):
    """One intra-op thread: the smoke runs are tiny, and two threads on a shared CPU mostly wait for each other."""
    monkeypatch.delenv("QWEN2VL_FAST_BENCH_OUT", raising=False)
    monkeypatch.delenv("QWEN2VL_FAST_BENCH_BUNDLE", raising=False)
    monkeypatch.delenv("QWEN2VL_FAST_BENCH_BUDGET_S", raising=False)  # gpu_check.sh's: no budget in the smoke runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(module, name, tmp_path, *argv):
    out = tmp_path / "results"
    assert module.main(["--smoke", "--device", "cpu", "--reps", "1", "--out-dir", str(out), *argv]) == 0
    files = sorted(out.glob(f"{name}-*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["name"] == name and doc["complete"] is True and "gpu" in doc["environment"]
    assert doc["result"]["cpu_smoke"] is True
    return doc["result"]


def _check_rows(result, expect_ours=True):
    rows = result["rows"]
    assert rows and all("error" not in r for r in rows if r["side"] != "pytorch"), \
        [r["error"] for r in rows if "error" in r]
    for r in rows:
        if "error" not in r:
            assert ROW_KEYS <= r.keys() and r["median_ms"] > 0 and r["method"] == "perf_counter"
    for case in result["cases"]:
        assert case["best_pytorch"] is not None and case["method"] == "perf_counter"
        if expect_ours:
            assert case["speedup_best_ours"] > 0 and case["speedup_auto"] > 0
    return rows


def test_gemm_smoke_compares_every_candidate(tmp_path, one_thread):
    result = _run(bench_gemm, "gemm", tmp_path, "--warmup", "0", "--vision-presets", "tiny-qwen2.5-vl",
                  "--l2-bytes", str(2**16))  # a small "L2", so the tiny M = 1 weights can outsize it
    rows = _check_rows(result)
    assert {r["impl"].split("[")[0] for r in rows} == {"ours-triton", "auto", "torch-eager"}
    kernels = {c["kernel"] for c in result["cases"]}
    assert {"tiny-qwen2.5-vl vision gate_up: linear_swiglu M24 N176 K64+swiglu bias",
            "tiny-qwen2-vl lm_head: linear M1 N512 K64", "tiny-qwen2-vl lm_head: linear M14 N512 K64"} <= kernels
    decode = [c for c in result["cases"] if c["M"] == 1]
    assert decode and all(c["memory_bound"] and c["l2_rotated"] for c in decode)
    padded = next(r for r in rows if r["kernel"].endswith("linear M24 N64 K88 bias") and r["side"] == "ours")
    if importlib.util.find_spec("qwen2vl_fast.align"):  # what the runtime's weights hold, where it pads them
        assert padded["runtime_K"] == 128 and padded["tag"] == "padded 88->128"
    assert result["goals"]["cases_measured"] == len(result["cases"])


def test_gemm_shapes_follow_the_presets():
    vision = bench_gemm.vision_shapes("qwen2-vl-2b")
    assert vision["proj"] == bench_gemm.GemmShape(6144, 1280, 1280, bias=True)
    assert (vision["fc2"].m, vision["fc2"].n, vision["fc2"].k) == (6144, 1280, 5120)
    assert (vision["merger_fc2"].m, vision["merger_fc2"].n) == (1536, 1536)
    v25 = bench_gemm.vision_shapes("qwen2.5-vl-3b")
    assert (v25["down"].n, v25["down"].k, v25["gate_up"].n, v25["gate_up"].act) == (1280, 3420, 6840, "swiglu")
    if importlib.util.find_spec("qwen2vl_fast.align"):
        assert bench_gemm.runtime_shape(v25["down"]).k == 3456 and bench_gemm.runtime_shape(v25["gate_up"]).n == 6912
    assert bench_gemm.runtime_shape(vision["fc2"]) == vision["fc2"]  # 5120 is aligned: nothing to pad
    llm = bench_gemm.llm_shapes("qwen2-vl-2b", [1], 1600)
    assert llm["qkv M1"] == bench_gemm.GemmShape(1, 2048, 1536, bias=True)
    assert (llm["gate_up M1"].n, llm["down M1"].k) == (2 * 8960, 8960)
    assert llm["lm_head M1600"] == bench_gemm.GemmShape(1600, 151936, 1536)
    shapes = bench_gemm.all_shapes(["vision", "llm"], bench_gemm.VISION_PRESETS, bench_gemm.LLM_PRESETS,
                                   bench_gemm.IMAGE_GRID, [1], 1600)
    proj = next(s for s in shapes if s.shape == vision["proj"])  # one shape, timed once for both families
    assert proj.names == ["qwen2-vl-2b vision proj", "qwen2.5-vl-3b vision proj"]
    assert len({s.shape for s in shapes}) == len(shapes) == 9 + 3 * 6  # vision 6 + 3 (Qwen2.5-VL); LLM 4 + 2 each
    assert bench_gemm.GemmShape(1, 4096, 1024).nbytes(2) == (1024 + 4096 * 1024 + 4096) * 2


def test_vision_kernels_smoke(tmp_path, one_thread):
    result = _run(bench_vision_kernels, "vision_kernels", tmp_path, "--warmup", "0")
    rows = _check_rows(result)
    kernels = {c["kernel"].split(" ")[0] for c in result["cases"]}
    assert kernels == {"varlen_attention", "add_layer_norm", "add_rms_norm", "vision_rotary", "patch_embed",
                       "patch_embed_frames"}
    assert {"transformers-loop", "sdpa-math"} <= {r["impl"] for r in rows}


def test_llm_kernels_smoke(tmp_path, one_thread):
    result = _run(bench_llm_kernels, "llm_kernels", tmp_path, "--warmup", "0")
    rows = _check_rows(result)
    kernels = {c["kernel"].split(" ")[1] for c in result["cases"]}
    assert kernels == {"prefill_attention", "decode_attention", "rope_kv_write", "add_rms_norm",
                       "rope_decode_attention"}
    assert any(r["impl"] == "sdpa-math[gqa]" for r in rows)  # the first variant that runs is the one timed


def test_quant_smoke_reports_speedup_vs_bf16_and_the_crossover(tmp_path, one_thread):
    result = _run(bench_quant, "quant_gemm", tmp_path)
    rows = _check_rows(result, expect_ours=False)
    ours = [r for r in rows if r["side"] == "ours"]
    assert {r["impl"] for r in ours} == {"ours-triton-int4", "ours-triton-int8"}
    assert all(r["speedup_vs_bf16"] > 0 and r["bytes"] < r["flops"] for r in ours)
    assert {(c["layer"], c["bits"]) for c in result["crossover"]} == {("qkv", 4), ("qkv", 8)}
