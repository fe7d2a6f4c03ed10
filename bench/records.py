"""One JSON shape for every benchmark: pytest-benchmark's per-benchmark entry.

The kernel suites (`pytest bench --benchmark-json=...`) write pytest-benchmark's JSON: {machine_info, commit_info,
benchmarks: [entry], datetime, version}, each entry {group, name, fullname, params, param, extra_info, options,
stats}, stats in seconds. The script benchmarks (bench/results.py `ResultFile`) keep their own payload under
"result" and also carry the same entries under "benchmarks", made here from the payload (`entries_for`); an older
file without them is converted when read (`load`). So bench/report.py reads one shape from every source.

extra_info["kind"] says what an entry measures, and which keys it has besides the timing's:
- "kernel": suite, op, case, impl, side (ours / auto / pytorch), dtype, median_ms, achieved_tflops,
  achieved_gbps, pct_of_roofline, speedup_vs_best_alternative, best_alternative, is_best_ours, smoke;
- "decode": preset, impl (and weights for quant_decode), batch, tokens_per_s, ms_per_step, pct_of_roofline;
- "prefill", "forward": preset, impl, seq_len, median_ms, tflops;
- "vit": preset, impl, image (case name), patches, median_ms, tflops, speedup_vs_transformers;
- "serve": target, request_rate, output_throughput, request_throughput, ttft / tpot / itl / e2el ms.
stats: from the samples where the payload keeps them (decode times, harness samples), else median / min / p20 /
p80 only (then "q1" / "q3" hold p20 / p80, said by stats["quantiles"] = "p20/p80").
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Optional


def stats_from_samples(samples_s: list) -> dict:
    """pytest-benchmark's stats of a list of seconds (its own Stats where installed, the same fields otherwise)."""
    samples_s = [float(x) for x in samples_s]
    try:
        from pytest_benchmark.stats import Stats

        s = Stats()
        for x in samples_s:
            s.update(x)
        out = s.as_dict()
        out.pop("data", None)
        return dict(out, iterations=1)
    except ImportError:
        pass
    xs = sorted(samples_s)
    n = len(xs)
    q1, q3 = (statistics.quantiles(xs, n=4)[0], statistics.quantiles(xs, n=4)[2]) if n > 1 else (xs[0], xs[0])
    mean = statistics.fmean(xs)
    return dict(min=xs[0], max=xs[-1], mean=mean, stddev=statistics.stdev(xs) if n > 1 else 0.0, rounds=n,
                median=statistics.median(xs), iqr=q3 - q1, q1=q1, q3=q3, ops=1 / mean if mean > 0 else None,
                total=sum(xs), iterations=1)


def stats_from_summary(t: dict) -> dict:
    """Stats from a harness summary {median_ms, p20_ms, p80_ms, min_ms, n}; q1 / q3 hold p20 / p80."""
    ms = {k: t.get(k) for k in ("median_ms", "p20_ms", "p80_ms", "min_ms")}
    sec = {k: (v * 1e-3 if isinstance(v, (int, float)) else None) for k, v in ms.items()}
    med = sec["median_ms"]
    return dict(median=med, min=sec["min_ms"], q1=sec["p20_ms"], q3=sec["p80_ms"], quantiles="p20/p80",
                mean=None, max=None, stddev=None, rounds=t.get("n"), ops=1 / med if med else None, iterations=1)


def entry(source: str, name: str, group: str, extra_info: dict, *, stats: dict, params: Optional[dict] = None) -> dict:
    """One pytest-benchmark-shaped entry."""
    params = params or {}
    return dict(group=group, name=name, fullname=f"{source}::{name}", params=params,
                param="-".join(str(v) for v in params.values()) or None, extra_info=extra_info,
                options=dict(timer=extra_info.get("method") or "see extra_info"), stats=stats)


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


# -------------------------------------------------------------------------------------------------- adapters

def _op_of(label: str, meta_op=None) -> str:
    if meta_op:
        return meta_op
    try:
        from qwen2vl_fast.ops.registry import all_ops

        names = set(all_ops())
    except Exception:  # noqa: BLE001 -- the report still works without the package
        names = set()
    for tok in label.replace(":", " ").split():
        if tok in names:
            return tok
    return label.split()[0]


