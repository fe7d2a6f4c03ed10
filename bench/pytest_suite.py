"""The machinery behind the pytest-benchmark suites (bench/conftest.py, bench/test_kernels.py).

Each case (bench/suites.py: one op at one shape and dtype) is timed once, as a whole, with the project's method
(bench/compare.py `run_case`: one harness method for every candidate, CUDA-graph replays or else a pre-filled
queue, inputs rotated past 2x L2 for memory-bound cases), on the first of its tests that runs; each candidate is a
test of its own (`test_kernel[<case>-<impl>]`) that hands its harness samples to `benchmark.pedantic`.

How the samples reach pytest-benchmark: pytest-benchmark times a round with its timer around the target. Here the
timer is a clock (`ReplayClock`) that only the target moves, by exactly one harness sample per round, so every
statistic pytest-benchmark computes, stores (--benchmark-json, --benchmark-autosave) and compares
(--benchmark-compare, --benchmark-compare-fail) is a statistic of the harness's per-call device times, not of
Python's view of an asynchronous launch.

Without a CUDA device the same cases run at tiny shapes on the CPU (`smoke`): timed with perf_counter, marked in
the header and the summary of the run, in every test's extra_info ("smoke": true, the group's "[CPU smoke]") and
in the JSON's machine_info["qwen2vl_fast"]. Those times say nothing about GPU speed; the run keeps the suites working.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

from bench import compare, harness, results, roofline, suites

SMOKE_BANNER = ("qwen2vl_fast bench: CPU SMOKE RUN ({why}): tiny shapes, {dtypes}, perf_counter wall time; "
                "these times say nothing about GPU speed")
GPU_SMOKE_BANNER = ("qwen2vl_fast bench: SMOKE RUN on {gpu} (--bench-smoke): tiny shapes, {dtypes}; not the models' "
                    "shapes")
# Row keys copied into each test's extra_info (the timing's and the roofline's; see compare.summarize_case).
ROW_KEYS = ("median_ms", "p20_ms", "p80_ms", "min_ms", "n", "method", "calls_per_sample", "input_copies",
            "queue_drained", "queue_retries", "host_blocking", "first_call_s", "tag", "flops", "bytes",
            "achieved_tflops", "achieved_gbps", "pct_of_tflops", "pct_of_gbps", "pct_of_roofline", "floor_ms",
            "intensity", "ridge", "bound", "ceiling_flag", "memory_bound", "rotated_bytes", "l2_rotated")


class ReplayClock:
    """pytest-benchmark's timer during one test: it returns `t`, which only the replayed target advances."""

    def __init__(self, method: str):
        self.t = 0.0
        self.__name__ = f"qwen2vl_fast-harness[{method}]"  # what pytest-benchmark records as the timer

    def __call__(self) -> float:
        return self.t


def replay(benchmark, samples_ms: list, method: str) -> None:
    """Hand `samples_ms` (harness per-call times, ms) to pytest-benchmark as its rounds, one round per sample."""
    if not samples_ms:
        raise ValueError("no samples to replay")
    clock = ReplayClock(method)
    it = iter(samples_ms)

    def one_sample():
        clock.t += next(it) * 1e-3

    if not hasattr(benchmark, "_timer"):
        raise RuntimeError("this pytest-benchmark keeps its timer elsewhere: bench/pytest_suite.replay needs updating")
    benchmark._timer = clock  # read by pedantic's runner (pytest-benchmark 4 and 5)
    benchmark.pedantic(one_sample, rounds=len(samples_ms), iterations=1, warmup_rounds=0)


@dataclass
class CaseResult:
    rows: dict  # impl name (no [tag]) -> row
    summary: dict


