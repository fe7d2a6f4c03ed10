"""Full-model forward (prefill logits): ours (torch reference backend) vs transformers (SDPA), side by side.

What is measured: one call `model(input_ids, attention_mask, pixel_values, image_grid_thw)` returning logits
for every position, batch 1: the vision tower on one image (default 1344x896 -> 6144 patches -> 1536 merged
tokens), then the decoder prefill over text + image tokens. Both models load the same random-weight checkpoint
in one process, one at a time (each is freed before the next loads). Device time is the median of `--reps`
calls after warm-up (CUDA events); no input rotation: gigabytes of weights stream through L2 anyway.
Reported: median/p20/p80 ms, speedup (transformers ms / ours ms), TFLOP/s against the measured matmul ceiling
(bench/flops.py counts the FLOPs), peak memory, and how far our logits are from transformers'.

    python bench/bench_model_forward.py [--preset qwen2-vl-2b] [--image 1344x896] [--text-tokens 64]
        [--dtype bfloat16] [--device cuda] [--checkpoint DIR] [--reps N] [--skip-transformers]
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
IM_START, VISION_START, VISION_END, IMAGE_PAD = 151644, 151652, 151653, 151655


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
    p.add_argument("--out-dir", default="bench/results", help="result JSON folder (relative: to the repo root)")
    return p.parse_args(argv)


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
    """input_ids = <|im_start|>, text, <|vision_start|>, N/4 <|image_pad|>, <|vision_end|>, text (batch 1).

    grid = (1, H/14, W/14); pixel_values random float32 (N, 1176), the shape the processor emits. Text ids are
    random in [0, 1000); `text_tokens` counts every token outside the vision span.
    """
    v = cfg.vision
    unit = v.patch_size * v.spatial_merge_size
    if width % unit or height % unit or width <= 0 or height <= 0:
        raise SystemExit(f"--image {width}x{height}: both sides must be positive multiples of {unit}")
    if text_tokens < 1:
        raise SystemExit("--text-tokens must be >= 1 (the <|im_start|> token)")
    gh, gw = height // v.patch_size, width // v.patch_size
    n = gh * gw
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 1000, (text_tokens - 1,), generator=gen).tolist()
    half = len(text) // 2
    ids = [IM_START, *text[:half], VISION_START, *[IMAGE_PAD] * (n // v.merge_unit), VISION_END, *text[half:]]
    return dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                pixel_values=torch.randn(n, v.patch_dim, generator=gen),
                image_grid_thw=torch.tensor([[1, gh, gw]]))


def load_ours(ckpt, device, dtype, model_type):
    return qwen2vl_fast.load(ckpt, device=device, dtype=dtype, backend="torch")


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


def run_impl(name, loader, args, ckpt, model_type, inputs, extra_kwargs):
    """Load, check one call, time, free. Returns (report dict, logits on CPU in float32 or None)."""
    report, logits, model = dict(impl=name), None, None
    cuda = torch.device(args.device).type == "cuda"
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model = loader(ckpt, args.device, DTYPES[args.dtype], model_type)
        report["load_s"] = time.perf_counter() - t0
        dev_inputs = {k: v.to(args.device) for k, v in inputs.items()}
        with torch.inference_mode():
            call = lambda: model(**dev_inputs, **extra_kwargs)  # noqa: E731
            logits = call().logits.float().cpu()  # the first call is also a warm-up
            report["timing"] = harness.time_fn(call, warmup=args.warmup, rep=args.reps, device=args.device)
        report["logits_shape"] = list(logits.shape)
        if cuda:
            report["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    except Exception as e:  # keep going: the other implementation's numbers are still worth the GPU call
        traceback.print_exc()
        report["error"] = f"{type(e).__name__}: {e}"
    del model
    free_memory(args.device)
    return report, logits


def compare_logits(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    """max |d|, max |d| / max |ref|, ||d|| / ||ref|| (DESIGN.md's parity metric) and top-1 agreement."""
    if ours.shape != ref.shape:
        return dict(error=f"shape mismatch: ours {list(ours.shape)} vs transformers {list(ref.shape)}")
    d = (ours - ref).abs()
    return dict(max_abs=d.max().item(), max_rel=(d.max() / ref.abs().max()).item(),
                rel_l2=((ours - ref).norm() / ref.norm()).item(), nan_ours=int(ours.isnan().sum()),
                top1_agree=(ours.argmax(-1) == ref.argmax(-1)).float().mean().item())


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
    cuda = torch.device(args.device).type == "cuda"
    ceilings = roofline.device_ceilings(args.device, dtype) if cuda else None  # before the models take memory
    free_memory(args.device)

    impls = [("ours", load_ours, {})]
    if not args.skip_transformers:  # use_cache=False: prefill logits only, as ours computes
        from qwen2vl_fast.testing.hf_compat import mm_token_type_ids, transformers_major

        hf_kw = dict(use_cache=False)
        if transformers_major() >= 5:  # transformers 5 needs the per-token modality its processor returns
            hf_kw["mm_token_type_ids"] = mm_token_type_ids(inputs["input_ids"]).to(args.device)
        impls.append(("transformers", load_transformers, hf_kw))
    reports, logits = {}, {}
    for name, loader, kw in impls:
        reports[name], logits[name] = run_impl(name, loader, args, ckpt, cfg.model_type, inputs, kw)
        t = reports[name].get("timing")
        if t:
            reports[name]["tflops"] = count["total"] / (t["median_ms"] * 1e-3) / 1e12
            if ceilings:
                reports[name]["roofline"] = roofline.roofline_fraction(count["total"], weight_bytes,
                                                                       t["median_ms"], ceilings)
    both = [reports.get(k, {}).get("timing") for k in ("ours", "transformers")]
    speedup = both[1]["median_ms"] / both[0]["median_ms"] if all(both) else None
    diff = compare_logits(logits["ours"], logits["transformers"]) \
        if logits.get("ours") is not None and logits.get("transformers") is not None else None

    payload = dict(preset=args.preset, model_type=cfg.model_type, checkpoint=ckpt,
                   random_weights=not args.checkpoint, dtype=args.dtype, device=args.device, image=[width, height],
                   image_grid_thw=inputs["image_grid_thw"].tolist(), text_tokens=args.text_tokens, seq_len=seq_len,
                   warmup=args.warmup, reps=args.reps, flops=count, weight_bytes=weight_bytes, ceilings=ceilings,
                   impls=reports, speedup_transformers_over_ours=speedup, logits_diff=diff)
    path = results.write_result("model_forward", payload, args.out_dir)
    print_table(payload, path)
    return 1 if any("error" in r for r in reports.values()) else 0


def print_table(p: dict, path) -> None:
    print(f"\nmodel_forward  {p['preset']}  {p['dtype']}  {p['device']} ({results.gpu_name()})  "
          f"image {p['image'][0]}x{p['image'][1]} grid {p['image_grid_thw'][0]}  seq_len {p['seq_len']}")
    f = p["flops"]
    print(f"FLOPs: vision {f['vision']['total']:.3e}  text {f['text']['total']:.3e}  total {f['total']:.3e}")
    if p["ceilings"]:
        c = p["ceilings"]
        print(f"ceilings: {c['tflops']:.0f} TFLOP/s ({c['dtype']} matmul)  {c['gbps']:.0f} GB/s (copy)")
    print(f"{'impl':<14}{'median ms':>11}{'p20':>10}{'p80':>10}{'TFLOP/s':>10}{'% matmul':>10}"
          f"{'peak GiB':>10}{'load s':>8}")
    for name, r in p["impls"].items():
        if "error" in r:
            print(f"{name:<14}FAILED: {r['error'][:100]}")
            continue
        t, roof = r["timing"], r.get("roofline") or {}
        pct = f"{roof['pct_of_tflops']:.1f}" if roof else "-"
        peak = f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "-"
        print(f"{name:<14}{t['median_ms']:>11.2f}{t['p20_ms']:>10.2f}{t['p80_ms']:>10.2f}{r['tflops']:>10.3g}"
              f"{pct:>10}{peak:>10}{r['load_s']:>8.1f}")
    if p["speedup_transformers_over_ours"]:
        print(f"speedup (transformers ms / ours ms): {p['speedup_transformers_over_ours']:.2f}x")
    d = p["logits_diff"]
    if d and "error" not in d:
        print(f"logits vs transformers: max|d| {d['max_abs']:.3e}  max|d|/max|ref| {d['max_rel']:.3e}  "
              f"||d||/||ref|| {d['rel_l2']:.3e}  top-1 agree {100 * d['top1_agree']:.2f}%")
    elif d:
        print(f"logits vs transformers: {d['error']}")
    print(f"result: {path}")


if __name__ == "__main__":
    sys.exit(main())
