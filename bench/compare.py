"""Side-by-side kernel comparisons that cannot flatter us: every candidate of a case is timed the same way.

A `Case` is one operation at one shape: its FLOPs, the fewest bytes one call must move (each input read once, each
output written once) and its candidates: ours (Triton, CUDA C++), "auto" (what the runtime's measured dispatch
runs, `resolve("auto")`) and the PyTorch alternatives (cuBLAS, SDPA backends, eager references, torch.compile).
`run_case` times them and reports each one's roofline fraction and the speedup of ours over the best alternative.

The rules it enforces:
- one timing method for every candidate of a case: the harness's "graph" (CUDA-graph replays) when every
  candidate can be captured, else "queue" (pre-filled stream) for all of them; never per-call events on an idle
  queue, which time the host's launch cost of a microsecond kernel (bench/harness.py);
- memory-bound cases (arithmetic intensity under the measured ridge point, `roofline.is_memory_bound`; a case may
  also say so itself) get inputs rotated across copies that exceed twice the L2 size, built per candidate from
  its `make_args`, so no candidate reads what the previous call left in L2. Compute-bound cases are timed on one
  set of inputs: their time hardly depends on where the inputs come from;
- each candidate draws its own random inputs (never zeros), and the first call, outside the timing, also records
  how long it took (compilation included: `first_call_s`), so a compile is never hidden nor counted.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Union

import torch

from . import harness, roofline

SIDES = ("ours", "auto", "pytorch")


@dataclass
class Candidate:
    """One implementation: `fn(*make_args())` is one call. `side` is "ours", "auto" or "pytorch"; `tag` names a
    variant (e.g. SDPA "gqa" vs "repeat-kv"); `nbytes` overrides the case's bytes for this candidate (a quantized
    weight moves fewer)."""

    fn: Callable
    make_args: Callable[[], tuple]
    side: str = "pytorch"
    tag: str = ""
    nbytes: Optional[float] = None

    def __post_init__(self):
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {self.side!r}")


@dataclass
class Case:
    """One operation at one shape. A candidate given as a list is a chain of variants: the first that runs is
    timed (SDPA with enable_gqa, else with K/V repeated beforehand)."""

    label: str
    flops: float
    nbytes: float
    candidates: dict[str, Union[Candidate, list]]
    memory_bound: Optional[bool] = None  # None: decided from the roofline
    meta: dict = field(default_factory=dict)  # extra columns for every row (preset, M, N, K, ...)


class Stopped(BaseException):
    """Raised inside a run when it must stop now: its total budget ran out (the alarm `run_cases` sets) or it
    was sent SIGTERM / SIGINT (gpu_check.sh's `timeout`). A BaseException, so no candidate's `except Exception`
    swallows it; `run_cases` catches it, writes what was timed so far and returns."""


class Budget:
    """Wall-clock budgets of a benchmark run: `total_s` for the whole run, `case_s` for each case (None: none).

    Checked between candidates (a candidate that has started is not interrupted by the case budget: the
    remaining candidates of an over-budget case are skipped and named) and between cases (cases left when the
    total is spent are skipped and named). `run_cases` also arms an alarm at the total budget that stops even a
    candidate stuck in one call (a compile, a hung timing loop), so the partial result is written before the
    caller's own timeout kills the process. `clock` (seconds) is injectable for tests.
    """

    def __init__(self, total_s: Optional[float] = None, case_s: Optional[float] = None, clock=time.monotonic):
        for name, v in (("total_s", total_s), ("case_s", case_s)):
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be positive or None, got {v}")
        self.total_s, self.case_s, self.clock = total_s, case_s, clock
        self.stop_reason: Optional[str] = None  # set by run_cases' signal handler: everything counts as spent
        self.start = clock()
        self.case_start = self.start

    def elapsed_s(self) -> float:
        return self.clock() - self.start

    def left_s(self) -> float:
        """Seconds left of the total budget (inf without one)."""
        return math.inf if self.total_s is None else self.total_s - self.elapsed_s()

    def start_case(self) -> None:
        self.case_start = self.clock()

    def case_left_s(self) -> float:
        """Seconds left to the current case: the smaller of its own budget and the run's."""
        own = math.inf if self.case_s is None else self.case_s - (self.clock() - self.case_start)
        return min(own, self.left_s())

    def total_spent(self) -> bool:
        return self.stop_reason is not None or self.left_s() <= 0

    def case_spent(self) -> bool:
        return self.stop_reason is not None or self.case_left_s() <= 0

    def describe(self) -> dict:
        return dict(total_s=self.total_s, case_s=self.case_s, elapsed_s=round(self.elapsed_s(), 3))


def budget_from_env(total_s: Optional[float], case_s: Optional[float], env: str = "QWEN2VL_FAST_BENCH_BUDGET_S"):
    """A Budget from the command line's values; a missing total is taken from `env` (bench/gpu_check.sh sets it
    to its step's time limit less a margin), and a missing per-case budget stays None."""
    if total_s is None and os.environ.get(env):
        total_s = float(os.environ[env])
    return Budget(total_s, case_s)


def auto_table(device):
    """The runtime's `auto` op table (`qwen2vl_fast.ops.resolve("auto")`: per op and shape, the implementation its
    measured dispatch found fastest here), measuring into a fresh tuning cache so no winner of an earlier run is
    reused. Its first call at a shape measures the candidates: the warm-up, outside the timing."""
    from qwen2vl_fast.ops import resolve

    return resolve("auto", device, cache_path=os.path.join(tempfile.mkdtemp(prefix="bench_dispatch."), "dispatch.json"))


def runs_here(script: str, device: torch.device, smoke: bool) -> bool:
    """Kernel benchmarks time GPUs; on the CPU they only run as a smoke test of the script (--smoke)."""
    if device.type != "cuda" and not smoke:
        print(f"{script} needs a CUDA device (or --smoke for the CPU test of the script)")
        return False
    return True


def allow_recompiles(limit: int) -> None:
    """torch.compile'd references are compiled once per shape: let dynamo keep `limit` of them."""
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, limit)


