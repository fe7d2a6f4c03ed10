"""A report of benchmark results: a Markdown table and one PNG per question.

    python -m bench.report RESULT.json [RESULT.json | DIR ...] --out DIR

Inputs: pytest-benchmark JSON of the kernel suites (`pytest bench --benchmark-json=...`, or the files
--benchmark-autosave keeps under .benchmarks/), result files of the script benchmarks (bench/results/*.json:
model forward, generate, quantized decode, serving, vision tower, and the kernel scripts), bundles of them, or
folders of such files. Every source is read in one shape (bench/records.py); a later input replaces an earlier
one's figure for the same case.

Writes to --out:
- report.md: the sources (GPU, commit, smoke or not), the figures, and tables: every op of the registry with
  each of its cases (best of ours, best PyTorch alternative, speedup, auto's speedup, % of the measured
  roofline; an op without a result says so), decode tokens/s, vision tower times, model forward / prefill,
  serving;
- speedup.png: speedup of the best of ours over the best PyTorch alternative, per op and shape;
- roofline.png: % of the measured roofline per op (ours and the best alternative);
- decode.png: decode tokens/s against batch size;
- vit.png: vision tower time against image size.
Each figure's title names the GPU and the commit; a CPU smoke run says so in the title (its times say nothing
about GPU speed). A figure without data in the inputs is still written, saying what to run.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import OrderedDict
from pathlib import Path

from bench import records

FIGURES = OrderedDict(
    speedup="Speedup of the best of ours over the best PyTorch alternative, per op and shape",
    roofline="% of the measured roofline per op",
    decode="Decode tokens/s against batch size",
    vit="Vision tower time against image size",
)
SMOKE_NOTE = "CPU SMOKE RUN: times say nothing about GPU speed"


def registry_ops() -> list:
    try:
        from qwen2vl_fast.ops.registry import all_ops

        return sorted(all_ops())
    except Exception:  # noqa: BLE001 -- a report of files needs no package
        return []


def gather(paths) -> tuple:
    """(sources, entries): every input file (folders: their *.json), each entry tagged with its source's index."""
    files = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    sources, entries = [], []
    for f in files:
        try:
            loaded = records.load(f)
        except (OSError, ValueError, KeyError) as e:
            print(f"skipping {f}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        for info, es in loaded:
            if not es:
                continue
            info["entries"] = len(es)
            sources.append(info)
            for e in es:
                e["_source"] = len(sources) - 1
                entries.append(e)
    return sources, entries


def _x(e, k):
    return (e.get("extra_info") or {}).get(k)


def latest(entries: list, key) -> list:
    """One entry per key(entry): the last input wins."""
    out = OrderedDict()
    for e in entries:
        out[key(e)] = e
    return list(out.values())


def kernel_cases(entries: list, sources: list) -> list:
    """[{op, case, dtype, gpu, smoke, ours, alt, auto}] per kernel case: its best-of-ours, best-alternative and
    auto entries (None where absent)."""
    cases = OrderedDict()
    for e in entries:
        if _x(e, "kind") != "kernel":
            continue
        src = sources[e["_source"]]
        k = (src["gpu"], _x(e, "op"), _x(e, "case"), _x(e, "dtype"))
        c = cases.setdefault(k, dict(op=k[1], case=k[2], dtype=k[3], gpu=k[0], smoke=bool(_x(e, "smoke")),
                                     source=e["_source"], ours=None, alt=None, auto=None, impls={}))
        c["impls"][_x(e, "impl")] = e
        c["source"] = e["_source"]
    for c in cases.values():
        impls = c["impls"]
        any_e = next(iter(impls.values()))
        best_ours, best_alt = _x(any_e, "best_ours"), _x(any_e, "best_alternative")
        c["ours"] = impls.get(best_ours) or _fastest([e for e in impls.values() if _x(e, "side") == "ours"])
        c["alt"] = impls.get(best_alt) or _fastest([e for e in impls.values() if _x(e, "side") == "pytorch"])
        c["auto"] = impls.get("auto")
    return list(cases.values())


def _fastest(es):
    es = [e for e in es if e["stats"].get("median")]
    return min(es, key=lambda e: e["stats"]["median"]) if es else None


def _speedup(c, which="ours"):
    e, alt = c[which], c["alt"]
    if e is None or alt is None or not e["stats"].get("median") or not alt["stats"].get("median"):
        return None
    return alt["stats"]["median"] / e["stats"]["median"]


# -------------------------------------------------------------------------------------------------- figures

def title(question: str, used: list) -> str:
    """The question, then the GPU(s) and commit(s) of the sources behind the figure, and the smoke note."""
    gpus = sorted({s["gpu"] for s in used}) or ["no data"]
    commits = sorted({(s["commit"] or "unknown commit")[:10] + ("+dirty" if s.get("dirty") else "") for s in used})
    text = f"{question}\n{', '.join(gpus)} @ {', '.join(commits) or 'unknown commit'}"
    if any(s["smoke"] and s["gpu"] == "cpu" for s in used):
        text += f"\n{SMOKE_NOTE}"
    elif any(s["smoke"] for s in used):
        text += "\nSMOKE RUN: tiny shapes, not the models'"
    return text


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _empty(ax, what: str):
    ax.text(0.5, 0.5, f"no {what} in the inputs", ha="center", va="center", transform=ax.transAxes, fontsize=12)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def fig_speedup(cases: list, sources: list, path: Path) -> Path:
    plt = _plt()
    rows = sorted((c for c in cases if _speedup(c) is not None), key=lambda c: c["op"])  # stable: case order
    fig, ax = plt.subplots(figsize=(11, max(3.0, 0.24 * len(rows) + 1.8)))
    used = [sources[c["source"]] for c in rows]
    if not rows:
        _empty(ax, "kernel case with both ours and a PyTorch alternative (run: pytest bench --benchmark-only)")
    else:
        ops = sorted({c["op"] for c in rows})
        colors = {op: plt.cm.tab20(i % 20) for i, op in enumerate(ops)}
        ys = range(len(rows))
        ax.barh(list(ys), [_speedup(c) for c in rows], color=[colors[c["op"]] for c in rows], height=0.7,
                label="best of ours")
        autos = [(y, _speedup(c, "auto")) for y, c in zip(ys, rows) if _speedup(c, "auto") is not None]
        if autos:
            ax.scatter([a for _, a in autos], [y for y, _ in autos], marker="|", s=120, color="black", zorder=3,
                       label="auto (the runtime's measured dispatch)")
        ax.axvline(1.0, color="red", linewidth=1, linestyle="--", label="1x = the best alternative")
        ax.set_yticks(list(ys))
        ax.set_yticklabels([_short(f"{c['case']} [{c['dtype']}]", 70) for c in rows], fontsize=7)
        ax.invert_yaxis()
        _log_ticks(ax, [_speedup(c) for c in rows] + [a for _, a in autos], "x")
        ax.set_xlabel("speedup (x) = best PyTorch alternative's median time / ours (log scale; > 1: ours faster)")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title(FIGURES["speedup"], used), fontsize=10)
    return _save(fig, path)


