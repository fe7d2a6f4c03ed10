"""Each LLM (decoder) kernel other than the GEMMs against the best PyTorch alternative, at the 2B and 7B shapes.

Shapes: 2B: 12 q / 2 kv heads, hidden 1536; 7B: 28 / 4, hidden 3584; head_dim 128. The decoder's GEMMs (qkv,
o_proj, gate/up + SwiGLU, down, lm_head) are in bench/bench_gemm.py.
- prefill_attention: causal GQA over one 1600-token prompt (one 1344x896 image + 64 text tokens) and a packed
  batch of 4 x 512. Alternatives: SDPA with each backend (flash, efficient, cudnn, math) on the padded (B, H, L, D)
  layout, `enable_gqa=True` where the backend takes it, else K/V repeated to Hq heads beforehand (not timed; the
  row's tag says which), and the op's reference.
- decode_attention: one query per row against its cache, batch 1 / 16 / 64 x context 1k / 4k / 16k (all rows
  full). Alternatives: SDPA on the cache viewed as (B, Hkv, L, D) (the same fallback), the reference.
- rope_kv_write: rotate q, k and write k, v into the cache, for 1 / 16 / 64 decode tokens and a 1600-token
  prefill. Alternatives: the reference eagerly and under torch.compile.
- rope_decode_attention: the decode step's rotary + cache write + attention in one launch, at the decode_attention
  batches and contexts. Alternatives: the unfused Triton path it replaces (rope_kv_write + decode_attention), the
  reference.
- add_rms_norm at M = 1, 16, 64 (decode) and 1600 (prefill): the reference eagerly and under torch.compile.
Ours: every fast implementation that runs here, and "auto" (the runtime's measured dispatch).
Timing and fairness (bench/compare.py): one method for every candidate of a case (CUDA-graph replays, else a
pre-filled queue); memory-bound cases (intensity under the measured ridge: decode attention, rope, norms) read
inputs rotated past 2x L2. Reported: median / p20 / p80 ms, TFLOP/s or GB/s, % of the measured roofline (FLOPs
and fewest bytes: each input read once, each output written once), speedup over the best alternative.
JSON: "llm_kernels", written case by case.

    python bench/bench_llm_kernels.py [--dtype bfloat16] [--reps 30] [--no-compile] [--shapes 2b 7b]
CPU smoke (tiny shapes, float32; ours only under TRITON_INTERPRET=1):
    TRITON_INTERPRET=1 python bench/bench_llm_kernels.py --smoke --device cpu --reps 2
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

from bench import compare, harness, results, roofline
from bench.bench_vision_kernels import DTYPES, sdpa_backends
from bench.harness import fast_impls
from qwen2vl_fast.ops import VarlenMeta, get_op

SHAPES = {"2b": dict(hq=12, hkv=2, hidden=1536, d=128), "7b": dict(hq=28, hkv=4, hidden=3584, d=128)}
REAL = dict(prefill=(("1 x 1600", [1600]), ("4 x 512", [512] * 4)), batches=(1, 16, 64), contexts=(1024, 4096, 16384),
            rope_tokens=(1, 16, 64, 1600), norm_rows=(1, 16, 64, 1600), cache=(64, 2048))
SMOKE_SHAPE = dict(hq=4, hkv=2, hidden=64, d=16)
SMOKE = dict(prefill=(("1 x 24", [24]), ("2 x 8", [8] * 2)), batches=(2,), contexts=(32,), rope_tokens=(2, 12),
             norm_rows=(1, 8), cache=(4, 16))


def _ours(op, device, auto, make_args) -> dict:
    cands = {name: compare.Candidate(fn, make_args, "ours") for name, fn in fast_impls(op, device).items()}
    if auto is not None:
        cands["auto"] = compare.Candidate(getattr(auto, op), make_args, "auto")
    return cands


def _sdpa_chain(backend, causal: bool, scale: float, rep: int, make_bhld) -> list:
    """[GQA inside SDPA, else K/V repeated to Hq heads in make_args (outside the timing)]."""
    from torch.nn.attention import sdpa_kernel

    def run(gqa):
        def call(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
        return call

    def repeated():
        q, k, v = make_bhld()
        return q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return [compare.Candidate(run(True), make_bhld, tag="gqa"),
            compare.Candidate(run(False), repeated, tag="repeat-kv")]


def prefill_attention_cases(s, sizes, device, dtype, auto):
    d = s["d"]
    scale, rep = d ** -0.5, s["hq"] // s["hkv"]
    for label, lengths in sizes["prefill"]:
        t, b, n = sum(lengths), len(lengths), lengths[0]
        meta = VarlenMeta.from_lengths(lengths, device)

        def packed(t=t, meta=meta):
            q = torch.randn(t, s["hq"], d, device=device, dtype=dtype)
            k, v = (torch.randn(t, s["hkv"], d, device=device, dtype=dtype) for _ in range(2))
            return q, k, v, meta, scale

        def bhld(b=b, n=n):  # equal lengths: the packed tensors are a (B, H, L, D) batch without padding
            q, k, v, _, _ = packed()
            return tuple(x.view(b, n, x.shape[1], d).transpose(1, 2) for x in (q, k, v))
        cands = _ours("prefill_attention", device, auto, packed)
        cands["reference"] = compare.Candidate(get_op("prefill_attention").reference, packed)
        for name, backend in sdpa_backends().items():
            cands[name] = _sdpa_chain(backend, True, scale, rep, bhld)
        flops = 4 * s["hq"] * d * sum(x * (x + 1) // 2 for x in lengths)
        nbytes = (2 * t * s["hq"] + 2 * t * s["hkv"]) * d * dtype.itemsize
        yield compare.Case(f"prefill_attention {label}", flops, nbytes, cands)


def decode_attention_cases(s, sizes, device, dtype, auto):
    d, hq, hkv = s["d"], s["hq"], s["hkv"]
    scale, rep = d ** -0.5, hq // hkv
    for b in sizes["batches"]:
        for ctx in sizes["contexts"]:
            slots = torch.arange(b, device=device)
            lengths = torch.full((b,), ctx, device=device, dtype=torch.long)

            def cache(b=b, ctx=ctx, slots=slots, lengths=lengths):
                return (torch.randn(b, hq, d, device=device, dtype=dtype),
                        torch.randn(b, ctx, hkv, d, device=device, dtype=dtype),
                        torch.randn(b, ctx, hkv, d, device=device, dtype=dtype), slots, lengths, scale)

            def bhld(b=b):
                q, kc, vc, *_ = cache()
                return q.view(b, hq, 1, d), kc.transpose(1, 2), vc.transpose(1, 2)
            cands = _ours("decode_attention", device, auto, cache)
            cands["reference"] = compare.Candidate(get_op("decode_attention").reference, cache)
            for name, backend in sdpa_backends().items():
                cands[name] = _sdpa_chain(backend, False, scale, rep, bhld)
            flops = 4 * b * hq * d * ctx
            nbytes = (2 * b * ctx * hkv + 2 * b * hq) * d * dtype.itemsize
            yield compare.Case(f"decode_attention b{b} ctx{ctx}", flops, nbytes, cands)


def rope_decode_attention_cases(s, sizes, device, dtype, auto):
    """The decoder's whole attention step (rotary of q and the new k, cache write, attention) at the decode
    batches and contexts: ours in one launch against the unfused Triton path (rope_kv_write's kernel, then the split
    + reduce decode kernels: what it replaces) and the reference."""
    from qwen2vl_fast.ops.decoding import rope_decode_attention_unfused

    d, hq, hkv = s["d"], s["hq"], s["hkv"]
    for b in sizes["batches"]:
        for ctx in sizes["contexts"]:
            slots = torch.arange(b, device=device)
            lengths = torch.full((b,), ctx, device=device, dtype=torch.long)

            def make(b=b, ctx=ctx, slots=slots, lengths=lengths):
                q, k, v, cos, sin = (torch.randn(b, n, d, device=device, dtype=dtype) for n in (hq, hkv, hkv, 1, 1))
                cache = [torch.randn(b, ctx, hkv, d, device=device, dtype=dtype) for _ in range(2)]
                return (q, k, v, cos.view(b, d), sin.view(b, d), *cache, slots, lengths, d ** -0.5)
            cands = _ours("rope_decode_attention", device, auto, make)
            cands["reference"] = compare.Candidate(get_op("rope_decode_attention").reference, make)
            if "ours-triton" in cands:
                cands["ours-triton-unfused"] = compare.Candidate(rope_decode_attention_unfused, make, "ours")
            flops = 4 * b * hq * d * ctx
            nbytes = (2 * b * ctx * hkv + 2 * b * hq + 4 * b * hkv + 2 * b) * d * dtype.itemsize
            yield compare.Case(f"rope_decode_attention b{b} ctx{ctx}", flops, nbytes, cands)


def _with_reference(op, cands, make_args, compile_ok) -> dict:
    """The reference eagerly, and compiled (static shapes: the best code for this one shape)."""
    ref = get_op(op).reference
    cands["reference eager"] = compare.Candidate(ref, make_args)
    if compile_ok:
        cands["torch.compile"] = compare.Candidate(torch.compile(ref, dynamic=False), make_args)
    return cands


def rope_cases(s, sizes, device, dtype, auto, compile_ok):
    d, hq, hkv = s["d"], s["hq"], s["hkv"]
    max_b, max_len = sizes["cache"]
    k_cache = torch.randn(max_b, max_len, hkv, d, device=device, dtype=dtype)  # shared: a call writes T rows of it
    v_cache = torch.randn_like(k_cache)
    for t in sizes["rope_tokens"]:
        prefill = t > max_b
        slots = torch.zeros(t, dtype=torch.long, device=device) if prefill else torch.arange(t, device=device)
        positions = torch.arange(t, device=device) if prefill else torch.randint(0, max_len, (t,), device=device)

        def make(t=t, slots=slots, positions=positions):
            q, k, v, cos, sin = (torch.randn(t, n, d, device=device, dtype=dtype) for n in (hq, hkv, hkv, 1, 1))
            return q, k, v, cos.view(t, d), sin.view(t, d), k_cache, v_cache, slots, positions
        cands = _with_reference("rope_kv_write", _ours("rope_kv_write", device, auto, make), make, compile_ok)
        nbytes = (2 * t * hq * d + 4 * t * hkv * d + 2 * t * d) * dtype.itemsize  # q r/w; k, v read + cache write
        yield compare.Case(f"rope_kv_write {'prefill' if prefill else 'decode'} {t}", 0, nbytes, cands)


def norm_cases(s, sizes, device, dtype, auto, compile_ok):
    h = s["hidden"]
    w = torch.randn(h, device=device, dtype=dtype)
    for m in sizes["norm_rows"]:
        def make(m=m):
            return torch.randn(m, h, device=device, dtype=dtype), torch.randn(m, h, device=device, dtype=dtype), w, 1e-6
        cands = _with_reference("add_rms_norm", _ours("add_rms_norm", device, auto, make), make, compile_ok)
        yield compare.Case(f"add_rms_norm {m}x{h}", 0, (4 * m * h + h) * dtype.itemsize, cands)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bfloat16 (float32 with --smoke)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-auto", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU test of the script, not of speed)")
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cuda = device.type == "cuda"
    if not compare.runs_here("bench_llm_kernels", device, args.smoke):
        return 1
    compare.allow_recompiles(256)
    shapes = {"tiny": SMOKE_SHAPE} if args.smoke else {k: SHAPES[k] for k in args.shapes}
    sizes = SMOKE if args.smoke else REAL
    compile_ok = cuda and not args.no_compile
    ceilings = roofline.device_ceilings(device, dtype)
    auto = None if args.no_auto else compare.auto_table(device)
    out = results.ResultFile("llm_kernels", args.out_dir)
    payload = dict(dtype=args.dtype, device=str(device), cpu_smoke=not cuda, shapes=shapes, reps=args.reps,
                   ceilings=ceilings, l2_bytes=harness.l2_cache_bytes(device))

    def cases():
        for name, s in shapes.items():
            for group in (prefill_attention_cases(s, sizes, device, dtype, auto),
                          decode_attention_cases(s, sizes, device, dtype, auto),
                          rope_decode_attention_cases(s, sizes, device, dtype, auto),
                          rope_cases(s, sizes, device, dtype, auto, compile_ok),
                          norm_cases(s, sizes, device, dtype, auto, compile_ok)):
                for case in group:
                    case.label, case.meta = f"{name} {case.label}", dict(shape=name)
                    yield case

    compare.run_cases(cases(), ceilings, out, payload, device=device, warmup=args.warmup, rep=args.reps,
                      on_case=compare.record_dispatch(payload, auto))
    print("result:", out.finish(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
