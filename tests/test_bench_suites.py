"""The pytest-benchmark kernel suites (bench/conftest.py, bench/test_kernels.py, bench/suites.py), their JSON, the
regression check between runs, the one result shape of the script benchmarks (bench/records.py) and the report
(bench/report.py).

The suites run as users run them, `pytest bench --benchmark-only`, in a subprocess: without a GPU every case at
tiny shapes on the CPU (a smoke run, marked as such); with one, `--bench-smoke` keeps them at tiny shapes here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytest_benchmark")  # the [test] extra installs it, and matplotlib for the report

from helpers_bench import bench_module
from qwen2vl_fast.ops.registry import all_ops

records, report, suites, compare = (bench_module(m) for m in ("records", "report", "suites", "compare"))

REPO = Path(__file__).resolve().parents[1]


def run_bench(*args, cwd=REPO, timeout=600):
    """`python -m pytest <repo>/bench --benchmark-only --bench-smoke ...`, from the repository root by default
    (no torch.compile alternatives: on a GPU their compiles would take minutes, on the CPU they are off anyway)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("QWEN2VL_FAST_BENCH_OUT", "QWEN2VL_FAST_BENCH_BUNDLE", "PYTEST_ADDOPTS")}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", str(REPO / "bench"), "--benchmark-only", "--bench-smoke",
           "--bench-no-compile", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_smoke")
    out = tmp / "kernels.json"
    done = run_bench(f"--benchmark-json={out}", f"--benchmark-storage=file://{tmp / 'storage'}")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return dict(tmp=tmp, json=out, doc=json.loads(out.read_text()), stdout=done.stdout)


def test_every_registry_op_has_a_microbenchmark_case():
    specs = suites.collect("cpu", "float32", smoke=True)
    covered = {s.op for s in specs}
    assert set(all_ops()) <= covered, f"ops without a microbenchmark case: {sorted(set(all_ops()) - covered)}"
    for s in specs:  # every case races something, and ours (or the reference we run) is in it
        assert s.candidates and any(compare_side(s, c) == "ours" for c in s.candidates), s.label
    # the real shapes draw on both model families (Qwen2-VL's LayerNorm / QuickGELU, Qwen2.5-VL's RMSNorm ViT)
    from qwen2vl_fast.config import parse_config
    from qwen2vl_fast.presets import preset_config

    families = {parse_config(preset_config(p)).vision.uses_windows for p in suites.REAL_SHAPES.vision_presets}
    assert families == {True, False}


def compare_side(spec, name):
    return compare._variants(spec.case.candidates[name])[0].side


@pytest.mark.gpu
def test_real_shape_cases_collect_on_the_gpu():
    specs = suites.collect("cuda", "bfloat16", smoke=False)
    assert set(all_ops()) <= {s.op for s in specs}
    assert all(s.candidates for s in specs)


def test_smoke_run_is_marked_and_holds_the_harness_figures(smoke_run):
    doc, out = smoke_run["doc"], smoke_run["stdout"]
    cpu = not torch.cuda.is_available()
    assert "SMOKE RUN" in out
    assert doc["qwen2vl_fast"]["smoke"] is True and doc["machine_info"]["qwen2vl_fast"]["smoke"] is True
    assert doc["machine_info"]["qwen2vl_fast"]["environment"]["git_commit"]
    benches = doc["benchmarks"]
    assert {b["extra_info"]["op"] for b in benches} >= set(all_ops())
    for b in benches:
        info, stats = b["extra_info"], b["stats"]
        assert info["smoke"] is True and ("[CPU smoke]" if cpu else "[smoke]") in b["group"]
        # pytest-benchmark's statistics are those of the harness samples, replayed
        assert stats["median"] == pytest.approx(info["median_ms"] * 1e-3, rel=1e-9)
        assert stats["rounds"] == info["n"] and b["options"]["timer"].startswith("qwen2vl_fast-harness[")
        assert {"achieved_tflops", "achieved_gbps", "pct_of_roofline", "speedup_vs_best_alternative"} <= info.keys()
    raced = [b for b in benches if b["extra_info"]["side"] == "ours" and b["extra_info"]["best_alternative"]]
    assert raced and all(b["extra_info"]["speedup_vs_best_alternative"] > 0 for b in raced)


