"""The measured bandwidth ceiling and the "ceiling under-measured" flag on the CPU (bench/roofline.py).

The first H200 run measured 2,629 GB/s with torch's copy_ alone (a cudaMemcpyAsync, a graph memcpy node), while
its lm_head GEMVs streamed 4.1-4.2 TB/s: 105-160% of "roofline", printed bare. The ceiling is now the best of
several methods, each counting the bytes it must move, and a figure above a ceiling carries a flag."""

import pytest
import torch

from helpers_bench import bench_module

compare = bench_module("compare")
roofline = bench_module("roofline")

GIB = 2**30


def test_bytes_moved_per_method_and_gbps_arithmetic():
    assert roofline.BANDWIDTH_METHODS == {"torch-copy": 2, "torch-elementwise": 2, "triton-copy": 2, "torch-sum": 1}
    # a 1 GiB copy (read + write) in 0.5 ms: 2 GiB / 0.5 ms = 4294.97 GB/s (1e9 bytes: the kernels' unit, not GiB)
    assert roofline.gbps(2 * GIB, 0.5) == pytest.approx(4294.967296)
    assert roofline.gbps(1e9, 1000.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        roofline.gbps(1e9, 0.0)
    assert roofline.default_bandwidth_bytes("cpu") == 16 * 2**20


def test_the_ceiling_is_the_best_method_that_ran():
    assert roofline.best_bandwidth({"torch-copy": 2629.0, "triton-copy": 4210.0, "torch-sum": 4050.0,
                                    "torch-elementwise": None}) == (4210.0, "triton-copy")
    with pytest.raises(RuntimeError, match="no bandwidth method"):
        roofline.best_bandwidth({"torch-copy": None})


def test_each_method_counts_its_own_bytes_and_the_faster_timing(monkeypatch):
    """A simulated H200: copy_ as a memcpy node (graph) runs at the copy engine's rate, as a queued launch at the
    SMs'; the elementwise copy and the Triton copy stream ~4.2 TB/s; a read-only sum reads 1x the buffer."""
    nbytes = 2**20
    per_call_ms = {("torch-copy", "graph"): 2 * nbytes / 2629e9 * 1e3,
                   ("torch-copy", "queue"): 2 * nbytes / 4000e9 * 1e3,
                   ("torch-elementwise", "graph"): 2 * nbytes / 4150e9 * 1e3,
                   ("torch-elementwise", "queue"): 2 * nbytes / 4100e9 * 1e3,
                   ("triton-copy", "graph"): 2 * nbytes / 4250e9 * 1e3, ("triton-copy", "queue"): None,
                   ("torch-sum", "graph"): nbytes / 4050e9 * 1e3, ("torch-sum", "queue"): nbytes / 4000e9 * 1e3}
    fns = {name: (lambda name=name: name) for name in roofline.BANDWIDTH_METHODS}

    def fake_time_fn(fn, *, method, **_):
        ms = per_call_ms[(fn(), method)]
        if ms is None:
            raise RuntimeError("cannot run this way")
        return dict(median_ms=ms, method=f"cuda-{method}")
    monkeypatch.setattr(roofline, "_bandwidth_fns", lambda device, src, dst: fns)
    monkeypatch.setattr(roofline, "time_fn", fake_time_fn)
    monkeypatch.setattr(roofline, "_device", lambda d: torch.device("cuda", 0))
    monkeypatch.setattr(roofline, "_CACHE", {})
    monkeypatch.setattr(roofline, "_bandwidth_buffers", lambda device, n: (torch.empty(n // 4), torch.empty(n // 4)))
    per = roofline.measure_bandwidth_methods("cuda", nbytes)
    assert per["torch-copy"]["gbps"] == pytest.approx(4000.0) and per["torch-copy"]["timing"] == "cuda-queue"
    assert per["torch-sum"]["bytes_moved"] == nbytes and per["torch-sum"]["gbps"] == pytest.approx(4050.0)
    assert per["triton-copy"]["bytes_moved"] == 2 * nbytes and per["triton-copy"]["gbps"] == pytest.approx(4250.0)
    assert roofline.measure_copy_bandwidth("cuda", nbytes) == pytest.approx(4250.0)  # cached, the best method


def test_bandwidth_methods_run_on_the_cpu():
    per = roofline.measure_bandwidth_methods("cpu", 2**20, rep=2)
    assert set(per) == {"torch-copy", "torch-elementwise", "torch-sum"}  # no Triton copy off CUDA
    assert all(v["gbps"] > 0 and v["timing"] == "perf_counter" for v in per.values())
    assert per["torch-copy"]["bytes_moved"] == 2 * 2**20 and per["torch-sum"]["bytes_moved"] == 2**20
    assert roofline.measure_copy_bandwidth("cpu", 2**20) == max(v["gbps"] for v in per.values())


def test_a_figure_above_a_ceiling_is_flagged():
    """The H200's lm_head GEMV (Qwen2-VL-7B, M = 1: 1.09 GB of bf16 weight in 0.2591 ms) against the old copy_
    ceiling (2,629 GB/s) and a ceiling measured as the best method (4,250 GB/s)."""
    nbytes, ms = 152064 * 3584 * 2 + 3584 * 2 + 152064 * 2, 0.2591
    flops = 2 * 152064 * 3584
    old = roofline.roofline_fraction(flops, nbytes, ms, dict(tflops=783.0, gbps=2629.0))
    assert old["pct_of_roofline"] == pytest.approx(160.0, abs=0.5)
    assert old["ceiling_flag"] == roofline.CEILING_UNDER_MEASURED == "ceiling under-measured"
    new = roofline.roofline_fraction(flops, nbytes, ms, dict(tflops=783.0, gbps=4250.0))
    assert new["pct_of_roofline"] == pytest.approx(99.0, abs=0.5) and new["ceiling_flag"] is None
    # a compute-bound kernel over the matmul ceiling is flagged too, and exactly 100% is not
    assert roofline.roofline_fraction(2e12, 1e6, 1.0, dict(tflops=1000.0, gbps=1e6))["ceiling_flag"]
    assert roofline.roofline_fraction(1e12, 1e6, 1.0, dict(tflops=1000.0, gbps=1e6))["ceiling_flag"] is None
    assert roofline.ceiling_flag(None, 99.9) is None and roofline.ceiling_flag(100.01)
    assert roofline.format_pct(160.04, 7) == "160.0% (ceiling under-measured)"
    assert roofline.format_pct(99.04, 7) == "  99.0%" and roofline.format_pct(None, 3) == "  -"
    rows = [dict(pct_of_roofline=95.0, pct_of_gbps=95.0, pct_of_tflops=1.0),
            dict(pct_of_roofline=99.0, pct_of_gbps=99.0, pct_of_tflops=101.0)]
    assert roofline.over_ceiling(rows) == rows[1:]


def test_reports_print_the_flag_and_the_result_lists_it(tmp_path, monkeypatch):
    results = bench_module("results")
    for var in ("QWEN2VL_FAST_BENCH_OUT", "QWEN2VL_FAST_BENCH_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    make = lambda: (torch.randn(64),)  # noqa: E731
    case = compare.Case("gemv", 1.0, 1e12, {"ours-a": compare.Candidate(lambda x: x, make, "ours"),
                                            "torch-b": compare.Candidate(lambda x: x + 1, make)})
    ceil = dict(tflops=1.0, gbps=1.0)  # 1e12 bytes at 1 GB/s: 1000 s of floor, any call "beats" it
    out, payload = results.ResultFile("flag_demo", tmp_path, env={"gpu": "cpu"}), {}
    compare.run_cases(iter([case]), ceil, out, payload, device="cpu", warmup=0, rep=2)
    assert all(r["ceiling_flag"] == roofline.CEILING_UNDER_MEASURED for r in payload["rows"])
    assert payload["cases"][0]["ceiling_flag_best_ours"] == roofline.CEILING_UNDER_MEASURED
    assert {x["impl"] for x in payload["ceiling_under_measured"]} == {"ours-a", "torch-b"}
    text = compare.format_rows(payload["rows"], payload["cases"][0])
    assert text.count("(ceiling under-measured) roof") == 2