def record_dispatch(payload: dict, auto) -> Callable:
    """An on_case hook for run_cases: keeps the measured dispatch's report (what auto picked, and the times
    behind it) in the result after every case."""
    def on_case(case, rows, summary):
        if auto is not None:
            payload["dispatch_report"] = auto.dispatch_report()
    return on_case


def _variants(c) -> list:
    return list(c) if isinstance(c, (list, tuple)) else [c]


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        harness._cuda_api().synchronize()


def _build_inputs(cand: Candidate, nbytes: float, rotate: bool, l2_bytes: int) -> list:
    if not rotate:
        args = cand.make_args()
        return [args if isinstance(args, tuple) else (args,)]
    return harness.make_rotating_inputs(cand.make_args, 2 * l2_bytes, per_copy_bytes=int(nbytes))


def _first_runnable(variants: list, nbytes: float, rotate: bool, l2_bytes: int, device):
    """(candidate, inputs, first_call_s) of the first variant whose first call runs, or (None, None, error)."""
    err = "no variant"
    for cand in variants:
        inputs = None
        try:
            inputs = _build_inputs(cand, cand.nbytes or nbytes, rotate, l2_bytes)
            t0 = time.perf_counter()
            with torch.inference_mode():
                cand.fn(*inputs[0])
            _sync(device)
            return cand, inputs, time.perf_counter() - t0
        except Exception as e:  # a backend that does not take this shape / layout: try the next variant
            err = (f"{cand.tag}: " if cand.tag else "") + _error(e)
            del inputs
    return None, None, err


