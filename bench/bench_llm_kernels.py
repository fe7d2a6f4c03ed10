"""Each LLM (decoder) kernel against the best PyTorch alternative, at the Qwen2-VL-2B and -7B shapes.

Shapes: 2B: 12 q / 2 kv heads, hidden 1536, MLP 8960; 7B: 28 / 4, hidden 3584, MLP 18944; head_dim 128.
- prefill_attention: causal GQA over one 1600-token prompt (one 1344x896 image + 64 text tokens) and a packed
  batch of 4 x 512. Alternatives: SDPA with each backend (flash, efficient, cudnn, math) on the padded (B, H, L, D)
  layout, `enable_gqa=True` where the backend takes it, else K/V repeated to Hq heads beforehand (not timed; the
  label says which), and the op's reference.
- decode_attention: one query per row against its cache, batch 1 / 16 / 64 x context 1k / 4k / 16k (all rows
  full). Alternatives: SDPA on the cache viewed as (B, Hkv, L, D) (the same fallback), the reference.
- rope_kv_write: rotate q, k and write k, v into the cache, for 1 / 16 / 64 decode tokens and a 1600-token
  prefill. Alternatives: the reference eagerly and under torch.compile.
- add_rms_norm (hidden 1536 / 3584) and linear_swiglu (hidden -> 2 x MLP, then silu(gate) * up) at M = 1, 16, 64
  (decode) and 1600 (prefill). Alternatives: the reference (cuBLAS + eager epilogue) and torch.compile of it.
Ours: every fast implementation (`resolve("triton" | "cuda", "cuda")`) that serves the op.
Reported: median ms (CUDA events, inputs rotated past L2 for the memory-bound cases), TFLOP/s or GB/s against
the measured ceilings, % of roofline (FLOPs and fewest bytes: each input read once, each output written once),
speedup over the best alternative. JSON via results.write_result("llm_kernels", ...). Needs CUDA.

    python bench/bench_llm_kernels.py [--dtype bfloat16] [--reps 30] [--no-compile] [--shapes 2b 7b]
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
from bench.bench_vision_kernels import sdpa_backends
from bench.harness import fast_impls
from qwen2vl_fast.ops import VarlenMeta, get_op

D = 128
SHAPES = {"2b": dict(hq=12, hkv=2, hidden=1536, mlp=8960), "7b": dict(hq=28, hkv=4, hidden=3584, mlp=18944)}


def _sdpa_variants(backend, causal: bool, scale: float, rep: int):
    """[(tag, prep, fn)] to try in order: GQA inside SDPA, else K/V repeated once before timing."""
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, gqa):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)

    def repeat(q, k, v):
        return q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return [("gqa", None, lambda q, k, v: run(q, k, v, True)),
            ("repeat-kv", repeat, lambda q, k, v: run(q, k, v, False))]


def prefill_attention_cases(s, dtype):
    scale, rep = D ** -0.5, s["hq"] // s["hkv"]
    for label, lengths in (("1 x 1600", [1600]), ("4 x 512", [512] * 4)):
        T, b, n = sum(lengths), len(lengths), lengths[0]
        q = torch.randn(T, s["hq"], D, device="cuda", dtype=dtype)
        k, v = (torch.randn(T, s["hkv"], D, device="cuda", dtype=dtype) for _ in range(2))
        meta = VarlenMeta.from_lengths(lengths, "cuda")
        impls = {name: [("", None, lambda q, k, v, f=f: f(q, k, v, meta, scale))]
                 for name, f in fast_impls("prefill_attention", "cuda").items()}
        impls["reference"] = [("", None, lambda q, k, v: get_op("prefill_attention").reference(q, k, v, meta, scale))]
        padded = [tuple(t.view(b, n, t.shape[1], D).transpose(1, 2) for t in (q, k, v))]  # (B, H, L, D) views
        for name, backend in sdpa_backends().items():
            impls[name] = [(tag, prep, fn) for tag, prep, fn in _sdpa_variants(backend, True, scale, rep)]
        inputs = {"": [(q, k, v)], "sdpa": padded}
        flops = 4 * s["hq"] * D * sum(x * (x + 1) // 2 for x in lengths)
        nbytes = (2 * T * s["hq"] + 2 * T * s["hkv"]) * D * dtype.itemsize
        yield f"prefill_attention {label}", flops, nbytes, impls, inputs


def decode_attention_cases(s, dtype):
    scale, rep, hq, hkv = D ** -0.5, s["hq"] // s["hkv"], s["hq"], s["hkv"]
    for b in (1, 16, 64):
        for ctx in (1024, 4096, 16384):
            def make(b=b, ctx=ctx):
                return (torch.randn(b, hq, D, device="cuda", dtype=dtype),
                        torch.randn(b, ctx, hkv, D, device="cuda", dtype=dtype),
                        torch.randn(b, ctx, hkv, D, device="cuda", dtype=dtype))
            rot = harness.make_rotating_inputs(make)
            slots = torch.arange(b, device="cuda")
            lengths = torch.full((b,), ctx, device="cuda", dtype=torch.long)
            impls = {name: [("", None, lambda q, kc, vc, f=f: f(q, kc, vc, slots, lengths, scale))]
                     for name, f in fast_impls("decode_attention", "cuda").items()}
            ref = get_op("decode_attention").reference
            impls["reference"] = [("", None, lambda q, kc, vc: ref(q, kc, vc, slots, lengths, scale))]
            sdpa_in = [(q.view(b, hq, 1, D), kc.transpose(1, 2), vc.transpose(1, 2)) for q, kc, vc in rot]
            for name, backend in sdpa_backends().items():
                impls[name] = _sdpa_variants(backend, False, scale, rep)
            flops = 4 * b * hq * D * ctx
            nbytes = (2 * b * ctx * hkv + 2 * b * hq) * D * dtype.itemsize
            yield f"decode_attention b{b} ctx{ctx}", flops, nbytes, impls, {"": rot, "sdpa": sdpa_in}
            del rot, sdpa_in


def _with_compile(op, impls, compile_ok):
    """The reference eagerly, and compiled (static shapes: the best code for this one shape)."""
    ref = get_op(op).reference
    impls["reference eager"] = [("", None, ref)]
    if compile_ok:
        impls["torch.compile"] = [("", None, torch.compile(ref, dynamic=False))]
    return impls


def rope_cases(s, dtype, compile_ok):
    hq, hkv, max_b, max_len = s["hq"], s["hkv"], 64, 2048
    k_cache = torch.randn(max_b, max_len, hkv, D, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    for label, T in (("decode 1", 1), ("decode 16", 16), ("decode 64", 64), ("prefill 1600", 1600)):
        prefill = T > max_b
        slots = torch.zeros(T, dtype=torch.long, device="cuda") if prefill else torch.arange(T, device="cuda")
        positions = torch.arange(T, device="cuda") if prefill else torch.randint(0, max_len, (T,), device="cuda")

        def make(T=T, slots=slots, positions=positions):
            q, k, v, cos, sin = (torch.randn(T, n, D, device="cuda", dtype=dtype) for n in (hq, hkv, hkv, 1, 1))
            return q, k, v, cos.view(T, D), sin.view(T, D), k_cache, v_cache, slots, positions
        impls = {name: [("", None, f)] for name, f in fast_impls("rope_kv_write", "cuda").items()}
        nbytes = (2 * T * hq * D + 4 * T * hkv * D + 2 * T * D) * dtype.itemsize  # q r/w; k, v read + cache write
        yield f"rope_kv_write {label}", 0, nbytes, _with_compile("rope_kv_write", impls, compile_ok), \
            {"": harness.make_rotating_inputs(make)}


def norm_mlp_cases(s, dtype, compile_ok):
    h, inter = s["hidden"], s["mlp"]
    w_norm = torch.randn(h, device="cuda", dtype=dtype)
    for M in (1, 16, 64, 1600):
        def make_norm(M=M):
            return (torch.randn(M, h, device="cuda", dtype=dtype), torch.randn(M, h, device="cuda", dtype=dtype),
                    w_norm, 1e-6)
        impls = {name: [("", None, f)] for name, f in fast_impls("add_rms_norm", "cuda").items()}
        yield f"add_rms_norm {M}x{h}", 0, (4 * M * h + h) * dtype.itemsize, \
            _with_compile("add_rms_norm", impls, compile_ok), {"": harness.make_rotating_inputs(make_norm)}

        def make_mlp(M=M):
            return (torch.randn(M, h, device="cuda", dtype=dtype),
                    torch.randn(2 * inter, h, device="cuda", dtype=dtype) * 0.02, None)
        impls = {name: [("", None, f)] for name, f in fast_impls("linear_swiglu", "cuda").items()}
        yield f"linear_swiglu {M}x{h}->2x{inter}", 2 * M * h * 2 * inter, \
            (M * h + 2 * inter * h + M * inter) * dtype.itemsize, _with_compile("linear_swiglu", impls, compile_ok), \
            {"": harness.make_rotating_inputs(make_mlp)}


def time_impl(alternatives, inputs, reps):
    """Time the first alternative (tag, prep, fn) that runs; returns (tag, timing) or (None, {"error": ...})."""
    err = None
    for tag, prep, fn in alternatives:
        args = inputs["sdpa" if tag in ("gqa", "repeat-kv") else ""]
        try:
            if prep is not None:
                args = [prep(*a) for a in args]  # outside the timed region
            with torch.inference_mode():
                return tag, harness.time_fn(fn, warmup=3, rep=reps, inputs=args, device="cuda")
        except Exception as e:  # a backend that does not take this shape / layout: try the next, then record
            err = f"{tag + ': ' if tag else ''}{type(e).__name__}: {str(e)[:200]}"
        finally:
            del args
    return None, {"error": err}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_llm_kernels needs CUDA")
        return 1
    for knob in ("recompile_limit", "cache_size_limit"):  # one compiled reference per shape: allow them all
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    dtype, compile_ok = getattr(torch, args.dtype), not args.no_compile
    ceilings = roofline.device_ceilings("cuda", dtype)
    rows = []
    for shape in args.shapes:
        s = SHAPES[shape]
        groups = (prefill_attention_cases(s, dtype), decode_attention_cases(s, dtype),
                  rope_cases(s, dtype, compile_ok), norm_mlp_cases(s, dtype, compile_ok))
        for group in groups:
            for label, flops, nbytes, impls, inputs in group:
                label = f"{shape} {label}"
                times = {}
                for name, alternatives in impls.items():
                    tag, t = time_impl(alternatives, inputs, args.reps)
                    times[f"{name}[{tag}]" if tag else name] = t
                del inputs
                torch.cuda.empty_cache()
                ok = {n: t["median_ms"] for n, t in times.items() if "median_ms" in t}
                alts = {n: ms for n, ms in ok.items() if not n.startswith("ours")}
                best = min(alts.items(), key=lambda kv: kv[1]) if alts else None
                for name, t in times.items():
                    row = dict(shape=shape, kernel=label, impl=name, flops=flops, bytes=nbytes, **t)
                    if "median_ms" in t:
                        row.update(roofline.roofline_fraction(flops, nbytes, t["median_ms"], ceilings))
                        if best and name.startswith("ours"):
                            row.update(speedup_vs_best_alternative=best[1] / t["median_ms"], best_alternative=best[0])
                    rows.append(row)
                    ms = f"{t['median_ms']:9.4f}" if "median_ms" in t else f"{'error':>9s}"
                    roof = f"{row['pct_of_roofline']:6.1f}%" if "pct_of_roofline" in row else "      -"
                    sp = f"x{row['speedup_vs_best_alternative']:.2f} vs {best[0]}" if "best_alternative" in row else ""
                    print(f"{label:44s} {name:26s} {ms} ms {roof}  {sp}", flush=True)
    path = results.write_result("llm_kernels", dict(dtype=args.dtype, shapes={k: SHAPES[k] for k in args.shapes},
                                                    ceilings=ceilings, rows=rows), out_dir=args.out_dir)
    print("result:", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
