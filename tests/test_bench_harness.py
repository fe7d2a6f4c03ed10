"""The benchmark harness on the CPU: timing, roofline arithmetic, FLOP counts, result files, benchmark inputs."""

import json
import math
import re
import time

import pytest
import torch

from helpers_bench import bench_module
from qwen2vl_fast.config import parse_config
from qwen2vl_fast.presets import preset_config

bench_model_forward = bench_module("bench_model_forward")
flops = bench_module("flops")
harness = bench_module("harness")
results = bench_module("results")
roofline = bench_module("roofline")

KEYS = {"median_ms", "p20_ms", "p80_ms", "n"}


def test_time_fn_on_a_sleep():
    t = harness.time_fn(lambda: time.sleep(0.002), warmup=1, rep=7, device="cpu")
    assert KEYS <= t.keys() and t["n"] == 7 and t["method"] == "perf_counter"
    assert 1.9 <= t["min_ms"] <= t["p20_ms"] <= t["median_ms"] <= t["p80_ms"] < 500


def test_time_fn_cycles_through_inputs():
    seen = []
    inputs = [(i, f"x{i}") for i in range(3)]
    t = harness.time_fn(lambda i, s: seen.append((i, s)), warmup=2, rep=5, inputs=inputs, device="cpu")
    assert t["n"] == 5
    assert [i for i, _ in seen] == [0, 1, 2, 0, 1, 2, 0]  # warm-up calls rotate too


def test_time_fn_builds_rotating_inputs_from_make_fn():
    made = []

    def make():
        made.append(torch.randn(256))  # 1 KiB each
        return made[-1]

    seen = []
    harness.time_fn(lambda x: seen.append(x.data_ptr()), warmup=0, rep=8, inputs=make, rotate_bytes=4096)
    assert len(made) == 4 and len(set(seen)) == 4


def test_make_rotating_inputs_default_is_twice_l2():
    copies = harness.make_rotating_inputs(lambda: (torch.empty(2**20), 3))  # 4 MiB a copy on the CPU
    assert len(copies) == math.ceil(2 * harness.DEFAULT_L2_BYTES / 2**22)
    assert all(isinstance(c, tuple) and c[1] == 3 for c in copies)
    assert len(harness.make_rotating_inputs(lambda: torch.empty(8), 10**9, max_copies=5)) == 5


def test_time_fn_rejects_bad_arguments():
    with pytest.raises(ValueError):
        harness.time_fn(lambda: None, rep=0, device="cpu")
    with pytest.raises(ValueError):
        harness.time_fn(lambda x: None, inputs=[(1,)], rotate_bytes=10, device="cpu")


def test_summarize_quantiles_interpolate_like_numpy():
    s = harness.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median_ms"], s["p20_ms"], s["p80_ms"], s["n"]) == (3.0, pytest.approx(1.8), pytest.approx(4.2), 5)


def test_roofline_fraction_compute_and_memory_bound():
    ceil = dict(tflops=100.0, gbps=1000.0)  # ridge: 1e14 / 1e12 = 100 FLOP/byte
    r = roofline.roofline_fraction(1e12, 1e9, 20.0, ceil)  # intensity 1000: compute; floor 10 ms
    assert r["bound"] == "compute" and r["ridge"] == pytest.approx(100.0) and r["intensity"] == pytest.approx(1e3)
    assert r["achieved_tflops"] == pytest.approx(50.0) and r["pct_of_tflops"] == pytest.approx(50.0)
    assert r["achieved_gbps"] == pytest.approx(50.0) and r["pct_of_gbps"] == pytest.approx(5.0)
    assert r["floor_ms"] == pytest.approx(10.0) and r["pct_of_roofline"] == pytest.approx(50.0)
    m = roofline.roofline_fraction(1e9, 1e9, 4.0, ceil)  # intensity 1: memory; floor 1 ms
    assert m["bound"] == "memory" and m["achieved_gbps"] == pytest.approx(250.0)
    assert m["floor_ms"] == pytest.approx(1.0) and m["pct_of_roofline"] == pytest.approx(25.0)
    assert roofline.roofline_fraction(1e9, 0, 1.0, ceil)["bound"] == "compute"
    with pytest.raises(ValueError):
        roofline.roofline_fraction(1e9, 1e9, 0.0, ceil)