def time_candidates(case: Case, *, device, rotate: bool, l2_bytes: int, warmup: int, rep: int,
                    method: str = "kernel", budget: Optional[Budget] = None, out: Optional[dict] = None,
                    keep_samples: bool = False) -> dict:
    """{name: timing or {"error": ...}} with one method for all: "kernel" tries "graph" for every candidate and,
    if any cannot be captured, times them all again with "queue". With a `budget`, candidates that come up once
    the case's budget is spent are not run: {"error": "skipped: ...", "skipped": True}. `out`, if given, is
    filled as candidates finish (what a stopped run still writes). `keep_samples`: each timing also holds its
    `samples_ms` (harness.time_fn), for the pytest-benchmark suites."""
    device = torch.device(device)
    plan = "graph" if method == "kernel" and device.type == "cuda" else method
    out = {} if out is None else out
    while True:
        out.clear()
        fallback = False
        for name, chain in case.candidates.items():
            if budget is not None and budget.case_spent():
                out[name] = dict(error=f"skipped: the case's time budget was spent ({budget.describe()})",
                                 skipped=True)
                continue
            cand, inputs, first = _first_runnable(_variants(chain), case.nbytes, rotate, l2_bytes, device)
            if cand is None:
                out[name] = dict(error=first)
                continue
            try:
                with torch.inference_mode():
                    t = harness.time_fn(cand.fn, warmup=warmup, rep=rep, inputs=inputs, device=device, method=plan,
                                        keep_samples=keep_samples)
                out[name] = dict(t, tag=cand.tag, first_call_s=first, bytes=cand.nbytes or case.nbytes)
            except harness.CaptureError as e:
                fallback = True
                out[name] = dict(error=f"not capturable: {e}")
                break
            except Exception as e:
                traceback.print_exc()
                out[name] = dict(error=_error(e))
            finally:
                del inputs
                if device.type == "cuda":
                    harness._cuda_api().empty_cache()
        if not fallback:
            return out
        if budget is not None and budget.case_spent():  # no time to time them all again: keep what was timed
            for name in case.candidates:
                out.setdefault(name, dict(error="skipped: the case's time budget was spent before the queue "
                                                "re-run (another candidate cannot be captured)", skipped=True))
            return out
        plan = "queue"  # one candidate cannot be captured: every candidate is timed pre-filled instead


def summarize_case(case: Case, times: dict, ceilings: dict) -> tuple[list, dict]:
    """(rows, summary): one row per candidate with its roofline fraction and speedup over the best PyTorch
    alternative; the summary names the best of ours, the best alternative, auto, and their speedups."""
    ok = {n: t for n, t in times.items() if "median_ms" in t}
    sides = {n: _variants(c)[0].side for n, c in case.candidates.items()}

    def best(side):
        named = [(t["median_ms"], n) for n, t in ok.items() if sides[n] == side]
        return min(named) if named else (None, None)

    best_pt, best_pt_name = best("pytorch")
    best_ours, best_ours_name = best("ours")
    auto_ms, _ = best("auto")
    rows = []
    for name, t in times.items():
        clash = set(case.meta) & (set(t) | {"kernel", "impl", "side", "flops", "bytes"})
        if clash:
            raise ValueError(f"case meta keys {sorted(clash)} would overwrite timing columns")
        row = dict(kernel=case.label, impl=name + (f"[{t['tag']}]" if t.get("tag") else ""), side=sides[name],
                   **case.meta, flops=case.flops, bytes=case.nbytes)
        row.update(t)  # a candidate's own bytes (t["bytes"]) replace the case's
        if "median_ms" in t:
            row.update(roofline.roofline_fraction(case.flops, row["bytes"], t["median_ms"], ceilings))
            if best_pt:
                row["speedup_vs_best_pytorch"] = best_pt / t["median_ms"]
        rows.append(row)
    summary = dict(kernel=case.label, **case.meta, best_pytorch=best_pt_name, best_pytorch_ms=best_pt,
                   best_ours=best_ours_name, best_ours_ms=best_ours, auto_ms=auto_ms,
                   method=next((t["method"] for t in ok.values()), None))
    if best_pt and best_ours:
        summary["speedup_best_ours"] = best_pt / best_ours
        best_row = next(r for r in rows if r["impl"].split("[")[0] == best_ours_name)
        summary["pct_of_roofline_best_ours"] = best_row["pct_of_roofline"]
        summary["ceiling_flag_best_ours"] = best_row.get("ceiling_flag")
    if best_pt and auto_ms:
        summary["speedup_auto"] = best_pt / auto_ms
    return rows, summary


