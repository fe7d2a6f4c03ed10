"""Weight-only int4/int8 GEMMs against bf16 cuBLAS at the Qwen2-VL-7B and -72B layer shapes, M = 1..256.

What is measured: y = x @ W^T for the decoder's linears (qkv, o, gate/up, down) with W quantized per group of
128 (RTN on random weights: speed does not depend on the values), ours (`quant_linear`, every backend that runs
here) vs `F.linear` on the bf16 weight. Timing (bench/compare.py): one method for every candidate (CUDA-graph
replays, else a pre-filled queue), and for the memory-bound M (all of the decode regime) each candidate's weights
and activations rotated across copies exceeding 2x L2 (a 7B qkv weight is 8 MB in int4: without rotation it would
be read from L2). Reported: median ms, GB/s and % of the measured roofline on each candidate's own fewest bytes
(packed weights + scales + zeros + activations), speedup over cuBLAS bf16. JSON "quant_gemm", case by case.
Decode tokens/s of whole quantized models (bf16, int8, int4 in one run): bench/bench_quant_decode.py.

Dispatch by M: "ours-cuda" is the registered CUDA implementation (csrc/quant_decode_gemm.cu up to
DECODE_MAX_ROWS rows, the Triton kernel above), "ours-triton" the Triton kernel alone. For every layer and bit
width the summary gives the largest M at which the CUDA decode kernel still beats the Triton kernel: the
evidence for qwen2vl_fast.ops.cuda_ext.DECODE_MAX_ROWS (it is also in the JSON, "crossover").

    python bench/bench_quant.py [--shapes 7b 72b] [--ms 1 2 4 8 16 32 64 256] [--bits 4 8] [--reps 30]
CPU smoke (tiny shapes, float16; ours only under TRITON_INTERPRET=1):
    TRITON_INTERPRET=1 python bench/bench_quant.py --smoke --device cpu --reps 2
"""

from __future__ import annotations

import argparse
import dataclasses
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

from bench import compare, harness, results, roofline
from bench.harness import fast_impls
from qwen2vl_fast.quant.quantizer import quantize_rtn

# (name, N, K) of one decoder layer: fused qkv, o_proj, fused gate/up, down
SHAPES = {"7b": [("qkv", 4608, 3584), ("o", 3584, 3584), ("gate_up", 37888, 3584), ("down", 3584, 18944)],
          "72b": [("qkv", 10240, 8192), ("o", 8192, 8192), ("gate_up", 59136, 8192), ("down", 8192, 29568)],
          "tiny": [("qkv", 64, 128)]}  # --smoke: the CPU test of the script


def _fresh_copy(qw):
    """The same quantized weight in new memory: rotated copies must be distinct buffers for L2, not new values."""
    return dataclasses.replace(qw, qweight=qw.qweight.clone(), scales=qw.scales.clone(), zeros=qw.zeros.clone())


def layer_case(preset, name, n, k, m, dense, quantized, tables, dtype, dev) -> compare.Case:
    """cuBLAS on the bf16 weight vs every fast quant_linear on each bit width, x (m, k) random."""
    dsize = dtype.itemsize
    act_bytes = (m * k + m * n) * dsize

    def make_dense():
        return torch.randn(m, k, device=dev, dtype=dtype), dense.clone()
    cands = {"cublas-bf16": compare.Candidate(F.linear, make_dense)}
    for bits, qw in quantized.items():
        weight_bytes = n * k * bits / 8 + 2 * qw.scales.numel() * dsize  # packed words + scales + zeros

        def make_q(qw=qw):
            return torch.randn(m, k, device=dev, dtype=dtype), _fresh_copy(qw)
        for impl, fn in tables.items():
            cands[f"{impl}-int{bits}"] = compare.Candidate(fn, make_q, "ours", nbytes=weight_bytes + act_bytes)
    return compare.Case(f"{preset} {name} M={m}", 2 * m * n * k, n * k * dsize + act_bytes, cands,
                        meta=dict(preset=preset, layer=name, m=m, N=n, K=k))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["7b", "72b"], choices=list(SHAPES))
    p.add_argument("--ms", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64, 256])
    p.add_argument("--bits", nargs="+", type=int, default=[4, 8])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, float16 (CPU test of the script, not of speed)")
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if not compare.runs_here("bench_quant", dev, args.smoke):
        return 1
    if args.smoke:
        args.shapes, args.ms, args.group_size = ["tiny"], [1, 4], 32
    dtype = torch.float16 if args.smoke else torch.bfloat16  # the Triton interpreter has no bfloat16
    ceilings = roofline.device_ceilings(dev, dtype)
    tables = fast_impls("quant_linear", dev)
    out = results.ResultFile("quant_gemm", args.out_dir)
    payload = dict(ceilings=ceilings, group_size=args.group_size, l2_bytes=harness.l2_cache_bytes(dev),
                   dtype=str(dtype).removeprefix("torch."), device=str(dev), cpu_smoke=dev.type != "cuda")

    def cases():
        for preset in args.shapes:
            for name, n, k in SHAPES[preset]:
                dense = (torch.randn(n, k, device=dev) * 0.02).to(dtype)
                quantized = {bits: quantize_rtn(dense.float(), bits, args.group_size).to(dev) for bits in args.bits}
                for qw in quantized.values():
                    qw.scales, qw.zeros = qw.scales.to(dtype), qw.zeros.to(dtype)
                for m in args.ms:
                    yield layer_case(preset, name, n, k, m, dense, quantized, tables, dtype, dev)

    def after_case(case, rows, summary):
        for r in rows:  # the names this benchmark has always reported
            if "speedup_vs_best_pytorch" in r:
                r["speedup_vs_bf16"] = r["speedup_vs_best_pytorch"]
        payload["crossover"] = decode_crossover(payload["rows"] + rows)
    compare.run_cases(cases(), ceilings, out, payload, device=dev, warmup=1 if args.smoke else 5, rep=args.reps,
                      on_case=after_case)
    for c in payload.get("crossover", []):
        print(f"{c['preset']:4s} {c['layer']:8s} int{c['bits']}: CUDA decode kernel faster than Triton up to "
              f"M = {c['cuda_wins_up_to_m']} (of M <= {c['decode_max_rows']})")
    print("result:", out.finish(payload))
    return 0


def decode_crossover(rows: list) -> list:
    """Per (preset, layer, bits): the largest M <= DECODE_MAX_ROWS up to which "ours-cuda" (the decode kernel
    there) is faster than "ours-triton" at every measured M; 0 when it never is."""
    from qwen2vl_fast.ops.cuda_ext import DECODE_MAX_ROWS

    times = {}
    for r in rows:
        if "median_ms" in r and r["impl"].startswith(("ours-cuda-int", "ours-triton-int")):
            impl, bits = r["impl"].rsplit("-int", 1)
            times.setdefault((r["preset"], r["layer"], int(bits)), {}).setdefault(r["m"], {})[impl] = r["median_ms"]
    out = []
    for (preset, layer, bits), by_m in times.items():
        wins_up_to = 0
        for m in sorted(m for m in by_m if m <= DECODE_MAX_ROWS):
            t = by_m[m]
            if "ours-cuda" not in t or "ours-triton" not in t or t["ours-cuda"] >= t["ours-triton"]:
                break
            wins_up_to = m
        out.append(dict(preset=preset, layer=layer, bits=bits, cuda_wins_up_to_m=wins_up_to,
                        decode_max_rows=DECODE_MAX_ROWS))
    return out


if __name__ == "__main__":
    sys.exit(main())