def fig_roofline(cases: list, sources: list, path: Path) -> Path:
    plt = _plt()
    rows = [c for c in cases if c["ours"] is not None and _x(c["ours"], "pct_of_roofline") is not None]
    ops = sorted({c["op"] for c in rows})
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.35 * len(ops) + 1.8)))
    used = [sources[c["source"]] for c in rows]
    if not rows:
        _empty(ax, "kernel case with a roofline figure (run: pytest bench --benchmark-only)")
    else:
        y = {op: i for i, op in enumerate(ops)}
        ax.scatter([_x(c["ours"], "pct_of_roofline") for c in rows], [y[c["op"]] for c in rows], s=28,
                   color="tab:blue", label="best of ours", zorder=3)
        alt = [c for c in rows if c["alt"] is not None and _x(c["alt"], "pct_of_roofline") is not None]
        ax.scatter([_x(c["alt"], "pct_of_roofline") for c in alt], [y[c["op"]] - 0.2 for c in alt], s=28,
                   facecolors="none", edgecolors="tab:orange", label="best PyTorch alternative", zorder=3)
        ax.axvline(100.0, color="red", linewidth=1, linestyle="--", label="100% = the measured ceiling")
        ax.set_yticks(range(len(ops)))
        ax.set_yticklabels(ops, fontsize=8)
        ax.invert_yaxis()
        values = [_x(c["ours"], "pct_of_roofline") for c in rows] + [_x(c["alt"], "pct_of_roofline") for c in alt]
        if min(v for v in values if v > 0) < 1:  # spans decades (a CPU smoke run): log scale
            ax.set_xscale("log")
            ax.set_xlabel("% of the measured roofline (floor time / measured time; log scale)")
        else:
            ax.set_xlabel("% of the measured roofline (floor time / measured time)")
        ax.legend(loc="best", fontsize=8)
    ax.set_title(title(FIGURES["roofline"], used), fontsize=10)
    return _save(fig, path)


