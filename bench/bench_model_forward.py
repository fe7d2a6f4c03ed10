"""Full-model forward (prefill logits): ours (the default `auto` path) vs transformers (SDPA) and transformers
under torch.compile, side by side.

What is measured: one call `model(input_ids, attention_mask, pixel_values, image_grid_thw)` returning logits
for every position, batch 1: the vision tower on one image (default 1344x896 -> 6144 patches -> 1536 merged
tokens), then the decoder prefill over text + image tokens. Every model loads the same random-weight checkpoint
in one process, one at a time (each is freed before the next loads).
- ours: `qwen2vl_fast.load(backend="auto")`, what a user gets: per op and shape the implementation the measured
  dispatch finds fastest here; `qwen2vl_fast.tune(model, inputs)` runs first where the package has it, so no
  timed call measures (its time and report are in the result);
- transformers: `from_pretrained(attn_implementation="sdpa")`, eager;
- transformers-compile: the same model through `torch.compile(model, mode=--compile-mode)` (CUDA only unless
  --compile is given); the first call, which compiles, is timed apart (`compile_s`) and kept out of the timing.
  No static cache here: this is a single prefill with use_cache=False (bench_generate.py times the decode with a
  static cache + compile).
Timing: the same for every side, CUDA events around each call, median of `--reps` after `--warmup`: an end-to-end
figure, host work included (what a caller waits for); no input rotation: gigabytes of weights stream through L2.
Reported: median/p20/p80 ms, speedups (their ms / ours), TFLOP/s and % of the measured bf16 matmul rate
(bench/flops.py counts the FLOPs; roofline against each weight read once), peak memory, and how far our logits
are from transformers'.

    python bench/bench_model_forward.py [--preset qwen2-vl-2b] [--image 1344x896] [--text-tokens 64]
        [--dtype bfloat16] [--device cuda] [--checkpoint DIR] [--reps N] [--skip-transformers] [--skip-compile]
        [--compile-mode default] [--backend auto] [--skip-tune]
CPU smoke test: --preset tiny-qwen2-vl --image 56x84 --text-tokens 8 --device cpu --dtype float32 --reps 2
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` (and an uninstalled qwen2vl_fast) importable, then
    _ROOT = str(Path(__file__).resolve().parents[1])  # drop the root again: it also holds `kernels/`, a name
    sys.path.insert(0, _ROOT)  # that transformers probes for (DESIGN.md "Layout")
    import bench  # noqa: F401
    import qwen2vl_fast  # noqa: F401
    sys.path.remove(_ROOT)

import qwen2vl_fast
from bench import flops, harness, results, roofline
from qwen2vl_fast.config import load_config

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    return width, height


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen2-vl-2b", help="qwen2vl_fast preset for the random checkpoint")
    p.add_argument("--image", type=_size, default="1344x896", help="WIDTHxHEIGHT in pixels, multiples of 28")
    p.add_argument("--text-tokens", type=int, default=64, help="tokens outside the image span (incl. <|im_start|>)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpoint", help="checkpoint dir; default: a random one cached under $TMPDIR")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--backend", default="auto", help="our op backend: auto (the default path) | triton | cuda | torch")
    p.add_argument("--skip-tune", action="store_true", help="do not call qwen2vl_fast.tune before timing")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="time transformers under torch.compile too (default: on CUDA only)")
    p.add_argument("--skip-compile", dest="compile", action="store_false")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode for transformers (max-autotune-no-cudagraphs: minutes more)")
    p.add_argument("--fp32-reference", action=argparse.BooleanOptionalAction, default=True,
                   help="for bf16/fp16 runs, also run transformers once in fp32 on the same weights and judge our "
                        "logits by DESIGN.md's rule: error vs fp32 within 2x transformers' own (default: on)")
    p.add_argument("--out-dir", default="bench/results", help="result JSON folder (relative: to the repo root)")
    args = p.parse_args(argv)
    if args.compile is None:
        args.compile = torch.device(args.device).type == "cuda"
    return args


def ensure_checkpoint(preset: str, dtype: torch.dtype, seed: int = 0) -> str:
    """A random checkpoint for `preset`, written once per machine under $TMPDIR/qwen2vl_fast_bench and reused.

    Written to a scratch folder and renamed into place after a '.complete' marker, so an interrupted write is
    never taken for a checkpoint.
    """
    from qwen2vl_fast.testing.checkpoint_writer import write_random_checkpoint

    root = Path(os.environ.get("QWEN2VL_FAST_BENCH_CACHE", Path(tempfile.gettempdir()) / "qwen2vl_fast_bench"))
    final = root / f"{preset}-{str(dtype).removeprefix('torch.')}-seed{seed}"
    if (final / ".complete").exists():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=root))
    try:
        written = Path(write_random_checkpoint(str(scratch), preset=preset, dtype=dtype, seed=seed))
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    (written / ".complete").write_text("")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(written, final)
    shutil.rmtree(scratch, ignore_errors=True)
    return str(final)


def build_inputs(cfg, width: int, height: int, text_tokens: int, seed: int) -> dict:
    """One image prompt (qwen2vl_fast.testing.inputs.image_prompt: <|im_start|>, text, the image's pads, text;
    random pixel_values in the processor's (N, 1176) layout); a bad size or token count ends the script."""
    from qwen2vl_fast.testing.inputs import image_prompt

    try:
        return image_prompt(cfg, width, height, text_tokens, seed)
    except ValueError as e:
        raise SystemExit(f"--image {width}x{height} / --text-tokens {text_tokens}: {e}") from None


def load_ours(ckpt, device, dtype, backend="auto"):
    return qwen2vl_fast.load(ckpt, device=device, dtype=dtype, backend=backend)


def load_transformers(ckpt, device, dtype, model_type):
    import transformers

    cls = (transformers.Qwen2VLForConditionalGeneration if model_type == "qwen2_vl"
           else transformers.Qwen2_5_VLForConditionalGeneration)
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56; 5.x knows only dtype
    return cls.from_pretrained(ckpt, attn_implementation="sdpa", **{dtype_kw: dtype}).to(device).eval()


def free_memory(device: str):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_forward(call, args, report: dict) -> torch.Tensor:
    """One checked call (also a warm-up), then `reps` timed calls: CUDA events around each call on an idle queue,
    the same for every implementation: an end-to-end figure, host work included (what a caller waits for).
    Returns the logits of the first call (CPU, float32)."""
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = call().logits.float().cpu()
        report["first_call_s"] = time.perf_counter() - t0
        report["timing"] = harness.time_fn(call, warmup=args.warmup, rep=args.reps, device=args.device,
                                           method="events")
    report["logits_shape"] = list(logits.shape)
    if cuda:
        report["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return logits


def tune_ours(model, inputs: dict) -> dict:
    """`qwen2vl_fast.tune` at this input's shapes (the measured dispatch measures every raced op once here, so no
    timed call measures): {"tune_s", "tune_report"}."""
    t0 = time.perf_counter()
    report = qwen2vl_fast.tune(model, inputs)
    return dict(tune_s=time.perf_counter() - t0, tune_report=report)


def run_ours(args, ckpt, inputs) -> tuple[dict, dict]:
    """Load with our default path (backend "auto": the measured dispatch), tune, time, free."""
    report, logits, model = dict(impl="ours", backend=args.backend), None, None
    try:
        t0 = time.perf_counter()
        model = load_ours(ckpt, args.device, DTYPES[args.dtype], args.backend)
        report["load_s"] = time.perf_counter() - t0
        report["chosen"] = dict(getattr(model.ops, "chosen", {}))
        dev_inputs = {k: v.to(args.device) for k, v in inputs.items()}
        if not args.skip_tune:
            report.update(tune_ours(model, dev_inputs))
        logits = time_forward(lambda: model(**dev_inputs), args, report)
    except Exception as e:  # keep going: the other implementations' numbers are still worth the GPU call
        traceback.print_exc()
        report["error"] = f"{type(e).__name__}: {e}"
    del model
    free_memory(args.device)
    return {"ours": report}, {"ours": logits}


def run_transformers(args, ckpt, model_type, inputs, hf_kwargs) -> tuple[dict, dict]:
    """transformers with SDPA attention eagerly, then the same model under torch.compile (its compile timed
    apart, as first_call_s, and kept out of the timing)."""
    reports, logits, model = {}, {}, None
    eager = dict(impl="transformers", attn="sdpa")
    try:
        t0 = time.perf_counter()
        model = load_transformers(ckpt, args.device, DTYPES[args.dtype], model_type)
        eager["load_s"] = time.perf_counter() - t0
        dev_inputs = {k: v.to(args.device) for k, v in inputs.items()}
        reports["transformers"] = eager
        logits["transformers"] = time_forward(lambda: model(**dev_inputs, **hf_kwargs), args, eager)
        if args.compile:
            compiled_report = dict(impl="transformers-compile", attn="sdpa", compile_mode=args.compile_mode)
            reports["transformers-compile"] = compiled_report
            compiled = torch.compile(model, mode=args.compile_mode)
            logits["transformers-compile"] = time_forward(lambda: compiled(**dev_inputs, **hf_kwargs), args,
                                                          compiled_report)
            compiled_report["compile_s"] = compiled_report["first_call_s"]
    except Exception as e:
        traceback.print_exc()
        failed = next((r for r in reversed(list(reports.values())) if "timing" not in r), None) or eager
        failed["error"] = f"{type(e).__name__}: {e}"
        reports.setdefault(failed["impl"], failed)
    del model
    free_memory(args.device)
    return reports, logits


def fp32_reference_logits(args, ckpt, model_type, inputs, hf_kwargs) -> torch.Tensor:
    """transformers' logits with the same (low-precision) weights upcast to fp32: one untimed call."""
    model = load_transformers(ckpt, args.device, torch.float32, model_type)
    try:
        with torch.inference_mode():
            dev_inputs = {k: v.to(args.device) for k, v in inputs.items()}
            return model(**dev_inputs, **hf_kwargs).logits.float().cpu()
    finally:
        del model
        free_memory(args.device)


def low_precision_parity(ours: torch.Tensor, theirs: torch.Tensor, fp32: torch.Tensor) -> dict:
    """DESIGN.md's numerics rule for bf16/fp16: our ||logits - fp32 logits|| / ||fp32 logits|| within twice
    transformers' own at the same precision (both against transformers in fp32 on the same weights)."""
    ours_err = ((ours - fp32).norm() / fp32.norm()).item()
    theirs_err = ((theirs - fp32).norm() / fp32.norm()).item()
    return dict(ours_vs_fp32=ours_err, transformers_vs_fp32=theirs_err,
                ratio=ours_err / theirs_err if theirs_err > 0 else float("inf"),
                within_2x=bool(ours_err <= 2 * theirs_err),
                top1_agree_ours_fp32=(ours.argmax(-1) == fp32.argmax(-1)).float().mean().item(),
                top1_agree_transformers_fp32=(theirs.argmax(-1) == fp32.argmax(-1)).float().mean().item())


def compare_logits(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    """max |d|, max |d| / max |ref|, ||d|| / ||ref|| (DESIGN.md's parity metric) and top-1 agreement."""
    if ours.shape != ref.shape:
        return dict(error=f"shape mismatch: ours {list(ours.shape)} vs transformers {list(ref.shape)}")
    d = (ours - ref).abs()
    return dict(max_abs=d.max().item(), max_rel=(d.max() / ref.abs().max()).item(),
                rel_l2=((ours - ref).norm() / ref.norm()).item(), nan_ours=int(ours.isnan().sum()),
                top1_agree=(ours.argmax(-1) == ref.argmax(-1)).float().mean().item())


def add_rates(reports: dict, count: dict, weight_bytes: int, ceilings) -> None:
    """TFLOP/s of each timed implementation and where it sits under the measured roofline."""
    for r in reports.values():
        t = r.get("timing")
        if not t:
            continue
        r["tflops"] = count["total"] / (t["median_ms"] * 1e-3) / 1e12
        if ceilings:
            r["roofline"] = roofline.roofline_fraction(count["total"], weight_bytes, t["median_ms"], ceilings)
            r["pct_of_matmul"] = r["roofline"]["pct_of_tflops"]


def speedups(reports: dict) -> dict:
    """{"vs_<impl>": their ms / our ms} for every timed transformers variant."""
    ours = reports.get("ours", {}).get("timing")
    if not ours:
        return {}
    return {f"vs_{name}": r["timing"]["median_ms"] / ours["median_ms"]
            for name, r in reports.items() if name != "ours" and r.get("timing")}


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    width, height = args.image
    ckpt = args.checkpoint or ensure_checkpoint(args.preset, dtype, args.seed)
    cfg = load_config(ckpt)
    inputs = build_inputs(cfg, width, height, args.text_tokens, args.seed)
    seq_len = inputs["input_ids"].shape[1]
    count = flops.forward_flops(cfg, inputs["image_grid_thw"].tolist(), seq_len)
    weight_bytes = (sum(flops.vision_matmul_params(cfg.vision).values()) + flops.text_matmul_params(cfg.text)) \
        * dtype.itemsize  # the fewest bytes: each weight read once (activations are smaller)
    ceilings = roofline.device_ceilings(args.device, dtype)  # before the models take memory
    free_memory(args.device)

    out = results.ResultFile("model_forward", args.out_dir)  # rewritten after each side: a timeout keeps ours

    def payload(reports: dict, logits: dict) -> dict:
        add_rates(reports, count, weight_bytes, ceilings)
        sp = speedups(reports)
        both = logits.get("ours") is not None and logits.get("transformers") is not None
        diff = compare_logits(logits["ours"], logits["transformers"]) if both else None
        parity = low_precision_parity(logits["ours"], logits["transformers"], logits["fp32"]) \
            if both and logits.get("fp32") is not None else None
        return dict(preset=args.preset, model_type=cfg.model_type, checkpoint=ckpt, random_weights=not args.checkpoint,
                    dtype=args.dtype, device=args.device, cpu_smoke=torch.device(args.device).type != "cuda",
                    image=[width, height], image_grid_thw=inputs["image_grid_thw"].tolist(),
                    text_tokens=args.text_tokens, seq_len=seq_len, warmup=args.warmup, reps=args.reps,
                    timing_method="cuda-events per call (end to end, host work included)", flops=count,
                    weight_bytes=weight_bytes, ceilings=ceilings, impls=reports, speedups=sp,
                    speedup_transformers_over_ours=sp.get("vs_transformers"), logits_diff=diff,
                    low_precision_parity=parity)

    reports, logits = run_ours(args, ckpt, inputs)
    out.update(payload(reports, logits))
    if not args.skip_transformers:  # use_cache=False: prefill logits only, as ours computes
        from qwen2vl_fast.testing.hf_compat import mm_token_type_ids, transformers_major

        hf_kw = dict(use_cache=False)
        if transformers_major() >= 5:  # transformers 5 needs the per-token modality its processor returns
            hf_kw["mm_token_type_ids"] = mm_token_type_ids(inputs["input_ids"]).to(args.device)
        hf_reports, hf_logits = run_transformers(args, ckpt, cfg.model_type, inputs, hf_kw)
        reports.update(hf_reports)
        logits.update(hf_logits)
        if args.fp32_reference and dtype != torch.float32 and logits.get("transformers") is not None:
            out.update(payload(reports, logits))  # the timings are kept if the fp32 model does not fit
            try:
                logits["fp32"] = fp32_reference_logits(args, ckpt, cfg.model_type, inputs, hf_kw)
            except Exception as e:  # noqa: BLE001 -- reported, the timings stand
                traceback.print_exc()
                reports.setdefault("transformers", {})["fp32_reference_error"] = f"{type(e).__name__}: {e}"
    final = payload(reports, logits)
    path = out.finish(final)
    print_table(final, path)
    return 1 if any("error" in r for r in reports.values()) else 0


def print_table(p: dict, path) -> None:
    print(f"\nmodel_forward  {p['preset']}  {p['dtype']}  {p['device']} ({results.gpu_name()})  "
          f"image {p['image'][0]}x{p['image'][1]} grid {p['image_grid_thw'][0]}  seq_len {p['seq_len']}")
    f = p["flops"]
    print(f"FLOPs: vision {f['vision']['total']:.3e}  text {f['text']['total']:.3e}  total {f['total']:.3e}")
    if p["ceilings"]:
        c = p["ceilings"]
        print(f"ceilings: {c['tflops']:.0f} TFLOP/s ({c['dtype']} matmul)  {c['gbps']:.0f} GB/s (copy)")
    print(f"{'impl':<22}{'median ms':>11}{'p20':>10}{'p80':>10}{'TFLOP/s':>10}{'% matmul':>10}"
          f"{'peak GiB':>10}{'1st call s':>11}")
    for name, r in p["impls"].items():
        if "error" in r:
            print(f"{name:<22}FAILED: {r['error'][:100]}")
            continue
        t, roof = r["timing"], r.get("roofline") or {}
        pct = roofline.format_pct(roof['pct_of_tflops']) if roof else "-"
        peak = f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "-"
        print(f"{name:<22}{t['median_ms']:>11.2f}{t['p20_ms']:>10.2f}{t['p80_ms']:>10.2f}{r['tflops']:>10.3g}"
              f"{pct:>10}{peak:>10}{r['first_call_s']:>11.1f}")
    for name, x in p["speedups"].items():
        print(f"speedup {name} (their ms / our ms): {x:.2f}x")
    d = p["logits_diff"]
    if d and "error" not in d:
        print(f"logits vs transformers: max|d| {d['max_abs']:.3e}  max|d|/max|ref| {d['max_rel']:.3e}  "
              f"||d||/||ref|| {d['rel_l2']:.3e}  top-1 agree {100 * d['top1_agree']:.2f}%")
    elif d:
        print(f"logits vs transformers: {d['error']}")
    q = p.get("low_precision_parity")
    if q:
        print(f"vs transformers fp32 (same weights): ours ||d||/||ref|| {q['ours_vs_fp32']:.3e}, transformers "
              f"{p['dtype']} {q['transformers_vs_fp32']:.3e}: {q['ratio']:.2f}x theirs "
              f"({'within' if q['within_2x'] else 'NOT within'} DESIGN.md's 2x)")
    print(f"result: {path}")


if __name__ == "__main__":
    sys.exit(main())