@dataclass
class BenchContext:
    """One session's settings, cases, ceilings and timed cases."""

    device: torch.device
    smoke: bool
    dtypes: list
    suites: list
    reps: int
    warmup: int
    compile_ok: bool
    use_auto: bool
    why_smoke: str = ""
    budget_s: Optional[float] = None  # the whole run's: cases that come up once it is spent are skipped
    case_budget_s: Optional[float] = None  # per case: its candidates that come up once it is spent are skipped
    _start: float = field(default_factory=time.monotonic)
    _specs: Optional[dict] = None
    _ceilings: dict = field(default_factory=dict)
    _done: dict = field(default_factory=dict)
    _auto: object = None

    @classmethod
    def from_config(cls, config) -> "BenchContext":
        opt = config.getoption
        cuda = torch.cuda.is_available()
        device = torch.device(opt("--bench-device") or ("cuda" if cuda else "cpu"))
        smoke = device.type != "cuda" or bool(opt("--bench-smoke"))
        why = "no CUDA device" if not cuda else ("--bench-device cpu" if device.type != "cuda" else "--bench-smoke")
        dtypes = [d for d in (opt("--bench-dtypes") or ("float32" if device.type != "cuda" else "bfloat16"))
                  .split(",") if d]
        bad = [d for d in dtypes if d not in suites.DTYPES]
        if bad:
            raise pytest.UsageError(f"--bench-dtypes: unknown {bad}; choose from {list(suites.DTYPES)}")
        if device.type != "cuda" and "bfloat16" in dtypes:
            raise pytest.UsageError("--bench-dtypes bfloat16 needs CUDA (the Triton interpreter has no bfloat16)")
        chosen = [s for s in (opt("--bench-suites") or ",".join(suites.SUITES)).split(",") if s]
        bad = [s for s in chosen if s not in suites.SUITES]
        if bad:
            raise pytest.UsageError(f"--bench-suites: unknown {bad}; choose from {list(suites.SUITES)}")
        reps = opt("--bench-reps") or (3 if smoke and device.type != "cuda" else 30)
        warmup = opt("--bench-warmup") if opt("--bench-warmup") is not None else (1 if device.type != "cuda" else 5)
        budget = opt("--bench-budget-s") or (float(os.environ["QWEN2VL_FAST_BENCH_BUDGET_S"])
                                             if os.environ.get("QWEN2VL_FAST_BENCH_BUDGET_S") else None)
        return cls(device=device, smoke=smoke, dtypes=dtypes, suites=chosen, reps=reps, warmup=warmup,
                   compile_ok=device.type == "cuda" and not opt("--bench-no-compile"),
                   use_auto=not opt("--bench-no-auto"), why_smoke=why if smoke else "", budget_s=budget,
                   case_budget_s=opt("--bench-case-budget-s"))

    # ----------------------------------------------------------------------------------------------- cases
    def auto(self):
        if self.use_auto and self._auto is None:
            self._auto = compare.auto_table(self.device)
        return self._auto

    def specs(self) -> dict:
        """{case_id: Spec} of every suite and dtype, built once (at collection)."""
        if self._specs is None:
            compare.allow_recompiles(512)
            self._specs = {}
            for dtype in self.dtypes:
                for spec in suites.collect(self.device, dtype, self.smoke, self.suites, self.auto(), self.compile_ok):
                    self._specs.setdefault(spec.case_id, spec)
        return self._specs

    def params(self) -> list:
        """[(case_id, impl, suite)] in case order: what test_kernel is parametrized with."""
        return [(cid, impl, spec.suite) for cid, spec in self.specs().items() for impl in spec.candidates]

    def ceilings(self, dtype: str) -> dict:
        if dtype not in self._ceilings:
            self._ceilings[dtype] = roofline.device_ceilings(self.device, suites.DTYPES[dtype])
        return self._ceilings[dtype]

    def budget_left_s(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - (time.monotonic() - self._start)

    def result(self, case_id: str) -> CaseResult:
        """Every candidate of the case timed (once per session), with one method for all. A case that comes up
        once the run's budget is spent, or whose timing raised, is kept as such: its tests skip / fail with why."""
        if case_id not in self._done:
            spec = self.specs()[case_id]
            if self.budget_left_s() <= 0:
                why = f"skipped: the run's time budget ({self.budget_s} s, --bench-budget-s) is spent"
                self._done[case_id] = CaseResult({n: dict(error=why, skipped=True) for n in spec.candidates}, {})
                return self._done[case_id]
            budget = None
            if self.case_budget_s is not None or self.budget_s is not None:
                budget = compare.Budget(None, min(self.case_budget_s or math.inf, self.budget_left_s()))
                budget.start_case()
            try:
                rows, summary = compare.run_case(spec.case, self.ceilings(spec.dtype), device=self.device,
                                                 warmup=self.warmup, rep=self.reps, budget=budget, keep_samples=True)
            except Exception as e:  # noqa: BLE001 -- every test of the case reports it; none times it again
                err = f"the case could not be timed: {type(e).__name__}: {str(e)[:300]}"
                self._done[case_id] = CaseResult({n: dict(error=err) for n in spec.candidates}, {})
                return self._done[case_id]
            self._done[case_id] = CaseResult({r["impl"].split("[")[0]: r for r in rows}, summary)
            print("\n" + compare.format_rows(rows, summary), flush=True)
        return self._done[case_id]

    # ----------------------------------------------------------------------------------------------- one test
    def run(self, benchmark, case_id: str, impl: str) -> None:
        spec = self.specs()[case_id]
        got = self.result(case_id)
        row = got.rows.get(impl, dict(error="not timed (no row for this candidate)"))
        benchmark.group = f"{spec.label} [{spec.dtype}]" + (f" [{self.smoke_label()}]" if self.smoke else "")
        benchmark.extra_info.update(self.extra_info(spec, impl, row, got.summary))
        if "median_ms" not in row:
            if row.get("skipped") or _side(spec, impl) == "pytorch":
                pytest.skip(f"{impl}: {row['error'][:240]}")
            pytest.fail(f"{impl} ({_side(spec, impl)}) failed: {row['error']}")
        replay(benchmark, row["samples_ms"], row["method"])

    def extra_info(self, spec, impl: str, row: dict, summary: dict) -> dict:
        side = _side(spec, impl)
        info = dict(kind="kernel", suite=spec.suite, op=spec.op, case=spec.label, impl=impl, side=side,
                    dtype=spec.dtype, device=str(self.device), smoke=self.smoke,
                    shape={k: v for k, v in spec.case.meta.items() if isinstance(v, (int, float, str, bool))})
        info.update({k: row[k] for k in ROW_KEYS if k in row})
        best_pt, best_pt_ms = summary.get("best_pytorch"), summary.get("best_pytorch_ms")
        info.update(best_alternative=best_pt, best_alternative_ms=best_pt_ms,
                    speedup_vs_best_alternative=row.get("speedup_vs_best_pytorch"),
                    best_ours=summary.get("best_ours"), is_best_ours=summary.get("best_ours") == impl)
        if self.smoke:
            info["smoke_note"] = ("CPU smoke run: these times say nothing about GPU speed" if self.device.type != "cuda"
                                  else "smoke run: tiny shapes, not the models'")
        return info

    # ----------------------------------------------------------------------------------------------- session
    def machine_info(self) -> dict:
        return dict(smoke=self.smoke, smoke_reason=self.why_smoke or None, device=str(self.device),
                    budget_s=self.budget_s, case_budget_s=self.case_budget_s,
                    dtypes=self.dtypes, suites=self.suites, reps=self.reps, warmup=self.warmup,
                    compile=self.compile_ok, auto=self.use_auto, environment=results.environment_info(),
                    ceilings=dict(self._ceilings), l2_bytes=harness.l2_cache_bytes(self.device))

    def smoke_label(self) -> str:
        return "CPU smoke" if self.device.type != "cuda" else "smoke"

    def banner(self) -> str:
        if self.smoke and self.device.type == "cuda":
            return GPU_SMOKE_BANNER.format(gpu=results.gpu_name(), dtypes="/".join(self.dtypes))
        if self.smoke:
            return SMOKE_BANNER.format(why=self.why_smoke, dtypes="/".join(self.dtypes))
        return (f"qwen2vl_fast bench: {results.gpu_name()} ({self.device}), {'/'.join(self.dtypes)}, harness "
                f"kernel method (CUDA-graph replays, else a pre-filled queue), {self.reps} samples per candidate")


def _side(spec, impl: str) -> str:
    return compare._variants(spec.case.candidates[impl])[0].side