def run_case(case: Case, ceilings: dict, *, device, warmup: int = 5, rep: int = 30, method: str = "kernel",
             l2_bytes: Optional[int] = None, budget: Optional[Budget] = None,
             progress: Optional[dict] = None, keep_samples: bool = False) -> tuple[list, dict]:
    """Time every candidate of `case` (rotating inputs when it is memory-bound) -> (rows, summary).
    `progress` (a dict) receives the timings as they finish, for a run that is stopped mid-case.
    `keep_samples`: each row also holds its `samples_ms` (the pytest-benchmark suites replay them)."""
    device = torch.device(device)
    bound = case.memory_bound
    if bound is None:
        bound = roofline.is_memory_bound(case.flops, case.nbytes, ceilings)
    l2 = l2_bytes if l2_bytes is not None else harness.l2_cache_bytes(device)
    times = time_candidates(case, device=device, rotate=bound, l2_bytes=l2, warmup=warmup, rep=rep, method=method,
                            budget=budget, out=progress, keep_samples=keep_samples)
    return finish_case(case, dict(times), ceilings, bound, l2)


def finish_case(case: Case, times: dict, ceilings: dict, bound: bool, l2: int) -> tuple[list, dict]:
    """(rows, summary) of the timings of a case's candidates (all of them, or those a stopped run finished)."""
    rows, summary = summarize_case(case, times, ceilings)
    for r in rows:
        r["memory_bound"] = bound
        if "input_copies" in r:  # rotated: the copies a call cycles through, and whether they outsize 2 x L2
            r["rotated_bytes"] = r["input_copies"] * r["bytes"] if bound else 0
            r["l2_rotated"] = bound and r["rotated_bytes"] >= 2 * l2
    summary.update(memory_bound=bound, l2_bytes=l2,
                   l2_rotated=bound and all(r.get("l2_rotated", False) for r in rows if "median_ms" in r))
    return rows, summary


def _case_bound(case: Case, ceilings: dict) -> bool:
    return case.memory_bound if case.memory_bound is not None else roofline.is_memory_bound(case.flops, case.nbytes,
                                                                                              ceilings)


class _StopSignals:
    """While active (main thread only): SIGTERM / SIGINT, and SIGALRM at the run's total budget, raise Stopped."""

    def __init__(self, budget: Optional[Budget]):
        self.budget, self.saved, self.active = budget, {}, threading.current_thread() is threading.main_thread()
        self.fired = False
        self.reason: Optional[str] = None  # kept even if the Stopped raised is swallowed (a graph capture's exit)

    def disarm(self) -> None:
        """Stop the alarm and ignore further stop signals (while the partial result is written)."""
        self.fired = True
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _raise(self, signum, frame):
        if self.fired:
            return
        self.fired = True
        self.reason = (f"{signal.Signals(signum).name} after {self.budget.elapsed_s() if self.budget else 0:.0f} s"
                       + (" (the total time budget)" if signum == signal.SIGALRM else ""))
        if self.budget is not None:
            self.budget.stop_reason = self.reason
        raise Stopped(self.reason)

    def __enter__(self):
        if not self.active:
            return self
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
            self.saved[sig] = signal.signal(sig, self._raise)
        if self.budget is not None and self.budget.total_s is not None and self.budget.left_s() > 0:
            signal.setitimer(signal.ITIMER_REAL, self.budget.left_s())  # spent already: every case is skipped
        return self

    def __exit__(self, *exc):
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            for sig, handler in self.saved.items():
                signal.signal(sig, handler)
        return False


