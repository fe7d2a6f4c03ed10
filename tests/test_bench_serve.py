"""bench/bench_serve.py: the metrics arithmetic on synthetic timings, the arrival schedule, the prompt draw, and
both targets end to end on the tiny checkpoint on the CPU (engine in-process; http against the package's server,
in this process under uvicorn and spawned as `qwen2vl-fast serve`), with the static-batch baseline.
Numbers are checked for shape and consistency, not speed (a tiny model on a shared CPU says nothing about it)."""

import asyncio
import json
import math
import socket
import threading
import time

import numpy as np
import pytest
import torch

from helpers_bench import bench_module

bench_serve = bench_module("bench_serve")
R = bench_serve.RequestResult
SIZES = ["56x56", "84x56", "112x84"]


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    """No copies of the results elsewhere, no gpu_check.sh budget (unless a test sets one)."""
    for name in ("QWEN2VL_FAST_BENCH_OUT", "QWEN2VL_FAST_BENCH_BUNDLE", "QWEN2VL_FAST_BENCH_BUDGET_S"):
        monkeypatch.delenv(name, raising=False)


# -- arithmetic -------------------------------------------------------------------------------------------------

def test_percentile_is_linear_interpolation():
    assert bench_serve.percentile([4, 1, 3, 2], 50) == 2.5
    assert bench_serve.percentile(list(range(1, 102)), 99) == 100.0
    assert bench_serve.percentile([10.0, 20.0], 99) == pytest.approx(19.9)
    assert bench_serve.percentile([7.0], 99) == 7.0
    assert math.isnan(bench_serve.percentile([], 50))


