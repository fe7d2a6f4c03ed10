"""transformers with `qwen2vl_fast.patch(model)` vs the same model unpatched: `generate()` and the vision tower.

Per preset (random-weight checkpoint, cached under $TMPDIR): one transformers model (sdpa), one image prompt
(`--image`, `--prompt-tokens` text tokens, random pixel_values already on the device). Same process, same inputs,
same model object: first unpatched, then `qwen2vl_fast.patch(model, backend=--backend)`.
- generate: `model.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)` (image prefill + N-1 decode
  steps; `--cache static` for a StaticCache, which on CUDA also makes transformers compile the decode step),
  wall time around each call with a device sync; tokens_equal says whether both produced the same tokens.
- vision: `model.model.visual(pixel_values, grid_thw=...)` under inference_mode; rel_err of the features.
Each figure: one warm-up call, then the median of `--reps` timed calls. speedup = unpatched / patched.
JSON via results.write_result("hf_patch", ...), with the patch report, which attention path ran how often
(attention_paths: prefill / decode / masked ... / sdpa, eager calls) and the bytes of the parameters' storages
unpatched and patched (equal: the fused q/k/v and gate/up are the only copy).

    python bench/bench_hf_patch.py --presets qwen2-vl-2b qwen2.5-vl-3b --new-tokens 128
CPU smoke: --presets tiny-qwen2-vl --device cpu --dtype float32 --new-tokens 4 --prompt-tokens 8 --image 56x84
    --reps 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable without keeping the root on the path
    _ROOT = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, _ROOT)
    import bench  # noqa: F401
    sys.path.remove(_ROOT)

import qwen2vl_fast
from bench import results
from bench.bench_model_forward import DTYPES, _size, build_inputs, ensure_checkpoint, free_memory, load_transformers
from qwen2vl_fast.config import load_config
from qwen2vl_fast.hf_patch.attention import PATHS
from qwen2vl_fast.testing.hf_compat import transformers_inputs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["qwen2-vl-2b"])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=64, help="text tokens around the image")
    p.add_argument("--image", type=_size, default="448x448", help="WIDTHxHEIGHT in pixels, multiples of 28")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", help="qwen2vl_fast backend for the patch")
    p.add_argument("--cache", default="dynamic", choices=["dynamic", "static"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="bench/results")
    return p.parse_args(argv)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(call, reps: int, device) -> tuple[dict, object]:
    """One warm-up call (its result returned), then `reps` timed calls, wall clock with a device sync."""
    with torch.inference_mode():
        first = call()
        times = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            call()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": reps}, first


def _storage_bytes(model) -> int:
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}.values())


def run_preset(args, preset: str) -> dict:
    dtype = DTYPES[args.dtype]
    ckpt = ensure_checkpoint(preset, dtype, args.seed)
    cfg = load_config(ckpt)
    model = load_transformers(ckpt, args.device, dtype, cfg.model_type)
    width, height = args.image
    inputs = {k: (v.to(args.device) if torch.is_tensor(v) else v)
              for k, v in build_inputs(cfg, width, height, args.prompt_tokens, args.seed).items()}
    inputs = transformers_inputs(inputs)
    gen_kw = {"do_sample": False, "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens,
              "pad_token_id": cfg.bos_token_id}
    if args.cache == "static":
        gen_kw["cache_implementation"] = "static"
    pixels = inputs["pixel_values"].to(dtype)
    grid = inputs["image_grid_thw"]

    def generate():
        return model.generate(**inputs, **gen_kw)

    def vision():  # the merged features: a tensor in transformers 4, pooler_output in 5
        out = model.model.visual(pixels, grid_thw=grid)
        return out if torch.is_tensor(out) else out.pooler_output

    out = {"model_type": cfg.model_type, "image_grid_thw": grid.tolist(), "prompt_len": inputs["input_ids"].shape[1],
           "generate": {}, "vision": {}}
    out["generate"]["unpatched"], ref_tokens = timed(generate, args.reps, args.device)
    out["vision"]["unpatched"], ref_features = timed(vision, args.reps, args.device)
    out["param_bytes"] = {"unpatched": _storage_bytes(model)}
    t0 = time.perf_counter()
    qwen2vl_fast.patch(model, backend=args.backend)
    out["patch_s"] = time.perf_counter() - t0
    out["param_bytes"]["patched"] = _storage_bytes(model)
    out["report"] = str(model.qwen2vl_fast_report)
    PATHS.clear()
    out["generate"]["patched"], tokens = timed(generate, args.reps, args.device)
    out["attention_paths"] = dict(PATHS)
    out["vision"]["patched"], features = timed(vision, args.reps, args.device)
    qwen2vl_fast.unpatch(model)
    out["generate"]["tokens_equal"] = bool(torch.equal(tokens, ref_tokens))
    out["generate"]["new_tokens"] = args.new_tokens
    ref = ref_features.float()
    out["vision"]["rel_err"] = float((features.float() - ref).norm() / ref.norm())
    for part in ("generate", "vision"):
        d = out[part]
        d["speedup"] = d["unpatched"]["median_ms"] / d["patched"]["median_ms"]
    d = out["generate"]
    for impl in ("unpatched", "patched"):
        d[impl]["tokens_per_s"] = args.new_tokens / (d[impl]["median_ms"] / 1e3)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    payload = {"device": args.device, "dtype": args.dtype, "backend": args.backend, "cache": args.cache,
               "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "image": list(args.image),
               "presets": {}}
    rc = 0
    for preset in args.presets:
        try:
            payload["presets"][preset] = run_preset(args, preset)
        except Exception as e:  # noqa: BLE001 (one preset's failure is recorded, the others still run)
            traceback.print_exc()
            payload["presets"][preset] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            rc = 1
        free_memory(args.device)
    path = results.write_result("hf_patch", payload, args.out_dir)
    for preset, r in payload["presets"].items():
        if "error" in r:
            print(f"{preset}: {r['error']}")
            continue
        g, v = r["generate"], r["vision"]
        print(f"{preset}: generate {g['unpatched']['median_ms']:.1f} -> {g['patched']['median_ms']:.1f} ms "
              f"({g['speedup']:.2f}x, tokens equal: {g['tokens_equal']}); vision {v['unpatched']['median_ms']:.2f} "
              f"-> {v['patched']['median_ms']:.2f} ms ({v['speedup']:.2f}x, rel err {v['rel_err']:.1e})")
    print(f"wrote {path}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