def test_compare_fail_catches_a_slower_commit(tmp_path):
    """--benchmark-autosave, then --benchmark-compare against a baseline made 10^6 x faster (a 'previous commit'):
    --benchmark-compare-fail=median:25% fails the run. From a folder of its own: pytest-benchmark compares only
    runs stored under the current folder (by default ./.benchmarks)."""
    sel = ("--bench-suites", "ops", "-k", "sample")
    first = run_bench(*sel, "--benchmark-autosave", cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    saved = sorted(tmp_path.rglob("0001_*.json"))
    assert len(saved) == 1
    doc = json.loads(saved[0].read_text())
    assert doc["benchmarks"]
    for b in doc["benchmarks"]:
        # a million times faster: far beyond any swing of CPU timings on a loaded machine
        b["stats"] = {k: v * 1e-6 if isinstance(v, float) and k not in ("ops",) else v for k, v in b["stats"].items()}
    saved[0].write_text(json.dumps(doc))
    second = run_bench(*sel, "--benchmark-compare=0001", "--benchmark-compare-fail=median:25%", cwd=tmp_path)
    assert second.returncode != 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "Performance has regressed" in second.stdout + second.stderr


def test_script_results_carry_the_same_entries(tmp_path):
    """Every result file written through bench/results.py also holds pytest-benchmark-shaped entries; older
    files are converted when read."""
    results = bench_module("results")
    payload = dict(dtype="float32", device="cpu", rows=[
        dict(preset="tiny-qwen2-vl", weights="int4", batch=2, decode_s_all=[0.03, 0.04], steps=3, tokens_per_s=171.4,
             ms_per_step=11.7, pct_of_bandwidth=50.0)])
    path = results.write_result("quant_decode", payload, tmp_path, env=dict(gpu="cpu", git_commit="abc"))
    doc = json.loads(path.read_text())
    (e,) = doc["benchmarks"]
    assert e["extra_info"]["kind"] == "decode" and e["extra_info"]["batch"] == 2
    assert e["stats"]["median"] == pytest.approx(0.035 / 3) and {"group", "name", "params", "stats"} <= e.keys()
    for f in sorted((REPO / "bench" / "results").glob("*.json")):  # committed results: converted on reading
        for info, entries in records.load(f):
            assert info["gpu"] and all("kind" in x["extra_info"] for x in entries)


@pytest.fixture(scope="module")
def model_smoke_results(tmp_path_factory):
    """The CPU smoke results of the two model-level benchmarks the report plots (decode, vision tower)."""
    out = tmp_path_factory.mktemp("model_results")
    assert bench_module("bench_quant_decode").main(
        ["--presets", "tiny-qwen2-vl", "--device", "cpu", "--dtype", "float32", "--batches", "1", "2",
         "--new-tokens", "3", "--prompt-tokens", "8", "--reps", "1", "--weights", "bf16", "int4",
         "--out-dir", str(out)]) == 0
    assert bench_module("bench_vision_tower").main(
        ["--presets", "tiny-qwen2-vl", "--cases", "smoke56x84", "--backends", "torch", "--device", "cpu",
         "--dtype", "float32", "--reps", "2", "--skip-transformers", "--out-dir", str(out)]) == 0
    return out


def test_report_writes_every_figure_and_lists_every_op(smoke_run, model_smoke_results, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    rc = report.main([str(smoke_run["json"]), str(model_smoke_results), "--out", str(out)])
    assert rc == 0
    for name in ("speedup", "roofline", "decode", "vit"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name
    table = (out / "report.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    missing = set(all_ops()) - set(rows)
    assert not missing, f"ops missing from the table: {sorted(missing)}"
    assert "(no result in the inputs)" not in table  # every op has a smoke result
    assert "## Decode" in table and "## Vision tower" in table and "CPU smoke" in table
    sources, entries = report.gather([smoke_run["json"], model_smoke_results])
    assert {e["extra_info"]["kind"] for e in entries} >= {"kernel", "decode", "vit"}
    assert all(s["smoke"] for s in sources)
    assert "CPU SMOKE RUN" in report.title("q", sources)


def test_report_of_no_data_still_writes_its_figures(tmp_path):
    pytest.importorskip("matplotlib")
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(dict(machine_info={}, commit_info={}, benchmarks=[])))
    written = report.write_report([empty], tmp_path / "out")
    assert all(p.stat().st_size > 0 for p in written.values())
    table = (tmp_path / "out" / "report.md").read_text()
    assert all(f"| {op} | (no result in the inputs)" in table for op in all_ops())


def test_entries_of_the_model_level_payloads(tmp_path):
    """generate, quant_decode and serve payloads, built with the scripts' own row functions, come back from their
    result files as decode / serve entries (model_forward, vision_tower and the kernel scripts: the committed
    results above)."""
    results = bench_module("results")
    gen, qd = bench_module("bench_generate"), bench_module("bench_quant_decode")
    from qwen2vl_fast.config import parse_config
    from qwen2vl_fast.presets import preset_config

    t = parse_config(preset_config("tiny-qwen2-vl")).text
    ceilings = dict(tflops=1.0, gbps=10.0)
    cost = gen.decode_cost(t, gen.config_weight_bytes(t, 4), 2, 8, 4, 4)
    payloads = {
        "generate": dict(device="cpu", dtype="float32", presets={"tiny-qwen2-vl": dict(
            decode=[gen.decode_row("ours", 2, [0.03, 0.05], cost, ceilings)], decode_costs={2: cost}, prefill=None)}),
        "quant_decode": dict(device="cpu", dtype="float32", rows=[qd.decode_row(
            dict(preset="tiny-qwen2-vl", weights="int4"), 1, [0.02, 0.03], 10**6, 10**3, ceilings, 3)]),
    }
    try:
        serve = bench_module("bench_serve")
        done = serve.RequestResult(index=0, expected_tokens=3, ok=True, start=0.0, end=0.3, ttft=0.1, latency=0.3,
                                   itl=[0.1, 0.1], output_tokens=3, prompt_tokens=5)
        payloads["serve"] = dict(device="cpu", target="engine", preset="tiny-qwen2-vl",
                                 runs=[dict(request_rate=float("inf"), **serve.summarize([done], 0.3))])
    except ImportError:  # the serving benchmark's client dependencies are missing
        pass
    for name, payload in payloads.items():
        path = results.write_result(name, payload, tmp_path, env=dict(gpu="cpu", git_commit="abc"))
        ((info, entries),) = records.load(path)
        assert entries and info["smoke"] and info["commit"] == "abc", name
        e = entries[0]
        kind = "serve" if name == "serve" else "decode"
        assert e["extra_info"]["kind"] == kind and e["stats"]["median"] > 0, (name, e)
        if kind == "decode":
            assert e["extra_info"]["tokens_per_s"] > 0 and e["extra_info"]["batch"] in (1, 2)
            assert e["stats"]["median"] == pytest.approx(0.04 / cost["steps"] if name == "generate" else 0.025 / 3)


def test_cases_past_the_run_budget_are_skipped_not_timed():
    ps = bench_module("pytest_suite")
    ctx = ps.BenchContext(device=torch.device("cpu"), smoke=True, dtypes=["float32"], suites=["ops"], reps=1,
                          warmup=0, compile_ok=False, use_auto=False, budget_s=1e-9)
    case_id = next(iter(ctx.specs()))
    got = ctx.result(case_id)
    assert got.rows and all(r.get("skipped") and "budget" in r["error"] for r in got.rows.values())
    assert ctx.machine_info()["budget_s"] == 1e-9