def test_measured_ceilings_on_cpu_are_positive_and_cached():
    bw = roofline.measure_copy_bandwidth("cpu", nbytes=2**20, rep=3)
    tf = roofline.measure_matmul_tflops("cpu", torch.float32, n=64, rep=3)
    assert 0 < bw < 1e5 and 0 < tf < 1e3
    assert roofline.measure_copy_bandwidth("cpu", nbytes=2**20) == bw  # cached: the same number, not remeasured
    assert roofline.measure_matmul_tflops("cpu", torch.float32, n=64) == tf


def test_flop_counts_match_transformers_weight_shapes():
    # Matmul weights counted from transformers' modules built on the meta device (checked once, 2026-11).
    c2, c3 = parse_config(preset_config("qwen2-vl-2b")), parse_config(preset_config("qwen2.5-vl-3b"))
    assert flops.vision_matmul_params(c2.vision) == dict(per_patch=630650880, per_merged_token=34078720)
    assert flops.text_matmul_params(c2.text) == 1543569408
    assert flops.vision_matmul_params(c3.vision) == dict(per_patch=631470080, per_merged_token=36700160)
    assert flops.text_matmul_params(c3.text) == 3085697024
    # 10x6 patches -> 5x3 merged units -> windows of 4x3 and 1x3 units, 4 patches each.
    assert flops.vision_sequences(c3.vision, [(1, 10, 6)], windowed=True) == [48, 12]
    assert flops.vision_sequences(c3.vision, [(2, 10, 6)], windowed=False) == [60, 60]
    t = flops.text_flops(c2.text, 3)
    assert t["attention"] == 4 * 1536 * 6 * 28  # 3 tokens: 6 causal query-key pairs per layer