def run_cases(cases: Iterable[Case], ceilings: dict, out, payload: dict, *, device, warmup: int = 5, rep: int = 30,
              l2_bytes: Optional[int] = None, on_case: Optional[Callable] = None,
              budget: Optional[Budget] = None) -> dict:
    """Run each case (a generator is fine: each case's tensors are made when it comes up), append its rows and
    summary to payload["rows"] / payload["cases"], call `on_case(case, rows, summary)` (extra columns, goals),
    rewrite the result file `out` (a results.ResultFile) and print the case. Returns the payload.

    With a `budget` (Budget): cases that come up once the total is spent are not run and are named in
    payload["skipped_cases"]; an over-budget case skips its remaining candidates. SIGTERM / SIGINT, or the
    total budget's alarm, stop the run: the candidates of the current case timed so far are kept (its summary
    says "partial": true), payload["stopped"] says why, the file is written and run_cases returns."""
    payload.setdefault("rows", [])
    payload.setdefault("cases", [])
    if budget is not None:
        payload["budget"] = budget.describe()
    l2 = l2_bytes if l2_bytes is not None else harness.l2_cache_bytes(device)
    current, progress = None, {}  # the case being timed, and its candidates' timings as they finish
    with _StopSignals(budget) as stop:
        try:
            for case in cases:
                if budget is not None and budget.total_spent():
                    payload.setdefault("skipped_cases", []).append(case.label)
                    out.update(payload)
                    print(f"{case.label}  skipped: the run's time budget ({budget.total_s} s) is spent", flush=True)
                    continue
                if budget is not None:
                    budget.start_case()
                current, progress = case, {}
                rows, summary = run_case(case, ceilings, device=device, warmup=warmup, rep=rep, l2_bytes=l2,
                                         budget=budget, progress=progress)
                if stop.reason:  # the Stopped was swallowed inside a candidate (an exception raised on its way out)
                    raise Stopped(stop.reason)
                current = None
                _add_case(case, rows, summary, payload, out, on_case)
        except Stopped as e:
            stop.disarm()  # a second signal while the partial result is written is ignored
            payload["stopped"] = str(e)
            if current is not None:
                times = dict(progress)
                for name in current.candidates:
                    times.setdefault(name, dict(error="not timed: the run was stopped", skipped=True))
                rows, summary = finish_case(current, times, ceilings, _case_bound(current, ceilings), l2)
                summary["partial"] = True
                _add_case(current, rows, summary, payload, out, on_case)
            out.update(payload)
            print(f"stopped: {e}; the result keeps every case and candidate timed so far", flush=True)
    if budget is not None:
        payload["budget"] = budget.describe()
    return payload


def _add_case(case, rows, summary, payload, out, on_case) -> None:
    if on_case is not None:
        on_case(case, rows, summary)
    over = roofline.over_ceiling(r for r in rows if "median_ms" in r)
    if over:  # above a measured ceiling: the ceiling (or the byte count) is wrong, said where it is read
        payload.setdefault("ceiling_under_measured", []).extend(
            dict(kernel=r["kernel"], impl=r["impl"], pct_of_roofline=r["pct_of_roofline"],
                 pct_of_gbps=r["pct_of_gbps"], pct_of_tflops=r["pct_of_tflops"]) for r in over)
    payload["rows"] += rows
    payload["cases"].append(summary)
    out.update(payload)
    print(format_rows(rows, summary), flush=True)


def format_rows(rows: list, summary: dict) -> str:
    """A few aligned lines for the log: each candidate's median, spread, roofline %, speedup; then the verdict."""
    lines = []
    for r in rows:
        if "median_ms" not in r:
            lines.append(f"  {r['impl']:34s} error: {r['error'][:110]}")
            continue
        rate = (f"{r['achieved_tflops']:8.1f} TFLOP/s" if not r.get("memory_bound")
                else f"{r['achieved_gbps']:8.0f} GB/s   ")
        sp = f"x{r['speedup_vs_best_pytorch']:.2f}" if "speedup_vs_best_pytorch" in r else ""
        lines.append(f"  {r['impl']:34s} {r['median_ms']:9.4f} ms [{r['p20_ms']:.4f}, {r['p80_ms']:.4f}] {rate} "
                     f"{roofline.format_pct(r['pct_of_roofline'], 7)} roof  {sp:>6s}  {r['method']}")
        if r.get("ceiling_flag") and r["pct_of_roofline"] <= roofline.OVER_CEILING_TOLERANCE_PCT:
            lines[-1] += (f"  ({r['ceiling_flag']}: {r['pct_of_gbps']:.1f}% of GB/s, "
                          f"{r['pct_of_tflops']:.1f}% of TFLOP/s)")
    verdict = []
    if summary.get("speedup_best_ours") is not None:
        verdict.append(f"best ours {summary['best_ours']} x{summary['speedup_best_ours']:.2f} "
                       f"vs {summary['best_pytorch']}")
    if summary.get("speedup_auto") is not None:
        verdict.append(f"auto x{summary['speedup_auto']:.2f}")
    bound = "memory-bound, L2 rotated" if summary.get("memory_bound") else "compute-bound"
    return f"{summary['kernel']}  ({bound})  " + "  ".join(verdict) + "\n" + "\n".join(lines)
