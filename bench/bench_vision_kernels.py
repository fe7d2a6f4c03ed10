"""Each vision kernel other than the GEMMs against the best PyTorch alternative, at the shapes of one 1344x896 image.

Shapes: 6144 patches (grid 1x64x96), ViT width 1280, 16 heads of 80; windows from the real Qwen2.5-VL window
metadata (96 windows of <= 64 tokens). The ViT's GEMMs (qkv, proj, fc1/gate-up, fc2/down, merger) are in
bench/bench_gemm.py.
- varlen_attention, full (1 x 6144) and windowed. Alternatives: SDPA with each backend (flash, efficient, cudnn,
  math) on the padded (B, H, L, D) batch (the best SDPA can do for varlen) and transformers' per-segment loop.
- patch_embed (the Conv3d as a GEMM from float32 pixels): cuBLAS on the pixels cast to the model dtype.
- patch_embed_frames (normalise + patchify + GEMM straight from uint8 frames), add_layer_norm, add_rms_norm,
  vision_rotary: the op's reference eagerly and under torch.compile.
Ours: every fast implementation that runs here, and "auto" (the runtime's measured dispatch).
Timing and fairness (bench/compare.py): one method for every candidate of a case (CUDA-graph replays, else a
pre-filled queue); memory-bound cases (the norms, rotary, the windowed attention: intensity under the measured
ridge) read inputs rotated past 2x L2. Reported: median / p20 / p80 ms, TFLOP/s or GB/s, % of the measured
roofline, speedup over the best alternative. JSON: "vision_kernels", written case by case.

Time budgets (bench/compare.py `Budget`): --budget-s for the whole run (default: $QWEN2VL_FAST_BENCH_BUDGET_S,
which bench/gpu_check.sh sets to its step's limit less a margin; else none) and --case-budget-s per case
(default 60). A case over its budget skips its remaining candidates; cases left when the total is spent are
skipped and named ("skipped_cases"); at the total budget, or on SIGTERM / SIGINT, the run stops and writes
every candidate timed so far ("stopped", the current case "partial"). The first H200 run timed out after its
first case, with nothing written for the second. The likely cause, found in the code (not yet confirmed on a
GPU): the windowed case cannot be captured whole (its reference gathers with a per-call host tensor, a pageable
copy), so every candidate falls back to the pre-filled queue, where a call that blocks the host (a sync, or the
measured dispatch measuring) was retried with spins that grew ~3x per attempt without bound (bench/harness.py
now detects such calls and bounds every spin); torch.compile of three references adds a compile each.

    python bench/bench_vision_kernels.py [--dtype bfloat16] [--reps 30] [--no-compile] [--budget-s 270]
CPU smoke (tiny shapes, float32; ours only under TRITON_INTERPRET=1):
    TRITON_INTERPRET=1 python bench/bench_vision_kernels.py --smoke --device cpu --reps 2
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    _ROOT = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, _ROOT)
    import bench  # noqa: F401
    import qwen2vl_fast  # noqa: F401
    sys.path.remove(_ROOT)

from bench import compare, harness, results, roofline
from bench.harness import fast_impls
from qwen2vl_fast.config import parse_config
from qwen2vl_fast.ops import get_op
from qwen2vl_fast.positions import vision_metadata
from qwen2vl_fast.presets import preset_config
from qwen2vl_fast.processing.patchify import CLIP_MEAN, CLIP_STD

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PATCH_DIM = 1176  # 3 x 2 x 14 x 14


@dataclass(frozen=True)
class VisionShape:
    grid: tuple  # (t, h, w) in patches
    heads: int = 16
    head_dim: int = 80

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


REAL = VisionShape((1, 64, 96))
SMOKE = VisionShape((1, 4, 8), heads=2, head_dim=16)


def sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}


def sdpa_with(backend, scale, **kw):
    """F.scaled_dot_product_attention restricted to one backend (it raises where that backend cannot run)."""
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, **kw)
    return run


def _ours(op, device, auto, make_args) -> dict:
    cands = {name: compare.Candidate(fn, make_args, "ours") for name, fn in fast_impls(op, device).items()}
    if auto is not None:
        cands["auto"] = compare.Candidate(getattr(auto, op), make_args, "auto")
    return cands


def attention_cases(vs: VisionShape, device, dtype, auto):
    s, h, d = vs.tokens, vs.heads, vs.head_dim
    scale = d ** -0.5
    cfg = parse_config(preset_config("qwen2.5-vl-7b"))  # the window metadata of the real model
    meta_all = vision_metadata(cfg, torch.tensor([list(vs.grid)]), device)
    for label, meta in ((f"full (1 x {s})", meta_all.full), (f"windows ({len(meta_all.window.lengths)} x "
                                                             f"<={max(meta_all.window.lengths)})", meta_all.window)):
        def packed(meta=meta):  # q, k, v views of one (S, 3, H, D) projection, as the tower produces them
            q, k, v = torch.randn(s, 3, h, d, device=device, dtype=dtype).unbind(1)
            return q, k, v, meta, scale

        def transposed():
            q, k, v = torch.randn(s, 3, h, d, device=device, dtype=dtype).unbind(1)
            return tuple(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        bounds = torch.tensor([0, *meta.lengths]).cumsum(0).tolist()

        def loop(q, k, v, bounds=bounds):  # transformers' sdpa path: one SDPA call per segment
            return [F.scaled_dot_product_attention(q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], scale=scale)
                    for a, b in zip(bounds[:-1], bounds[1:])]
        n, longest = len(meta.lengths), max(meta.lengths)

        def padded(n=n, longest=longest):
            return tuple(torch.randn(n, h, longest, d, device=device, dtype=dtype) for _ in range(3))
        cands = _ours("varlen_attention", device, auto, packed)
        cands["transformers-loop"] = compare.Candidate(loop, transposed)
        for name, backend in sdpa_backends().items():
            cands[name] = compare.Candidate(sdpa_with(backend, scale), padded)
        flops = sum(4 * n * n * d * h for n in meta.lengths)
        yield compare.Case(f"varlen_attention {label}", flops, 4 * s * h * d * dtype.itemsize, cands)


def _reference_cases(vs: VisionShape, device, dtype, compile_ok):
    """(op, label, make_args, flops, bytes, compile?) of the ops timed against their own reference."""
    s, e, d = vs.tokens, vs.width, vs.head_dim
    dsize, (_, gh, gw) = dtype.itemsize, vs.grid

    def norm_args(with_bias):
        def make():
            x, residual = torch.randn(s, e, device=device, dtype=dtype), torch.randn(s, e, device=device, dtype=dtype)
            w, b = torch.randn(e, device=device, dtype=dtype), torch.randn(e, device=device, dtype=dtype)
            return (x, residual, w, b, 1e-6) if with_bias else (x, residual, w, 1e-6)
        return make

    def rotary_args():
        return (torch.randn(s, 3 * e, device=device, dtype=dtype), torch.randn(s, d, device=device),
                torch.randn(s, d, device=device), vs.heads)

    def pixels_args():
        return (torch.randn(s, PATCH_DIM, device=device), torch.randn(e, PATCH_DIM, device=device, dtype=dtype) * 0.02)

    def frames_args():  # one image: one resized uint8 frame (the op repeats it to the temporal patch of 2)
        frames = torch.randint(0, 256, (1, 3, 14 * gh, 14 * gw), dtype=torch.uint8, device=device)
        return frames, torch.randn(e, PATCH_DIM, device=device, dtype=dtype) * 0.02, CLIP_MEAN, CLIP_STD
    gemm_flops = 2 * s * PATCH_DIM * e
    yield ("add_layer_norm", f"add_layer_norm {s}x{e}", norm_args(True), 0, 4 * s * e * dsize, compile_ok)
    yield ("add_rms_norm", f"add_rms_norm {s}x{e}", norm_args(False), 0, 4 * s * e * dsize, compile_ok)
    yield ("vision_rotary", f"vision_rotary {s}x{vs.heads}x{d}", rotary_args, 0,
           4 * s * e * dsize + 2 * s * d * 4, compile_ok)  # q and k read and written in place; fp32 cos, sin
    yield ("patch_embed", f"patch_embed {s}x{PATCH_DIM}->{e}", pixels_args, gemm_flops,
           s * PATCH_DIM * 4 + e * PATCH_DIM * dsize + s * e * dsize, False)
    yield ("patch_embed_frames", f"patch_embed_frames {14 * gw}x{14 * gh}", frames_args, gemm_flops,
           3 * 14 * gh * 14 * gw + e * PATCH_DIM * dsize + s * e * dsize, False)


def reference_cases(vs: VisionShape, device, dtype, auto, compile_ok):
    for op, label, make, flops, nbytes, compiled in _reference_cases(vs, device, dtype, compile_ok):
        ref = get_op(op).reference
        cands = _ours(op, device, auto, make)
        cands["torch-eager"] = compare.Candidate(ref, make)
        if compiled:
            cands["torch-compile"] = compare.Candidate(torch.compile(ref, dynamic=False), make)
        yield compare.Case(label, flops, nbytes, cands)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bfloat16 (float32 with --smoke)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-auto", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU test of the script, not of speed)")
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for the whole run (default: $QWEN2VL_FAST_BENCH_BUDGET_S, else none)")
    p.add_argument("--case-budget-s", type=float, default=60.0,
                   help="seconds per case: an over-budget case skips its remaining candidates (default 60)")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cuda = device.type == "cuda"
    if not compare.runs_here("bench_vision_kernels", device, args.smoke):
        return 1
    compare.allow_recompiles(64)
    vs = SMOKE if args.smoke else REAL
    budget = compare.budget_from_env(args.budget_s, args.case_budget_s)  # counted from here: ceilings included
    ceilings = roofline.device_ceilings(device, dtype)
    auto = None if args.no_auto else compare.auto_table(device)
    compile_ok = cuda and not args.no_compile
    out = results.ResultFile("vision_kernels", args.out_dir)
    payload = dict(dtype=args.dtype, device=str(device), cpu_smoke=not cuda, grid=list(vs.grid), heads=vs.heads,
                   head_dim=vs.head_dim, reps=args.reps, ceilings=ceilings, l2_bytes=harness.l2_cache_bytes(device))

    def cases():
        yield from attention_cases(vs, device, dtype, auto)
        yield from reference_cases(vs, device, dtype, auto, compile_ok)

    compare.run_cases(cases(), ceilings, out, payload, device=device, warmup=args.warmup, rep=args.reps,
                      on_case=compare.record_dispatch(payload, auto), budget=budget)
    if payload.get("stopped"):  # partial: the file stays "complete": false, and the exit status says so
        print("result (partial):", out.path)
        return 3
    print("result:", out.finish(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