def kernel_entries(name: str, p: dict) -> list:
    """gemm, vision_kernels, llm_kernels, quant_gemm: compare.py rows (one per candidate) and case summaries."""
    best = {c["kernel"]: c for c in p.get("cases", [])}
    smoke = bool(p.get("cpu_smoke"))
    dtype = p.get("dtype")
    out = []
    for r in p.get("rows", []):
        if "median_ms" not in r:
            continue
        impl = r["impl"].split("[")[0]
        s = best.get(r["kernel"], {})
        info = dict(kind="kernel", suite=name, op="quant_linear" if name == "quant_gemm" else _op_of(r["kernel"],
                                                                                                  r.get("op")),
                    case=r["kernel"], impl=impl, side=r.get("side"), dtype=dtype, smoke=smoke,
                    median_ms=r["median_ms"], method=r.get("method"),
                    best_alternative=s.get("best_pytorch"), best_alternative_ms=s.get("best_pytorch_ms"),
                    speedup_vs_best_alternative=r.get("speedup_vs_best_pytorch"),
                    is_best_ours=s.get("best_ours") == impl, best_ours=s.get("best_ours"))
        for k in ("achieved_tflops", "achieved_gbps", "pct_of_roofline", "pct_of_tflops", "pct_of_gbps", "bound",
                  "ceiling_flag", "memory_bound", "l2_rotated", "flops", "bytes", "first_call_s"):
            if k in r:
                info[k] = r[k]
        stats = stats_from_samples([x * 1e-3 for x in r["samples_ms"]]) if r.get("samples_ms") else \
            stats_from_summary(r)
        out.append(entry(name, f"{r['kernel']} [{dtype}] {r['impl']}", f"{r['kernel']} [{dtype}]", info,
                         stats=stats, params=dict(case=r["kernel"], impl=r["impl"], dtype=dtype)))
    return out


def vision_tower_entries(name: str, p: dict) -> list:
    out = []
    for r in p.get("rows", []):
        if "median_ms" not in r:
            continue
        info = dict(kind="vit", preset=r["preset"], image=r["case"], patches=r.get("patches"), impl=r["impl"],
                    median_ms=r["median_ms"], tflops=r.get("tflops"), pct_of_roofline=r.get("pct_of_roofline"),
                    speedup_vs_transformers=r.get("speedup_vs_transformers"), dtype=p.get("dtype"),
                    smoke=bool(p.get("cpu_smoke")), method=r.get("method"))
        out.append(entry(name, f"{r['preset']} {r['case']} {r['impl']}", f"vision tower {r['preset']} {r['case']}",
                         info, stats=stats_from_summary(r), params=dict(preset=r["preset"], image=r["case"],
                                                                        impl=r["impl"])))
    return out


def model_forward_entries(name: str, p: dict) -> list:
    out = []
    for impl, r in (p.get("impls") or {}).items():
        t = r.get("timing") if isinstance(r, dict) else None
        if not t or "median_ms" not in t:
            continue
        info = dict(kind="forward", preset=p.get("preset"), impl=impl, seq_len=p.get("seq_len"), image=p.get("image"),
                    median_ms=t["median_ms"], tflops=r.get("tflops"), pct_of_matmul=r.get("pct_of_matmul"),
                    dtype=p.get("dtype"), smoke=bool(p.get("cpu_smoke")), method=t.get("method"))
        out.append(entry(name, f"{p.get('preset')} forward {impl}", f"model forward {p.get('preset')}", info,
                         stats=stats_from_summary(t), params=dict(preset=p.get("preset"), impl=impl)))
    return out


def _decode_entry(source: str, r: dict, preset: str, impl: str, p: dict, steps: Optional[int], **extra) -> dict:
    per_step = [s / steps for s in r["decode_s_all"]] if steps and r.get("decode_s_all") else None
    stats = stats_from_samples(per_step) if per_step else dict(median=r["ms_per_step"] * 1e-3, rounds=1,
                                                                iterations=1)
    info = dict(kind="decode", preset=preset, impl=impl, batch=r["batch"], tokens_per_s=r["tokens_per_s"],
                ms_per_step=r.get("ms_per_step"), pct_of_roofline=r.get("pct_of_roofline"),
                pct_of_bandwidth=r.get("pct_of_bandwidth", r.get("pct_of_bandwidth_roofline")),
                dtype=p.get("dtype"), smoke=str(p.get("device", "cuda")).startswith("cpu"),
                method="wall time of a whole decode (Engine.generate / transformers generate), per step", **extra)
    return entry(source, f"{preset} decode {impl} b{r['batch']}", f"decode {preset}", info, stats=stats,
                 params=dict(preset=preset, impl=impl, batch=r["batch"]))


def generate_entries(name: str, p: dict) -> list:
    out = []
    for preset, pr in (p.get("presets") or {}).items():
        steps = None
        for r in pr.get("decode", []):
            if "tokens_per_s" not in r:
                continue
            steps = (pr.get("decode_costs") or {}).get(r["batch"], {}).get("steps") or \
                (pr.get("decode_costs") or {}).get(str(r["batch"]), {}).get("steps")
            out.append(_decode_entry(name, r, preset, r["impl"], p, steps))
        for impl, r in ((pr.get("prefill") or {}).get("impls") or {}).items():
            t = r.get("timing") if isinstance(r, dict) else None
            if t and "median_ms" in t:
                info = dict(kind="prefill", preset=preset, impl=impl, seq_len=pr["prefill"].get("seq_len"),
                            median_ms=t["median_ms"], tflops=r.get("tflops"), dtype=p.get("dtype"),
                            smoke=str(p.get("device", "cuda")).startswith("cpu"), method=t.get("method"))
                out.append(entry(name, f"{preset} prefill {impl}", f"image prefill {preset}", info,
                                 stats=stats_from_summary(t), params=dict(preset=preset, impl=impl)))
    return out


