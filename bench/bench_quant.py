"""Weight-only int4/int8 GEMMs against bf16 cuBLAS at the Qwen2-VL-7B and -72B layer shapes, M = 1..256.

What is measured: y = x @ W^T for the decoder's linears (qkv, o, gate/up, down) with W quantized per group of
128 (RTN on random weights: speed does not depend on the values), ours (`quant_linear`, every backend that runs
here) vs `F.linear` on the bf16 weight. Reported: median ms, GB/s of weight bytes read (the decode regime is
bound by them), % of the measured copy bandwidth, speedup over cuBLAS bf16. JSON under bench/results/.
Decode tokens/s of whole quantized models (bf16, int8, int4 in one run): bench/bench_quant_decode.py.

Dispatch by M: "ours-cuda" is the registered CUDA implementation (csrc/quant_decode_gemm.cu up to
DECODE_MAX_ROWS rows, the Triton kernel above), "ours-triton" the Triton kernel alone. For every layer and bit
width the summary gives the largest M at which the CUDA decode kernel still beats the Triton kernel: the
evidence for qwen2vl_fast.ops.cuda_ext.DECODE_MAX_ROWS (it is also in the JSON, "crossover").

    python bench/bench_quant.py [--shapes 7b 72b] [--ms 1 2 4 8 16 32 64 256] [--bits 4 8] [--reps 50]
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
from qwen2vl_fast.quant.quantizer import quantize_rtn

# (name, N, K) of one decoder layer: fused qkv, o_proj, fused gate/up, down
SHAPES = {"7b": [("qkv", 4608, 3584), ("o", 3584, 3584), ("gate_up", 37888, 3584), ("down", 3584, 18944)],
          "72b": [("qkv", 10240, 8192), ("o", 8192, 8192), ("gate_up", 59136, 8192), ("down", 8192, 29568)]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["7b", "72b"], choices=list(SHAPES))
    p.add_argument("--ms", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64, 256])
    p.add_argument("--bits", nargs="+", type=int, default=[4, 8])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_quant needs a CUDA device")
        return 1
    dev, dtype = torch.device("cuda"), torch.bfloat16
    ceilings = roofline.device_ceilings(dev, dtype)
    tables = fast_impls("quant_linear", dev)
    rows = []
    for preset in args.shapes:
        for name, n, k in SHAPES[preset]:
            dense = (torch.randn(n, k, device=dev) * 0.02).to(dtype)
            quantized = {bits: quantize_rtn(dense.float(), bits, args.group_size).to(dev) for bits in args.bits}
            for bits, qw in quantized.items():
                qw.scales, qw.zeros = qw.scales.to(dtype), qw.zeros.to(dtype)
            for m in args.ms:
                x = torch.randn(m, k, device=dev, dtype=dtype)
                base = harness.time_fn(lambda: F.linear(x, dense), warmup=5, rep=args.reps, device=dev)
                rows.append(dict(preset=preset, layer=name, m=m, impl="cublas-bf16", **base,
                                 gbps=n * k * 2 / (base["median_ms"] * 1e-3) / 1e9))
                for bits, qw in quantized.items():
                    weight_bytes = n * k * bits / 8 + 2 * qw.scales.numel() * 2
                    for impl, fn in tables.items():
                        try:
                            t = harness.time_fn(lambda f=fn, w=qw: f(x, w), warmup=5, rep=args.reps, device=dev)
                        except Exception as e:
                            rows.append(dict(preset=preset, layer=name, m=m, impl=f"{impl}-int{bits}", error=str(e)))
                            continue
                        gbps = weight_bytes / (t["median_ms"] * 1e-3) / 1e9
                        rows.append(dict(preset=preset, layer=name, m=m, impl=f"{impl}-int{bits}", **t, gbps=gbps,
                                         pct_bandwidth=100 * gbps / ceilings["gbps"],
                                         speedup_vs_bf16=base["median_ms"] / t["median_ms"]))
                for r in rows[-1 - len(tables) * len(quantized):]:
                    ms = f"{r['median_ms']:8.3f}" if "median_ms" in r else "   error"
                    print(f"{preset:4s} {name:8s} M={m:<4d} {r['impl']:22s} {ms} ms  "
                          f"{r.get('gbps', 0):7.0f} GB/s  x{r.get('speedup_vs_bf16', 1):.2f}")
    crossover = decode_crossover(rows)
    for c in crossover:
        print(f"{c['preset']:4s} {c['layer']:8s} int{c['bits']}: CUDA decode kernel faster than Triton up to "
              f"M = {c['cuda_wins_up_to_m']} (of M <= {c['decode_max_rows']})")
    print("result:", results.write_result("quant_gemm", {"ceilings": ceilings, "group_size": args.group_size,
                                                         "rows": rows, "crossover": crossover},
                                          out_dir=args.out_dir))
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