def test_write_result_is_valid_json_with_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(results.OUT_ENV, raising=False)
    payload = dict(ms=torch.tensor(1.5), dtype=torch.bfloat16, bad=float("nan"), rows=[(1, 2)])
    path = results.write_result("demo", payload, tmp_path)
    assert path.parent == tmp_path
    assert re.fullmatch(r"demo-[a-z0-9-]+-\d{8}-\d{6}\.json", path.name)

    def no_nan(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    doc = json.loads(path.read_text(), parse_constant=no_nan)
    env = doc["environment"]
    for key in ("gpu", "torch", "cuda", "triton", "transformers", "python", "git_commit", "git_dirty"):
        assert key in env
    assert doc["name"] == "demo" and env["torch"] == torch.__version__
    assert doc["result"] == dict(ms=1.5, dtype="bfloat16", bad="nan", rows=[[1, 2]])
    assert results.write_result("demo", {}, tmp_path, env=env) != path  # never overwrites, even in one second
    assert len(list(tmp_path.glob("demo-*.json"))) == 2
    with pytest.raises(ValueError):
        results.write_result("../escape", {}, tmp_path)


def test_write_result_also_copies_to_the_out_env_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(results.OUT_ENV, str(tmp_path / "out"))
    path = results.write_result("demo", dict(x=1), tmp_path / "results", env=dict(gpu="NVIDIA H100 80GB HBM3"))
    assert path.name.startswith("demo-nvidia-h100-80gb-hbm3-")
    copy = tmp_path / "out" / path.name
    assert copy.read_text() == path.read_text()


def test_model_forward_inputs_layout():
    cfg = parse_config(preset_config("qwen2-vl-2b"))
    x = bench_model_forward.build_inputs(cfg, 1344, 896, 64, seed=0)
    ids = x["input_ids"][0].tolist()
    assert x["image_grid_thw"].tolist() == [[1, 64, 96]] and x["pixel_values"].shape == (6144, 1176)
    assert len(ids) == 64 + 2 + 1536 and ids.count(151655) == 1536 and ids[0] == 151644
    start = ids.index(151652)
    assert ids[start + 1537] == 151653 and x["attention_mask"].shape == (1, len(ids))
    assert sum(1 for i in ids if i < 1000) == 63
    with pytest.raises(SystemExit):
        bench_model_forward.build_inputs(cfg, 1344, 900, 64, seed=0)


def test_compare_logits():
    ref = torch.tensor([[[1.0, 2.0], [3.0, -4.0]]])
    d = bench_model_forward.compare_logits(ref + torch.tensor([0.0, 0.5]), ref)
    assert d["max_abs"] == 0.5 and d["max_rel"] == pytest.approx(0.125) and d["top1_agree"] == 1.0
    assert "error" in bench_model_forward.compare_logits(ref[:, :1], ref)


# ------------------------------------------------------------------------------------------------------------
# The CUDA timing methods, on a simulated device (helpers_bench.FakeCuda): what each method includes and excludes.

compare = bench_module("compare")
KERNEL_MS, LAUNCH_MS = 0.010, 0.020  # a 10 us kernel whose launch costs the host 20 us: launch-bound


@pytest.fixture()
def fake_cuda(monkeypatch):
    from helpers_bench import FakeCuda

    fake = FakeCuda(launch_ms=LAUNCH_MS)
    monkeypatch.setattr(harness, "_cuda_api", lambda: fake)
    monkeypatch.setattr(harness, "_host_ms", fake.now_ms)
    monkeypatch.setattr(harness, "_SLEEP_CYCLES_PER_MS", {})
    return fake


def test_events_on_an_idle_queue_time_the_launch_but_queue_and_graph_do_not(fake_cuda):
    def fn():
        fake_cuda.kernel(KERNEL_MS)

    events = harness.time_fn(fn, warmup=2, rep=9, device="cuda", method="events")
    assert events["method"] == "cuda-events" and events["median_ms"] > 2 * KERNEL_MS  # mostly the launch
    queue = harness.time_fn(fn, warmup=2, rep=9, device="cuda", method="queue")
    assert queue["method"] == "cuda-queue" and queue["median_ms"] == pytest.approx(KERNEL_MS)
    assert queue["queue_drained"] == 0 and queue["n"] == 9
    graph = harness.time_fn(fn, warmup=2, rep=9, device="cuda")  # the default: "kernel" = graph when capturable
    assert graph["method"] == "cuda-graph" and graph["median_ms"] == pytest.approx(KERNEL_MS)
    assert graph["calls_per_sample"] == harness.calls_per_graph(KERNEL_MS) == 100 and graph["n"] == 9


def test_kernel_method_falls_back_to_the_queue_when_capture_fails(fake_cuda):
    def fn():
        fake_cuda.kernel(KERNEL_MS, capturable=False)

    t = harness.time_fn(fn, warmup=1, rep=5, device="cuda")
    assert t["method"] == "cuda-queue" and t["median_ms"] == pytest.approx(KERNEL_MS)
    with pytest.raises(harness.CaptureError):
        harness.time_fn(fn, warmup=1, rep=5, device="cuda", method="graph")


def test_a_graph_of_no_device_work_is_refused(fake_cuda):
    with pytest.raises(harness.CaptureError, match="no device work"):
        harness.time_fn(lambda: None, warmup=1, rep=3, device="cuda", method="graph")


def test_a_drained_queue_is_retried_with_a_longer_spin(fake_cuda, monkeypatch):
    harness.time_fn(lambda: fake_cuda.kernel(KERNEL_MS), warmup=1, rep=2, device="cuda", method="queue")
    fake_cuda.cycles_per_ms *= 8  # the clock ramped after the calibration: every spin now ends 8x sooner
    t = harness.time_fn(lambda: fake_cuda.kernel(KERNEL_MS), warmup=1, rep=6, device="cuda", method="queue")
    assert t["queue_retries"] >= 1 and t["queue_drained"] == 0
    assert t["median_ms"] == pytest.approx(KERNEL_MS)  # the retried batch's numbers, not the drained one's
    t = harness.time_fn(lambda: fake_cuda.kernel(KERNEL_MS), warmup=1, rep=6, device="cuda", method="queue")
    assert t["queue_retries"] == 0  # learned: later batches spin long enough at once
    monkeypatch.setattr(harness, "spin_ms", lambda host: 0.0)  # never long enough: counted, not hidden
    t = harness.time_fn(lambda: fake_cuda.kernel(KERNEL_MS), warmup=1, rep=6, device="cuda", method="queue")
    assert t["queue_drained"] == 1


def test_a_call_that_blocks_the_host_is_timed_without_ever_longer_spins(fake_cuda):
    """A call that synchronizes drains every queue: the host waits for the spin itself. It used to be retried with
    spins sized from host times that included the previous spin (about 3x per attempt, for later batches too):
    rep=3 of a 0.5 ms call spun for ~10 simulated hours, and bench_vision_kernels.py ran out of its step's time."""
    def blocking():
        fake_cuda.kernel(0.5, capturable=False)
        fake_cuda.synchronize()

    t = harness.time_fn(blocking, warmup=1, rep=30, device="cuda")
    assert t["method"] == "cuda-queue" and t["host_blocking"] and t["n"] == 30
    assert t["median_ms"] == pytest.approx(0.5, rel=0.1)
    assert fake_cuda.host < 1000.0  # simulated ms in all: calibration, graph attempt, queue
    assert max(fake_cuda.sleeps) <= harness.MAX_SPIN_MS * harness.MAX_SPIN_RATE_FACTOR
    calibrated = harness._SLEEP_CALIBRATED["0"]
    assert harness._SLEEP_CYCLES_PER_MS["0"] <= harness.MAX_SPIN_RATE_FACTOR * calibrated
    # and a call that does not block is still queued behind a spin, undrained
    t = harness.time_fn(lambda: fake_cuda.kernel(KERNEL_MS), warmup=1, rep=6, device="cuda", method="queue")
    assert not t["host_blocking"] and t["queue_drained"] == 0 and t["median_ms"] == pytest.approx(KERNEL_MS)


def test_planned_spins_are_bounded():
    assert harness.planned_spin_ms(1, 2.0) == pytest.approx(3.2)
    assert harness.planned_spin_ms(64, 1e4) == harness.MAX_SPIN_MS


def test_the_spin_covers_the_host_enqueue_of_a_batch(fake_cuda):
    harness.time_fn(lambda: fake_cuda.kernel(KERNEL_MS), warmup=1, rep=100, device="cuda", method="queue")
    batch = harness.queue_batch(LAUNCH_MS)
    spins = fake_cuda.sleeps[4:]  # after the four calibration spins
    assert batch == 64 and len(spins) == 2  # 100 calls: batches of 64 and 36
    assert spins[0] >= batch * (LAUNCH_MS + 2 * fake_cuda.event_ms)


def test_graph_replays_cycle_through_every_rotating_copy(fake_cuda):
    seen = []

    def fn(x):
        seen.append(x.data_ptr())
        fake_cuda.kernel(KERNEL_MS)

    inputs = [(torch.randn(4),) for _ in range(7)]
    t = harness.time_fn(fn, warmup=1, rep=3, inputs=inputs, device="cuda")
    r = t["calls_per_sample"]
    assert r % 7 == 0 and r >= 100 and t["input_copies"] == 7
    captured = seen[-r:]  # the capture's calls: each copy equally often
    assert {captured.count(x[0].data_ptr()) for x in inputs} == {r // 7}


def test_calls_per_graph_queue_batch_and_spin():
    assert harness.calls_per_graph(0.5) == 2 and harness.calls_per_graph(5.0) == 1
    assert harness.calls_per_graph(1e-5) == harness.MAX_CALLS_PER_GRAPH
    assert harness.calls_per_graph(0.5, n_inputs=3) == 3 and harness.calls_per_graph(0.01, n_inputs=16) == 112
    assert harness.queue_batch(1.0) == 2 and harness.queue_batch(1e-4) == harness.QUEUE_MAX_BATCH
    assert harness.queue_batch(50.0) == 1
    assert harness.spin_ms(2.0) == pytest.approx(3.2)
    assert harness.rotation_copies(1000, 4096) == 5 and harness.rotation_copies(0, 4096) == 1
    assert harness.rotation_copies(1, 10**9, max_copies=9) == 9


def test_memory_bound_is_intensity_under_the_ridge():
    ceil = dict(tflops=800.0, gbps=4000.0)  # ridge 200 FLOP/B
    assert roofline.is_memory_bound(2 * 4096 * 4096, 2 * 4096 * 4096, ceil)  # a GEMV: 1 FLOP/B
    assert not roofline.is_memory_bound(2 * 6144 * 1280 * 1280, 2 * (2 * 6144 * 1280 + 1280**2), ceil)
    assert not roofline.is_memory_bound(1e9, 0, ceil)


def _case(fake, capturable_b=True, flops=1e3, nbytes=1024):
    make = lambda: (torch.randn(nbytes // 4),)  # noqa: E731
    return compare.Case("demo", flops, nbytes, {
        "ours-a": compare.Candidate(lambda x: fake.kernel(0.005), make, "ours"),
        "torch-b": compare.Candidate(lambda x: fake.kernel(0.010, capturable=capturable_b), make)})


def test_one_method_for_every_candidate_of_a_case(fake_cuda):
    ceil = dict(tflops=1.0, gbps=1.0)
    rows, summary = compare.run_case(_case(fake_cuda), ceil, device="cuda", warmup=1, rep=3)
    assert {r["method"] for r in rows} == {"cuda-graph"} and summary["method"] == "cuda-graph"
    rows, summary = compare.run_case(_case(fake_cuda, capturable_b=False), ceil, device="cuda", warmup=1, rep=3)
    assert {r["method"] for r in rows} == {"cuda-queue"}  # b cannot be captured: a is queued too
    by = {r["impl"]: r for r in rows}
    assert by["ours-a"]["median_ms"] == pytest.approx(0.005) and by["torch-b"]["median_ms"] == pytest.approx(0.010)
    assert summary["speedup_best_ours"] == pytest.approx(2.0) and summary["best_pytorch"] == "torch-b"
    assert by["torch-b"]["speedup_vs_best_pytorch"] == pytest.approx(1.0)


def test_memory_bound_cases_rotate_past_twice_l2_and_compute_bound_ones_do_not(fake_cuda):
    ceil = dict(tflops=1.0, gbps=1.0)  # ridge 1000 FLOP/B; the fake L2 is 4 KiB
    rows, summary = compare.run_case(_case(fake_cuda, flops=10.0), ceil, device="cuda", warmup=1, rep=2)
    assert summary["memory_bound"] and summary["l2_rotated"]
    assert all(r["input_copies"] == 8 and r["rotated_bytes"] == 8 * 1024 for r in rows)  # 2 x 4 KiB / 1 KiB
    rows, summary = compare.run_case(_case(fake_cuda, flops=1e7), ceil, device="cuda", warmup=1, rep=2)
    assert not summary["memory_bound"] and all(r["input_copies"] == 1 for r in rows)


def test_a_failing_candidate_is_recorded_and_variants_are_tried_in_order():
    def fails(x):
        raise RuntimeError("no kernel for this shape")
    make = lambda: (torch.randn(8),)  # noqa: E731
    case = compare.Case("demo", 1e6, 64, {
        "ours-x": compare.Candidate(fails, make, "ours"),
        "sdpa": [compare.Candidate(fails, make, tag="gqa"), compare.Candidate(lambda x: x * 2, make, tag="repeat-kv")]})
    rows, summary = compare.run_case(case, dict(tflops=1.0, gbps=1.0), device="cpu", warmup=0, rep=2)
    by = {r["impl"]: r for r in rows}
    assert "no kernel" in by["ours-x"]["error"] and by["sdpa[repeat-kv]"]["method"] == "perf_counter"
    assert summary["best_ours"] is None and summary["best_pytorch"] == "sdpa"


def test_result_file_is_rewritten_as_it_goes_and_bundled(tmp_path, monkeypatch):
    bundle = tmp_path / "out" / "bench_results.json"
    monkeypatch.delenv(results.OUT_ENV, raising=False)
    monkeypatch.setenv(results.BUNDLE_ENV, str(bundle))
    env = dict(gpu="NVIDIA H200")
    f = results.ResultFile("demo", tmp_path / "results", env=env)
    f.update(dict(rows=[1]))
    doc = json.loads(f.path.read_text())
    assert doc["complete"] is False and doc["result"] == dict(rows=[1])
    f.finish(dict(rows=[1, 2]))
    results.write_result("other", dict(x=1), tmp_path / "results", env=env)
    files = json.loads(bundle.read_text())["files"]
    assert set(files) == {f.path.name} | {p.name for p in (tmp_path / "results").glob("other-*.json")}
    assert files[f.path.name]["complete"] is True and files[f.path.name]["result"] == dict(rows=[1, 2])
    written = results.unbundle(bundle, tmp_path / "unbundled")
    assert sorted(p.name for p in written) == sorted(files)
    assert json.loads((tmp_path / "unbundled" / f.path.name).read_text()) == files[f.path.name]