def quant_decode_entries(name: str, p: dict) -> list:
    return [_decode_entry(name, r, r["preset"], f"ours-{r['weights']}", p, r.get("steps"), weights=r["weights"],
                          speedup_vs_bf16=r.get("speedup_vs_bf16"))
            for r in p.get("rows", []) if "tokens_per_s" in r]


def serve_entries(name: str, p: dict) -> list:
    out = []
    smoke = str(p.get("device", "cuda")).startswith("cpu")
    for r in p.get("runs") or []:
        if "output_throughput" not in r:
            continue
        rate = r.get("request_rate")
        rate = "inf" if isinstance(rate, float) and math.isinf(rate) or rate == "inf" else rate
        e2el = (r.get("e2el_ms") or {}).get("p50")
        info = dict(kind="serve", target=p.get("target"), preset=p.get("preset"), request_rate=rate,
                    output_throughput=r["output_throughput"], request_throughput=r.get("request_throughput"),
                    ttft_ms=r.get("ttft_ms"), tpot_ms=r.get("tpot_ms"), itl_ms=r.get("itl_ms"),
                    e2el_ms=r.get("e2el_ms"),
                    completed=r.get("completed"), failed=r.get("failed"), smoke=smoke,
                    method="serving load: e2e latency per request (stats: median only)")
        out.append(entry(name, f"serve {p.get('target')} rate={rate}", f"serve {p.get('preset')}", info,
                         stats=dict(median=_num(e2el) and e2el * 1e-3, rounds=r.get("completed"), iterations=1),
                         params=dict(target=p.get("target"), request_rate=rate)))
    return out


ADAPTERS = {"gemm": kernel_entries, "vision_kernels": kernel_entries, "llm_kernels": kernel_entries,
            "quant_gemm": kernel_entries, "vision_tower": vision_tower_entries, "model_forward": model_forward_entries,
            "generate": generate_entries, "quant_decode": quant_decode_entries, "serve": serve_entries}


def entries_for(name: str, payload: dict) -> list:
    """The entries of a script benchmark's payload ([] for a benchmark without an adapter, or a payload that does
    not hold a timed row yet). Never raises: a result file is written whatever this makes of it."""
    adapter = ADAPTERS.get(name)
    if adapter is None or not isinstance(payload, dict):
        return []
    try:
        return adapter(name, payload)
    except Exception as e:  # noqa: BLE001
        return [dict(group="error", name=f"{name}: no entries", fullname=name, params={}, param=None,
                     extra_info=dict(kind="error", error=f"{type(e).__name__}: {e}"), options={}, stats={})]


# -------------------------------------------------------------------------------------------------- reading

def source_info(doc: dict, path: str = "") -> dict:
    """{file, gpu, commit, dirty, smoke, created} of a document of either kind."""
    mi = doc.get("machine_info") or {}
    ours = mi.get("qwen2vl_fast") or {}
    env = doc.get("environment") or ours.get("environment") or {}
    commit = env.get("git_commit") or (doc.get("commit_info") or {}).get("id")
    dirty = env.get("git_dirty") if "git_dirty" in env else (doc.get("commit_info") or {}).get("dirty")
    result = doc.get("result") or {}
    smoke = ours.get("smoke") if "smoke" in ours else (
        bool(result.get("cpu_smoke")) or env.get("gpu") == "cpu" or str(result.get("device", "")).startswith("cpu"))
    return dict(file=str(path), name=doc.get("name") or "pytest-benchmark", gpu=env.get("gpu") or mi.get("cpu", {}).get(
        "brand_raw") or "unknown", commit=commit, dirty=dirty, smoke=bool(smoke),
        created=doc.get("created_utc") or doc.get("datetime"))


def load(path) -> tuple:
    """(source_info, entries) of a JSON file: pytest-benchmark's, a result file (its "benchmarks", or converted
    from its payload when it predates them), or a bundle of result files (every document in it)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if "files" in doc and "benchmarks" not in doc:  # a bench/results.py bundle
        got = [load_doc(d, f"{path}:{k}") for k, d in doc["files"].items()]
        return got
    return [load_doc(doc, str(path))]


def load_doc(doc: dict, path: str) -> tuple:
    info = source_info(doc, path)
    entries = doc.get("benchmarks")
    if entries is None and "result" in doc:
        entries = entries_for(doc.get("name", ""), doc["result"])
    entries = [e for e in entries or [] if (e.get("extra_info") or {}).get("kind") != "error"]
    for e in entries:
        e.setdefault("extra_info", {}).setdefault("smoke", info["smoke"])
    return info, entries
