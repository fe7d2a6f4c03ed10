"""Each vision kernel against the best PyTorch alternative, at the real shapes of one 1344x896 image.

Shapes: 6144 patches (grid 1x64x96), ViT width 1280, 16 heads of 80, MLP 5120 (Qwen2-VL) / 3420 (Qwen2.5-VL),
merger 5120 -> 1536; windows from the real Qwen2.5-VL window metadata (96 windows of <= 64 tokens).
Alternatives: SDPA with each backend (flash, efficient, cudnn, math) and transformers' per-window loop for
attention; cuBLAS (F.linear) for GEMMs; eager and `torch.compile` of the reference for norms, rotary, merger.
Reported: median ms (CUDA events, L2-rotating inputs for the memory-bound ops), TFLOP/s or GB/s against the
measured ceilings, speedup over the best alternative. JSON under bench/results/.

    python bench/bench_vision_kernels.py [--dtype bfloat16] [--reps 50] [--no-compile]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    _ROOT = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, _ROOT)
    import bench  # noqa: F401
    import qwen2vl_fast  # noqa: F401
    sys.path.remove(_ROOT)

from bench import harness, results, roofline
from bench.harness import fast_impls
from qwen2vl_fast.config import parse_config
from qwen2vl_fast.ops import get_op
from qwen2vl_fast.positions import vision_metadata
from qwen2vl_fast.presets import preset_config
from qwen2vl_fast.processing.patchify import CLIP_MEAN, CLIP_STD

S, E, H, D = 6144, 1280, 16, 80
GRID = [[1, 64, 96]]


def sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}


def sdpa_call(q, k, v, backend, scale):
    from torch.nn.attention import sdpa_kernel

    def run():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return run


def attention_cases(device, dtype):
    scale = D ** -0.5
    qkv = torch.randn(S, 3 * H * D, device=device, dtype=dtype)
    q, k, v = qkv.view(S, 3, H, D).unbind(1)
    cfg = parse_config(preset_config("qwen2.5-vl-7b"))
    metas = {"full (1 x 6144)": vision_metadata(cfg, torch.tensor(GRID), device).full,
             "windows (96 x <=64)": vision_metadata(cfg, torch.tensor(GRID), device).window}
    for label, meta in metas.items():
        impls = {name: (lambda f=f, m=meta: f(q, k, v, m, scale)) for name, f in fast_impls("varlen_attention",
                                                                                           device).items()}
        # transformers' loop: one SDPA per segment
        starts = torch.tensor([0, *meta.lengths]).cumsum(0).tolist()
        qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))

        def loop(m=meta, st=starts):
            return [F.scaled_dot_product_attention(qt[..., a:b, :], kt[..., a:b, :], vt[..., a:b, :], scale=scale)
                    for a, b in zip(st[:-1], st[1:])]
        impls["transformers-loop"] = loop
        if len(set(meta.lengths)) == 1 or label.startswith("windows"):
            n, L = len(meta.lengths), max(meta.lengths)  # padded batch: the best SDPA can do for varlen
            qb, kb, vb = (torch.randn(n, H, L, D, device=device, dtype=dtype) for _ in range(3))
            for name, backend in sdpa_backends().items():
                impls[name] = sdpa_call(qb, kb, vb, backend, scale)
        flops = sum(4 * n * n * D * H for n in meta.lengths)
        yield f"varlen_attention {label}", flops, 4 * S * H * D * dtype.itemsize, impls


def gemm_cases(device, dtype, compile_ok):
    x = torch.randn(S, E, device=device, dtype=dtype)
    for label, n, op, extra in (("qkv 1280->3840", 3 * E, "linear", ()),
                                ("fc1+quick_gelu 1280->5120", 5120, "linear_act", ("quick_gelu",)),
                                ("gate/up+swiglu 1280->2x3420", 2 * 3420, "linear_swiglu", ()),
                                ("patch_embed 1176->1280", E, "patch_embed", None)):
        if op == "patch_embed":
            a = torch.randn(S, 1176, device=device, dtype=torch.float32)
            w = torch.randn(E, 1176, device=device, dtype=dtype) * 0.02
            impls = {k: (lambda f=f: f(a, w)) for k, f in fast_impls(op, device).items()}
            impls["cublas F.linear"] = lambda: F.linear(a.to(dtype), w)
            yield label, 2 * S * 1176 * E, (a.numel() * 4 + w.numel() * 2 + S * E * 2), impls
            continue
        w = torch.randn(n, E, device=device, dtype=dtype) * 0.02
        b = torch.randn(n, device=device, dtype=dtype)
        ref = get_op(op).reference
        impls = {k: (lambda f=f: f(x, w, b, *extra)) for k, f in fast_impls(op, device).items()}
        impls["cublas eager"] = lambda: ref(x, w, b, *extra)
        if compile_ok:
            compiled = torch.compile(ref)
            impls["torch.compile"] = lambda: compiled(x, w, b, *extra)
        yield label, 2 * S * E * n, (x.numel() + w.numel() + S * n) * dtype.itemsize, impls


def memory_bound_cases(device, dtype, compile_ok):
    x, r = torch.randn(S, E, device=device, dtype=dtype), torch.randn(S, E, device=device, dtype=dtype)
    w, b = torch.randn(E, device=device, dtype=dtype), torch.randn(E, device=device, dtype=dtype)
    qkv = torch.randn(S, 3 * E, device=device, dtype=dtype)
    cos, sin = torch.randn(S, D, device=device), torch.randn(S, D, device=device)
    frames = torch.randint(0, 256, (1, 3, 896, 1344), dtype=torch.uint8, device=device)
    pw = torch.randn(E, 1176, device=device, dtype=dtype) * 0.02
    cases = (("add_layer_norm 6144x1280", "add_layer_norm", (x, r, w, b, 1e-6), 4 * S * E * dtype.itemsize),
             ("add_rms_norm 6144x1280", "add_rms_norm", (x, r, w, 1e-6), 4 * S * E * dtype.itemsize),
             ("vision_rotary 6144x16x80", "vision_rotary", (qkv, cos, sin, H), 4 * S * E * dtype.itemsize + 2 * S * D * 4),
             ("patch_embed_frames 1344x896", "patch_embed_frames", (frames, pw, CLIP_MEAN, CLIP_STD),
              frames.numel() + pw.numel() * 2 + S * E * 2))
    for label, op, args, nbytes in cases:
        ref = get_op(op).reference
        impls = {k: (lambda f=f, a=args: f(*a)) for k, f in fast_impls(op, device).items()}
        impls["torch eager"] = lambda a=args: ref(*a)
        if compile_ok and op != "patch_embed_frames":
            compiled = torch.compile(ref)
            impls["torch.compile"] = lambda a=args, c=compiled: c(*a)
        yield label, 0, nbytes, impls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_vision_kernels needs a CUDA device")
        return 1
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    ceilings = roofline.device_ceilings(device, dtype)
    rows = []
    groups = (attention_cases(device, dtype), gemm_cases(device, dtype, not args.no_compile),
              memory_bound_cases(device, dtype, not args.no_compile))
    for group in groups:
        for label, flops, nbytes, impls in group:
            times = {}
            for name, fn in impls.items():
                try:
                    with torch.inference_mode():
                        times[name] = harness.time_fn(fn, warmup=5, rep=args.reps, device=device)
                except Exception as e:  # a backend that does not support the shape: recorded, not fatal
                    times[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            ok = {n: t for n, t in times.items() if "median_ms" in t}
            alternatives = {n: t["median_ms"] for n, t in ok.items() if not n.startswith("ours")}
            best_alt = min(alternatives.items(), key=lambda kv: kv[1]) if alternatives else None
            for name, t in times.items():
                row = dict(kernel=label, impl=name, **t)
                if "median_ms" in t:
                    row.update(roofline.roofline_fraction(flops, nbytes, t["median_ms"], ceilings))
                    if best_alt and name.startswith("ours"):
                        row["speedup_vs_best_alternative"] = best_alt[1] / t["median_ms"]
                        row["best_alternative"] = best_alt[0]
                rows.append(row)
                ms = f"{t['median_ms']:9.3f}" if "median_ms" in t else f"{'error':>9s}"
                print(f"{label:34s} {name:20s} {ms} ms  {row.get('speedup_vs_best_alternative', '')}")
    print("result:", results.write_result("vision_kernels", {"dtype": args.dtype, "ceilings": ceilings, "rows": rows},
                                          out_dir=args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