def _log_ticks(ax, values, suffix: str) -> None:
    """A log x axis with ticks at 1-2-5 steps, written as plain numbers ("0.5x", "2x")."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log")
    vals = [v for v in values if v and v > 0]
    lo, hi = min(vals + [1.0]), max(vals + [1.0])
    ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5) if lo / 1.5 <= m * 10.0 ** e <= hi * 1.5]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:g}{suffix}" for t in ticks])
    ax.set_xlim(lo / 1.6, hi * 1.6)


def _series(entries, kind, xkey, ykey, label):
    out = OrderedDict()
    for e in entries:
        if _x(e, "kind") != kind or _x(e, xkey) is None or ykey(e) is None:
            continue
        out.setdefault(label(e), {})[_x(e, xkey)] = (ykey(e), e)
    return out


def fig_decode(entries: list, sources: list, path: Path) -> Path:
    plt = _plt()
    series = _series(entries, "decode", "batch", lambda e: _x(e, "tokens_per_s"),
                     lambda e: f"{_x(e, 'preset')} {_x(e, 'impl')} ({sources[e['_source']]['gpu']})")
    fig, ax = plt.subplots(figsize=(9, 5.5))
    used = [sources[e["_source"]] for s in series.values() for _, e in s.values()]
    if not series:
        _empty(ax, "decode results (run: bench/bench_generate.py, bench/bench_quant_decode.py)")
    else:
        batches = sorted({b for s in series.values() for b in s})
        for label, pts in series.items():
            xs = sorted(pts)
            ax.plot(xs, [pts[b][0] for b in xs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches)
        ax.set_xticklabels([str(b) for b in batches])
        ax.set_yscale("log")
        ax.set_xlabel("batch size (sequences decoded together)")
        ax.set_ylabel("decode throughput (tokens/s, all sequences; log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    ax.set_title(title(FIGURES["decode"], used), fontsize=10)
    return _save(fig, path)


def fig_vit(entries: list, sources: list, path: Path) -> Path:
    plt = _plt()
    series = _series(entries, "vit", "patches", lambda e: e["stats"].get("median") and e["stats"]["median"] * 1e3,
                     lambda e: f"{_x(e, 'preset')} {_x(e, 'impl')} ({sources[e['_source']]['gpu']})")
    fig, ax = plt.subplots(figsize=(9, 5.5))
    used = [sources[e["_source"]] for s in series.values() for _, e in s.values()]
    if not series:
        _empty(ax, "vision tower results (run: bench/bench_vision_tower.py)")
    else:
        names = {}
        for label, pts in series.items():
            xs = sorted(pts)
            ax.plot(xs, [pts[p][0] for p in xs], marker="o", label=label)
            names.update({p: _x(pts[p][1], "image") for p in xs})
        ticks = sorted(names)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{names[p]}\n{p} patches" for p in ticks], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("image size (pixels; patches of 14x14 px, log scale)")
        ax.set_ylabel("vision tower + merger time (ms, end to end; log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    ax.set_title(title(FIGURES["vit"], used), fontsize=10)
    return _save(fig, path)


# -------------------------------------------------------------------------------------------------- tables

def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _ms(e):
    return f"{e['stats']['median'] * 1e3:.4g}" if e is not None and e["stats"].get("median") else "-"


def _f(v, fmt=".2f", suffix=""):
    return format(v, fmt) + suffix if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
        else "-"


def _pct(e):
    if e is None or _x(e, "pct_of_roofline") is None:
        return "-"
    from bench.roofline import format_pct

    return format_pct(_x(e, "pct_of_roofline"))


def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def kernel_table(cases: list, ops: list) -> list:
    lines = ["| op | case | dtype | best of ours | ms | best alternative | ms | speedup | auto | % roofline (ours) "
             "| GPU |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    by_op = OrderedDict((op, []) for op in ops)
    for c in cases:
        by_op.setdefault(c["op"], []).append(c)
    for op, cs in by_op.items():
        if not cs:
            lines.append(f"| {op} | (no result in the inputs) | | | | | | | | | |")
            continue
        for c in cs:
            gpu = c["gpu"] + ((" (CPU smoke)" if c["gpu"] == "cpu" else " (smoke)") if c["smoke"] else "")
            lines.append("| " + " | ".join(_cell(x) for x in (
                op, c["case"], c["dtype"], _x(c["ours"], "impl") if c["ours"] else "-", _ms(c["ours"]),
                _x(c["alt"], "impl") if c["alt"] else "-", _ms(c["alt"]), _f(_speedup(c), ".3g", "x"),
                _f(_speedup(c, "auto"), ".3g", "x"), _pct(c["ours"]), gpu)) + " |")
    return lines


def other_tables(entries: list, sources: list) -> list:
    out = []
    dec = [e for e in entries if _x(e, "kind") == "decode"]
    if dec:
        out += ["", "## Decode", "", "| preset | impl | batch | tokens/s | ms/step | % roofline | GPU |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {_x(e, 'preset')} | {_x(e, 'impl')} | {_x(e, 'batch')} | {_f(_x(e, 'tokens_per_s'), '.1f')} | "
                f"{_f(_x(e, 'ms_per_step'), '.3f')} | {_f(_x(e, 'pct_of_roofline'), '.1f', '%')} | "
                f"{_gpu(sources, e)} |" for e in dec]
    vit = [e for e in entries if _x(e, "kind") == "vit"]
    if vit:
        out += ["", "## Vision tower", "", "| preset | image | patches | impl | ms | speedup vs transformers | GPU |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {_x(e, 'preset')} | {_x(e, 'image')} | {_x(e, 'patches')} | {_x(e, 'impl')} | {_ms(e)} | "
                f"{_f(_x(e, 'speedup_vs_transformers'), '.2f', 'x')} | {_gpu(sources, e)} |" for e in vit]
    fwd = [e for e in entries if _x(e, "kind") in ("forward", "prefill")]
    if fwd:
        out += ["", "## Model forward and image prefill", "", "| what | preset | impl | seq len | ms | TFLOP/s | GPU |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {_x(e, 'kind')} | {_x(e, 'preset')} | {_x(e, 'impl')} | {_x(e, 'seq_len')} | {_ms(e)} | "
                f"{_f(_x(e, 'tflops'), '.3g')} | {_gpu(sources, e)} |" for e in fwd]
    srv = [e for e in entries if _x(e, "kind") == "serve"]
    if srv:
        out += ["", "## Serving", "", "| target | preset | request rate | output tok/s | requests/s | TTFT p50 ms "
                "| TPOT p50 ms | GPU |", "|---|---|---|---|---|---|---|---|"]
        out += [f"| {_x(e, 'target')} | {_x(e, 'preset')} | {_x(e, 'request_rate')} | "
                f"{_f(_x(e, 'output_throughput'), '.1f')} | {_f(_x(e, 'request_throughput'), '.2f')} | "
                f"{_f((_x(e, 'ttft_ms') or {}).get('p50'), '.1f')} | {_f((_x(e, 'tpot_ms') or {}).get('p50'), '.2f')} "
                f"| {_gpu(sources, e)} |" for e in srv]
    return out


def _gpu(sources, e):
    s = sources[e["_source"]]
    return s["gpu"] + ((" (CPU smoke)" if s["gpu"] == "cpu" else " (smoke)") if s["smoke"] else "")


def write_report(paths, out_dir) -> dict:
    """Read `paths`, write report.md and the PNGs into `out_dir`; returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources, entries = gather(paths)
    cases = kernel_cases(entries, sources)
    written = OrderedDict()
    written["speedup"] = fig_speedup(cases, sources, out / "speedup.png")
    written["roofline"] = fig_roofline(cases, sources, out / "roofline.png")
    written["decode"] = fig_decode(entries, sources, out / "decode.png")
    written["vit"] = fig_vit(entries, sources, out / "vit.png")
    lines = ["# Benchmark report", ""]
    if any(s["smoke"] for s in sources):
        lines += [f"**Some inputs are CPU smoke runs ({SMOKE_NOTE}); their rows say so.**", ""]
    lines += ["## Sources", "", "| file | benchmark | GPU | commit | smoke | created | entries |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {_cell(Path(s['file'].split(':')[0]).name)} | {s['name']} | {s['gpu']} | "
              f"{(s['commit'] or '-')[:10]}{'+dirty' if s.get('dirty') else ''} | {'yes' if s['smoke'] else 'no'} | "
              f"{s['created'] or '-'} | {s['entries']} |" for s in sources]
    lines += ["", "## Figures", ""]
    lines += [f"- {FIGURES[k]}: [{p.name}]({p.name})" for k, p in written.items()]
    lines += ["", f"![speedup]({written['speedup'].name})", "", "## Kernels: every op of the registry", ""]
    lines += kernel_table(cases, registry_ops())
    lines += other_tables(entries, sources)
    written["table"] = out / "report.md"
    written["table"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="pytest-benchmark JSON, bench/results files, bundles or folders of them")
    p.add_argument("--out", required=True, help="folder for report.md and the PNGs")
    args = p.parse_args(argv)
    written = write_report(args.inputs, args.out)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
