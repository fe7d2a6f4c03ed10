"""Time budgets of the kernel benchmarks on the CPU (bench/compare.py Budget, run_cases): per case, per run, and a
run stopped by a signal or its alarm still writes what it timed (bench_vision_kernels.py timed out on the H200)."""

import json
import os
import signal
import time

import pytest
import torch

from helpers_bench import bench_module

compare = bench_module("compare")
results = bench_module("results")
bench_vision_kernels = bench_module("bench_vision_kernels")

CEIL = dict(tflops=1.0, gbps=1.0)


class Clock:
    """A settable clock in seconds: candidates advance it by the time they 'take'."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture()
def quiet_env(monkeypatch):
    for var in ("QWEN2VL_FAST_BENCH_OUT", "QWEN2VL_FAST_BENCH_BUNDLE", "QWEN2VL_FAST_BENCH_BUDGET_S"):
        monkeypatch.delenv(var, raising=False)


def _case(label, clock, takes_s, extra=None):
    """A case of candidates that each advance `clock` by takes_s[name] seconds per call."""
    make = lambda: (torch.randn(4),)  # noqa: E731

    def cand(name):
        def fn(x):
            clock.t += takes_s[name]
            if extra and name in extra:
                extra[name]()
            return x
        return compare.Candidate(fn, make, "ours" if name.startswith("ours") else "pytorch")
    return compare.Case(label, 1e3, 16, {name: cand(name) for name in takes_s})


def test_budget_arithmetic():
    clock = Clock()
    b = compare.Budget(total_s=100.0, case_s=30.0, clock=clock)
    assert b.left_s() == 100.0 and b.case_left_s() == 30.0 and not b.case_spent()
    clock.t = 25.0
    assert b.case_left_s() == 5.0
    clock.t = 31.0
    assert b.case_spent() and not b.total_spent()
    b.start_case()
    assert b.case_left_s() == 30.0
    clock.t = 80.0
    b.start_case()
    clock.t = 90.0
    assert b.case_left_s() == 10.0  # the run's budget binds first
    clock.t = 100.0
    assert b.total_spent() and b.case_spent()
    unbounded = compare.Budget(clock=clock)
    assert unbounded.left_s() == float("inf") and not unbounded.case_spent()
    assert unbounded.describe()["total_s"] is None
    with pytest.raises(ValueError):
        compare.Budget(total_s=0)
    with pytest.raises(ValueError):
        compare.Budget(case_s=-1.0)


def test_budget_from_env(monkeypatch):
    monkeypatch.setenv("QWEN2VL_FAST_BENCH_BUDGET_S", "280")
    assert compare.budget_from_env(None, 60.0).total_s == 280.0
    assert compare.budget_from_env(100.0, None).total_s == 100.0  # the command line wins
    monkeypatch.delenv("QWEN2VL_FAST_BENCH_BUDGET_S")
    assert compare.budget_from_env(None, 60.0).total_s is None


def test_an_over_budget_case_skips_its_remaining_candidates():
    clock = Clock()
    budget = compare.Budget(total_s=1000.0, case_s=10.0, clock=clock)
    case = _case("demo", clock, {"ours-a": 2.0, "torch-b": 0.0, "torch-c": 0.0})  # a's first call: 2 s
    rows, summary = compare.run_case(case, CEIL, device="cpu", warmup=1, rep=2, budget=budget)
    by = {r["impl"]: r for r in rows}
    # a: first call + 1 warm-up + 2 timed calls = 8 s, under 10 s; b's 0 s keeps it there: both timed
    assert "median_ms" in by["ours-a"] and "median_ms" in by["torch-b"]
    clock.t = 0.0
    budget.start_case()
    case = _case("demo", clock, {"ours-a": 3.0, "torch-b": 0.0, "torch-c": 0.0})  # 12 s > 10 s
    rows, summary = compare.run_case(case, CEIL, device="cpu", warmup=1, rep=2, budget=budget)
    by = {r["impl"]: r for r in rows}
    assert "median_ms" in by["ours-a"]
    assert by["torch-b"]["skipped"] and "budget" in by["torch-b"]["error"] and by["torch-c"]["skipped"]
    assert summary["best_pytorch"] is None and summary["best_ours"] == "ours-a"


def _result_file(tmp_path):
    return results.ResultFile("budget_demo", tmp_path, env={"gpu": "cpu"})


def _doc(out):
    return json.loads(out.path.read_text())


def test_cases_after_the_total_budget_are_skipped_and_named(tmp_path, quiet_env):
    clock = Clock()
    budget = compare.Budget(total_s=5.0, case_s=None, clock=clock)
    cases = [_case(f"case{i}", clock, {"ours-a": 1.0, "torch-b": 0.0}) for i in range(3)]
    out, payload = _result_file(tmp_path), {}
    compare.run_cases(iter(cases), CEIL, out, payload, device="cpu", warmup=0, rep=2, budget=budget)
    # case0: 3 calls of 1 s, case1: 3 more (6 s > 5 s after it): case2 is skipped
    assert [c["kernel"] for c in payload["cases"]] == ["case0", "case1"]
    assert payload["skipped_cases"] == ["case2"] and "stopped" not in payload
    doc = _doc(out)
    assert doc["result"]["skipped_cases"] == ["case2"] and doc["result"]["budget"]["total_s"] == 5.0


def test_a_stop_mid_case_keeps_the_candidates_timed_so_far(tmp_path, quiet_env):
    """SIGTERM (gpu_check.sh's `timeout`) while the second candidate runs: the first one's timing, the finished
    case and the reason are written, the remaining candidates are named as not timed."""
    clock = Clock()
    fired = []

    def sigterm_once():
        if not fired:
            fired.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this returns
    cases = [_case("done", clock, {"ours-a": 0.0, "torch-b": 0.0}),
             _case("cut", clock, {"ours-a": 0.0, "torch-b": 0.0, "torch-c": 0.0}, extra={"torch-b": sigterm_once}),
             _case("never", clock, {"ours-a": 0.0})]
    out, payload = _result_file(tmp_path), {}
    before = signal.getsignal(signal.SIGTERM)
    t0 = time.monotonic()
    compare.run_cases(iter(cases), CEIL, out, payload, device="cpu", warmup=0, rep=2,
                      budget=compare.Budget(clock=clock))
    assert time.monotonic() - t0 < 4.0
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    assert "SIGTERM" in payload["stopped"]
    assert [c["kernel"] for c in payload["cases"]] == ["done", "cut"]
    cut = payload["cases"][1]
    assert cut["partial"] and cut["best_ours"] == "ours-a"
    by = {r["impl"]: r for r in payload["rows"] if r["kernel"] == "cut"}
    assert "median_ms" in by["ours-a"] and by["torch-b"]["skipped"] and by["torch-c"]["skipped"]
    doc = _doc(out)
    assert doc["complete"] is False and doc["result"]["stopped"] == payload["stopped"]
    assert len(doc["result"]["rows"]) == 2 + 3


def test_a_stop_swallowed_inside_a_candidate_still_stops_the_run(tmp_path, quiet_env):
    """A signal whose Stopped is replaced on its way out (a CUDA graph capture's exit raises its own error, which
    the harness turns into a CaptureError) still stops the run after that candidate: later candidates and cases
    are not run."""
    clock = Clock()

    def swallowing():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except compare.Stopped:
            raise RuntimeError("capture invalidated") from None
    cases = [_case("cut", clock, {"ours-a": 0.0, "torch-b": 0.0, "torch-c": 0.0}, extra={"torch-b": swallowing}),
             _case("never", clock, {"ours-a": 0.0})]
    out, payload = _result_file(tmp_path), {}
    compare.run_cases(iter(cases), CEIL, out, payload, device="cpu", warmup=0, rep=2,
                      budget=compare.Budget(clock=clock))
    assert "SIGTERM" in payload["stopped"] and [c["kernel"] for c in payload["cases"]] == ["cut"]
    by = {r["impl"]: r for r in payload["rows"]}
    assert "median_ms" in by["ours-a"] and "capture invalidated" in by["torch-b"]["error"]
    assert by["torch-c"]["skipped"] and payload["cases"][0]["partial"]


def test_the_total_budget_alarm_stops_a_stuck_candidate(tmp_path, quiet_env):
    """A candidate stuck in one call (a compile, a hung timing loop) is stopped at the run's total budget."""
    make = lambda: (torch.randn(4),)  # noqa: E731
    stuck = compare.Case("stuck", 1e3, 16, {"ours-a": compare.Candidate(lambda x: x, make, "ours"),
                                            "torch-b": compare.Candidate(lambda x: time.sleep(30), make)})
    out, payload = _result_file(tmp_path), {}
    t0 = time.monotonic()
    compare.run_cases(iter([stuck]), CEIL, out, payload, device="cpu", warmup=0, rep=2,
                      budget=compare.Budget(total_s=0.5))
    assert time.monotonic() - t0 < 5.0
    assert "SIGALRM" in payload["stopped"] and "budget" in payload["stopped"]
    assert payload["cases"][0]["partial"] and _doc(out)["result"]["cases"][0]["best_ours"] == "ours-a"
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0.0  # disarmed


def test_vision_kernels_smoke_with_budget_flags(tmp_path, quiet_env, monkeypatch):
    """The script takes --budget-s / --case-budget-s (and the gpu_check.sh variable); a budget spent before the
    first case skips every case, named, and the run still finishes its file."""
    monkeypatch.setenv("QWEN2VL_FAST_BENCH_BUDGET_S", "1e-9")
    args = bench_vision_kernels.parse_args(["--smoke", "--device", "cpu"])
    assert args.budget_s is None and args.case_budget_s == 60.0
    out = tmp_path / "results"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = bench_vision_kernels.main(["--smoke", "--device", "cpu", "--reps", "1", "--no-auto",
                                        "--out-dir", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    doc = json.loads(next(out.glob("vision_kernels-*.json")).read_text())
    result = doc["result"]
    assert doc["complete"] is True and result["cases"] == [] and result["budget"]["total_s"] == 1e-9
    assert [c.split(" ")[0] for c in result["skipped_cases"]] == [
        "varlen_attention", "varlen_attention", "add_layer_norm", "add_rms_norm", "vision_rotary", "patch_embed",
        "patch_embed_frames"]