def test_summarize_exact_values():
    a = R(0, 4, ok=True, ttft=0.1, latency=0.4, itl=[0.1, 0.1, 0.1], output_tokens=4, prompt_tokens=10)
    b = R(1, 3, ok=True, ttft=0.3, latency=0.5, itl=[0.05, 0.15], output_tokens=3, prompt_tokens=20)
    c = R(2, 2, ok=True, ttft=0.2, latency=0.2, itl=[], output_tokens=1, prompt_tokens=5)  # stopped early
    d = R(3, 5, ok=False, error="RuntimeError: HTTP 400: too long")
    m = bench_serve.summarize([a, b, c, d], duration_s=2.0)
    assert (m["num_requests"], m["completed"], m["failed"]) == (4, 3, 1)
    assert m["errors"] == ["request 3: RuntimeError: HTTP 400: too long"]
    assert m["total_output_tokens"] == 8 and m["total_input_tokens"] == 35
    assert m["expected_output_tokens"] == 14 and m["output_len_mismatches"] == 1
    assert m["request_throughput"] == 1.5 and m["output_throughput"] == 4.0
    assert m["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert m["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert m["ttft_ms"]["p99"] == pytest.approx(298.0)  # 200 + 0.98 * (300 - 200)
    # TPOT per request with > 1 token: (0.4 - 0.1) / 3 = 0.1, (0.5 - 0.3) / 2 = 0.1
    assert m["tpot_ms"] == pytest.approx(dict(mean=100.0, p50=100.0, p99=100.0))
    # ITL pooled: [0.1, 0.1, 0.1, 0.05, 0.15] -> sorted [50, 100, 100, 100, 150] ms
    assert m["itl_ms"]["mean"] == pytest.approx(100.0)
    assert m["itl_ms"]["p50"] == pytest.approx(100.0)
    assert m["itl_ms"]["p99"] == pytest.approx(148.0)  # 100 + 0.96 * 50
    assert m["e2el_ms"]["mean"] == pytest.approx(1100 / 3)
    assert m["e2el_ms"]["p50"] == pytest.approx(400.0)
    assert m["e2el_ms"]["p99"] == pytest.approx(498.0)


def test_summarize_with_no_success():
    m = bench_serve.summarize([R(0, 4, error="x")], duration_s=1.0)
    assert m["completed"] == 0 and m["failed"] == 1 and m["output_throughput"] == 0.0
    assert math.isnan(m["ttft_ms"]["p50"])


def test_static_baseline_counts_useful_tokens():
    class FakeEngine:  # generate's contract: one Completion per prompt, max_new_tokens tokens each
        def __init__(self):
            self.calls = []

        def generate(self, chats, max_new_tokens, ignore_eos, temperature):
            self.calls.append((len(chats), max_new_tokens))
            return [type("C", (), {"token_ids": [0] * max_new_tokens})() for _ in chats]

    specs = [bench_serve.RequestSpec(i, None, "hi", n) for i, n in enumerate([3, 5, 2, 4, 4])]
    eng = FakeEngine()
    b = bench_serve.static_baseline(eng, specs, max_batch=2)
    assert eng.calls == [(2, 5), (2, 4), (1, 4)]  # each batch runs to its longest output
    assert b["num_batches"] == 3 and b["useful_tokens"] == 18 and b["generated_tokens"] == 2 * 5 + 2 * 4 + 4
    assert b["tokens_per_s"] == pytest.approx(18 / b["total_s"])
    assert b["request_throughput"] == pytest.approx(5 / b["total_s"]) and b["rows_short"] == 0


# -- the schedule and the prompts -----------------------------------------------------------------------------

def test_poisson_schedule_is_seeded_with_mean_gap_one_over_rate():
    a = bench_serve.arrival_offsets(4000, rate=20.0, seed=3)
    assert a == bench_serve.arrival_offsets(4000, rate=20.0, seed=3)
    assert a != bench_serve.arrival_offsets(4000, rate=20.0, seed=4)
    assert a[0] == 0.0 and all(y >= x for x, y in zip(a, a[1:]))
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(1 / 20, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.08)  # exponential: coefficient of variation 1
    bursty = np.diff(bench_serve.arrival_offsets(4000, rate=20.0, seed=3, burstiness=0.25))
    assert bursty.mean() == pytest.approx(1 / 20, rel=0.1) and bursty.std() / bursty.mean() > 1.6  # 1/sqrt(k)=2
    assert bench_serve.arrival_offsets(5, math.inf, seed=0) == [0.0] * 5


def test_run_load_issues_at_the_offsets_and_caps_concurrency():
    issued, active, peak = [], [0], [0]

    async def send(spec):
        issued.append((spec.index, time.perf_counter()))
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        await asyncio.sleep(0.02)
        active[0] -= 1
        return R(spec.index, 1, ok=True, output_tokens=1)

    specs = [bench_serve.RequestSpec(i, None, "x", 1) for i in range(8)]
    t0 = time.perf_counter()
    outcomes, duration, offsets = asyncio.run(bench_serve.run_load(specs, send, rate=100.0, seed=1))
    assert [o.index for o in outcomes] == list(range(8)) and duration >= offsets[-1]
    for i, t in issued:
        assert t - t0 >= offsets[i] - 1e-3
    issued.clear()
    asyncio.run(bench_serve.run_load(specs, send, rate=math.inf, seed=1, max_concurrency=3))
    assert peak[0] == 3 and len(issued) == 8


def test_prompts_are_seeded_mixed_and_distinct():
    sizes = [bench_serve._image_size(s) for s in SIZES + ["none"]]
    a = bench_serve.make_prompts(40, sizes, 5, output_len=8, range_ratio=0.5, seed=7, images=False)
    b = bench_serve.make_prompts(40, sizes, 5, output_len=8, range_ratio=0.5, seed=7, images=False)
    assert [(s.image_size, s.text, s.output_len) for s in a] == [(s.image_size, s.text, s.output_len) for s in b]
    assert {s.image_size for s in a} == set(sizes)
    assert {s.output_len for s in a} <= set(range(4, 13)) and len({s.output_len for s in a}) > 3
    img = bench_serve.make_prompts(6, sizes[:2], 5, output_len=8, range_ratio=0.5, seed=7)
    uris = [s.image_uri for s in img]
    assert all(u.startswith("data:image/png;base64,") for u in uris) and len(set(uris)) == 6
    warm = bench_serve.warmup_prompts(img, seed=7, count=4)
    assert {w.image_size for w in warm} == {s.image_size for s in img} and not {w.image_uri for w in warm} & set(uris)
    body = bench_serve.chat_payload(img[0], "m")
    assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["ignore_eos"]
    assert body["messages"][0]["content"][0] == {"type": "image_url", "image_url": {"url": uris[0]}}
    assert "ignore_eos" not in bench_serve.chat_payload(img[0], "m", ignore_eos=False)


# -- end to end ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from qwen2vl_fast.testing.checkpoint_writer import write_random_checkpoint

    return str(write_random_checkpoint(tmp_path_factory.mktemp("serve_ckpt") / "tiny", "tiny-qwen2-vl",
                                       dtype=torch.float32, seed=0))


COMMON = ["--device", "cpu", "--dtype", "float32", "--num-prompts", "12", "--output-len", "6", "--range-ratio",
          "0.34", "--image-sizes", *SIZES, "--prompt-words", "6", "--max-batch", "4", "--max-len", "512"]


def _load_result(out):
    files = sorted(out.glob("serve-*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["name"] == "serve" and doc["complete"] and "gpu" in doc["environment"]
    return doc["result"]


def _check_run(run, expected_tokens, rate):
    assert run["request_rate"] == rate
    assert run["completed"] == 12 and run["failed"] == 0, run["errors"]
    assert run["total_output_tokens"] == expected_tokens and run["output_len_mismatches"] == 0
    assert run["request_throughput"] > 0 and run["output_throughput"] > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        s = run[key]
        assert 0 < s["p50"] <= s["p99"] and s["mean"] > 0, (key, s)
    assert run["ttft_ms"]["p99"] <= run["e2el_ms"]["p99"]
    assert len(run["requests"]) == 12 and all(r["ok"] and r["prompt_tokens"] > 0 for r in run["requests"])


def test_engine_target_end_to_end_with_baseline(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "results"
    rc = bench_serve.main(["--target", "engine", "--model", tiny_ckpt, *COMMON, "--request-rate", "inf", "40",
                           "--out-dir", str(out)])
    assert rc == 0
    r = _load_result(out)
    expected = r["expected_output_tokens"]
    lo, hi = r["output_len_range"]
    assert (lo, hi) == (3, 8) and 12 * lo <= expected <= 12 * hi
    runs = r["runs"]
    _check_run(runs[0], expected, "inf")
    _check_run(runs[1], expected, 40.0)
    b = r["static_baseline"]
    assert "error" not in b, b.get("error")
    assert b["num_batches"] == 3 and b["useful_tokens"] == expected and b["generated_tokens"] >= expected
    assert b["rows_short"] == 0 and b["tokens_per_s"] > 0 and b["total_s"] > 0
    assert set(r["vs_static"]) == {"inf", "40"} and r["vs_static"]["inf"]["output_throughput_vs_static"] > 0
    printed = capsys.readouterr().out
    assert "static baseline" in printed and "TTFT p99 ms" in printed and "ITL p50 ms" in printed
    print(printed)


class _Uvicorn:
    """The package's server app over `engine`, served by uvicorn in a thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    pytest.importorskip("fastapi")
    from qwen2vl_fast.engine.engine import Engine
    from qwen2vl_fast.server import create_app

    engine = Engine.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32, max_batch=4, max_len=512,
                                    vision_cache_mb=0)
    try:
        with _Uvicorn(create_app(engine, served_model_name="tiny")) as server:
            yield server
    finally:
        engine.close()


def test_http_target_against_the_server(served, tmp_path):
    out = tmp_path / "results"
    rc = bench_serve.main(["--target", "http", "--base-url", served.url, *COMMON, "--request-rate", "inf",
                           "--skip-baseline", "--out-dir", str(out)])
    assert rc == 0
    r = _load_result(out)
    assert r["served_model_name"] == "tiny" and r["base_url"] == served.url and "static_baseline" not in r
    _check_run(r["runs"][0], r["expected_output_tokens"], "inf")


def test_http_failures_are_counted(served):
    import httpx

    sizes = [bench_serve._image_size("56x56")]
    good, too_long = bench_serve.make_prompts(2, sizes, 3, output_len=4, range_ratio=0.0, seed=0)
    too_long.output_len = 10_000  # > the server's KV cache: a 400 before any token

    async def go():
        async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
            url = served.url + "/v1/chat/completions"
            return await asyncio.gather(bench_serve.http_request(client, url, "tiny", good),
                                        bench_serve.http_request(client, url, "tiny", too_long),
                                        bench_serve.http_request(client, url, "nope", good))

    ok, bad, unknown = asyncio.run(go())
    assert ok.ok and ok.output_tokens == 4 and len(ok.itl) >= 1 and 0 < ok.ttft <= ok.latency
    assert not bad.ok and "HTTP 400" in bad.error and not unknown.ok and "HTTP 404" in unknown.error
    m = bench_serve.summarize([ok, bad, unknown], 1.0)
    assert m["completed"] == 1 and m["failed"] == 2 and len(m["errors"]) == 2


def test_http_target_spawns_the_server_and_runs_the_baseline(tiny_ckpt, tmp_path):
    pytest.importorskip("fastapi")
    out = tmp_path / "results"
    rc = bench_serve.main(["--target", "http", "--model", tiny_ckpt, *COMMON, "--num-prompts", "12",
                           "--request-rate", "inf", "--out-dir", str(out)])
    assert rc == 0
    r = _load_result(out)
    assert r["served_model_name"] == "bench" and r["server_cmd"][2:4] == ["qwen2vl_fast.cli", "serve"]
    assert "serving 'bench'" in r["server_log_tail"]
    _check_run(r["runs"][0], r["expected_output_tokens"], "inf")
    assert r["static_baseline"]["useful_tokens"] == r["expected_output_tokens"]


def test_a_spent_budget_skips_the_rates_and_the_baseline(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN2VL_FAST_BENCH_BUDGET_S", "0.000001")  # gpu_check.sh's: already past half
    out = tmp_path / "results"
    assert bench_serve.main(["--target", "engine", "--model", tiny_ckpt, *COMMON, "--num-prompts", "2",
                             "--request-rate", "inf", "5", "--out-dir", str(out)]) == 0
    r = _load_result(out)
    assert [run.get("skipped") for run in r["runs"]] == ["time budget"] * 2
    assert r["static_baseline"] == {"error": "skipped: time budget"} and r["vs_static"] == {}
