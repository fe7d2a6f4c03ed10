"""Decode tokens/s of whole models with bf16, int8 and int4 weights, side by side (the engine, CUDA graphs on CUDA).

Why in memory: a 72B bf16 checkpoint is 146 GB, more than the GPU machine's disk, and speed does not depend on
the weights' values. So each (preset, weights) model is built directly on the device with random values at the
preset's real shapes, in the runtime's fused layout (`layout.fused_tensor_shapes`: q/k/v and gate/up fused,
`lm_head.weight` present, shared with the embedding when tied), then handed to `Qwen2VLFastModel(cfg, weights,
ops)`. For int8 / int4 the language model's linears (fused qkv, o, fused gate_up, down) are `QuantizedWeight`s
made straight in the runtime layout, tensor by tensor: random int32 qweight words, scales ~ 0.02 / 7 (int4) or
0.02 / 127 (int8) in the model dtype, integer zeros 8 / 128, perm None. No dense copy is ever made, so memory
peaks at the quantized size (72B int4: ~45 GB with the 1.3 GB vision tower, which decode never runs). Embeddings,
norms, biases, lm_head and the vision tower stay dense. One model at a time, freed before the next is built; a
model whose estimated bytes (weights + KV cache + margin) exceed the free memory is skipped with the reason.

Group size: `--group-size` (128) where it divides the layer's K, else the largest of 128, 64, 32, 16 below it
that does, else -1 (one group); a row lists the layers that fell back (only the tiny presets do).

Decode, as bench/bench_generate.py measures it: `--batches` rows of `--prompt-tokens` random ids, `--new-tokens`
N greedy tokens per row with `Engine.generate(ignore_eos=True)`, so every row decodes all N; decode time =
total_s - prefill_s of the engine's timings, the N-1 steps after the first token (each a decode step + sampler
+ one host sync); median of `--reps` after one warm-up (which also captures the CUDA graphs).
Reported per (preset, weights, batch): tokens/s = batch * (N-1) / decode s, ms per step; the bytes a step must
read: every decoder weight once (quantized: qweight + scales + zeros; else dense), the final norm and lm_head
(`weight_bytes`; the embedding only as a tied lm_head, its row gathers are negligible) plus the K/V it attends
over, averaged over the steps (`kv_bytes`); pct_of_bandwidth = (weight + KV bytes) / step time / the measured
copy bandwidth (bench/roofline.py), and pct_of_bandwidth_weights the weights alone; speedup vs the bf16 row of
the same preset and batch. JSON via results.write_result("quant_decode", ...).

    python bench/bench_quant_decode.py [--presets qwen2-vl-7b qwen2-vl-72b] [--weights bf16 int8 int4]
        [--batches 1 16] [--new-tokens 128] [--prompt-tokens 64] [--group-size 128] [--reps 3]
CPU smoke (quantized linears through the torch reference op, "bf16" meaning dense in --dtype):
    --presets tiny-qwen2-vl --device cpu --dtype float32 --batches 1 2 --new-tokens 4 --prompt-tokens 8 --reps 1
"""

from __future__ import annotations

import argparse
import os
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
    import qwen2vl_fast  # noqa: F401
    sys.path.remove(_ROOT)

from bench import results, roofline
from bench.bench_generate import text_prompts
from bench.bench_model_forward import DTYPES, free_memory
from qwen2vl_fast.config import parse_config
from qwen2vl_fast.layout import fused_tensor_shapes
from qwen2vl_fast.model import Qwen2VLFastModel
from qwen2vl_fast.ops import resolve
from qwen2vl_fast.presets import preset_config
from qwen2vl_fast.quant.weight import QuantizedWeight

BITS = {"bf16": None, "int8": 8, "int4": 4}
# The language model's linears that a weight-only quantized checkpoint stores quantized (runtime names).
QUANTIZED_LINEARS = {"self_attn.qkv_proj.weight": "qkv", "self_attn.o_proj.weight": "o",
                     "mlp.gate_up_proj.weight": "gate_up", "mlp.down_proj.weight": "down"}
FALLBACK_GROUPS = (128, 64, 32, 16)
STD = 0.02  # the models' initializer_range, as checkpoint_writer uses
MARGIN_BYTES = 2 << 30  # activations, logits, graph pools, the allocator's slack: a model needing more is skipped


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["qwen2-vl-7b"])
    p.add_argument("--weights", nargs="+", default=list(BITS), choices=list(BITS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--group-size", type=int, default=128, help="quantization group along K (-1: one group)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--backend", default="auto", help="op backend: auto | torch | triton | cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode time is measured over tokens 2..N)")
    if args.reps < 1:
        p.error("--reps must be >= 1")
    if args.group_size != -1 and args.group_size <= 0:
        p.error("--group-size must be positive or -1")
    return args


def _error(e: BaseException) -> str:
    traceback.print_exc()
    return f"{type(e).__name__}: {str(e)[:300]}"


# ---------------------------------------------------------------------------------------------- the weights

def pick_group_size(k: int, requested: int) -> int:
    """`requested` if it divides K, else the largest of 128, 64, 32, 16 below it that does, else -1."""
    if requested == -1:
        return -1
    for g in (requested, *FALLBACK_GROUPS):
        if g <= requested and k % g == 0:
            return g
    return -1


def weight_plan(cfg, bits, requested_group: int) -> dict:
    """Runtime name -> (shape, bits or None, group size or None) for every tensor the model holds."""
    plan = {}
    for name, shape in fused_tensor_shapes(cfg).items():
        kind = _linear_kind(name)
        if bits is None or kind is None:
            plan[name] = (shape, None, None)
            continue
        n, k = shape
        if k % (32 // bits):
            raise ValueError(f"{name}: K={k} is not a multiple of {32 // bits} ({bits}-bit int32 packing)")
        plan[name] = (shape, bits, pick_group_size(k, requested_group))
    return plan


def _linear_kind(name: str):
    """'qkv' / 'o' / 'gate_up' / 'down' for a decoder linear's weight, else None."""
    if not name.startswith("model.layers."):
        return None
    return QUANTIZED_LINEARS.get(name.split(".", 3)[3])


def group_fallbacks(plan: dict, requested: int) -> dict:
    """{"down(K=96)": 32, ...}: the linears whose group size is not the requested one (every layer has the same
    shapes, so layer 0 speaks for all)."""
    out = {}
    for suffix, kind in QUANTIZED_LINEARS.items():
        shape, bits, group = plan[f"model.layers.0.{suffix}"]
        if bits is not None and group != requested:
            out[f"{kind}(K={shape[1]})"] = group
    return out


def tensor_bytes(shape, bits, group, dsize: int) -> int:
    """Bytes of one planned tensor: dense numel * dsize, or packed qweight + scales + zeros."""
    if bits is None:
        return int(torch.Size(shape).numel()) * dsize
    n, k = shape
    groups = 1 if group == -1 else k // group
    return k * n * bits // 8 + 2 * groups * n * dsize


def plan_bytes(cfg, plan: dict, dsize: int) -> int:
    """Bytes of every tensor the model holds (a tied lm_head is the embedding: counted once)."""
    tied = cfg.text.tie_word_embeddings
    return sum(tensor_bytes(*spec, dsize) for name, spec in plan.items() if not (tied and name == "lm_head.weight"))


def random_dense(name: str, shape, dtype, device, gen) -> torch.Tensor:
    """~ N(0, 0.02); norm weights ~ 1 + N(0, 0.02) (so activations keep a sane scale through the layers)."""
    t = torch.randn(shape, dtype=dtype, device=device, generator=gen).mul_(STD)
    if ("norm" in name or "ln_q" in name) and name.endswith(".weight"):
        t.add_(1.0)
    return t


def random_quantized(shape, bits: int, group: int, dtype, device, gen) -> QuantizedWeight:
    """A QuantizedWeight (N, K) made in the runtime layout directly: random packed words (every nibble / byte
    uniform), per-group scales around 0.02 / (2^(bits-1) - 1) so the dequantized values span about +-0.02 like
    the dense weights, and the symmetric zero point 2^(bits-1). Speed does not depend on the values."""
    n, k = shape
    groups = 1 if group == -1 else k // group
    qweight = torch.empty(k * bits // 32, n, dtype=torch.int32, device=device).random_(-2**31, 2**31, generator=gen)
    base = STD / (2 ** (bits - 1) - 1)
    scales = torch.rand(groups, n, dtype=dtype, device=device, generator=gen).add_(0.5).mul_(base)
    zeros = torch.full((groups, n), 2 ** (bits - 1), dtype=dtype, device=device)
    return QuantizedWeight(qweight, scales, zeros, bits, group)


def build_weights(cfg, plan: dict, dtype, device, seed: int) -> dict:
    """Random tensors for the plan, made on the device one at a time (the peak is the final size)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tied = cfg.text.tie_word_embeddings
    out = {}
    for name, (shape, bits, group) in plan.items():  # the runtime's order: embed_tokens precedes lm_head
        if tied and name == "lm_head.weight":
            out[name] = out["model.embed_tokens.weight"]
        elif bits is None:
            out[name] = random_dense(name, shape, dtype, device, gen)
        else:
            out[name] = random_quantized(shape, bits, group, dtype, device, gen)
    return out


def step_weight_bytes(weights: dict) -> int:
    """Bytes of the weights one decode step reads: the decoder layers, the final norm and lm_head (the embedding
    only as a tied lm_head: a step gathers a few of its rows, nothing else)."""
    total = 0
    for name, w in weights.items():
        if not (name.startswith("model.layers.") or name in ("model.norm.weight", "lm_head.weight")):
            continue
        parts = [w] if isinstance(w, torch.Tensor) else [w.qweight, w.scales, w.zeros, w.perm]
        total += sum(t.numel() * t.element_size() for t in parts if t is not None)
    return total


def kv_bytes_per_step(t, batch: int, prompt: int, new: int, dsize: int) -> float:
    """Mean K/V bytes one of the N-1 decode steps reads (step s attends over prompt + s + 1 keys per row)."""
    steps = new - 1
    mean_ctx = prompt + (steps + 1) / 2
    return batch * 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * dsize * mean_ctx


# ------------------------------------------------------------------------------------------------ measuring

def free_bytes(device: torch.device) -> int:
    """What a new model may take: free device memory on CUDA, available RAM on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: try


def kv_cache_bytes(t, max_batch: int, max_len: int, dsize: int) -> int:
    return 2 * t.num_hidden_layers * max_batch * max_len * t.num_key_value_heads * t.head_dim * dsize


def time_decode(engine, batch: int, args) -> tuple:
    """(decode seconds of each rep, every row got N tokens, the engine ran CUDA graphs)."""
    prompts = text_prompts(batch, args.prompt_tokens, args.seed, args.device)
    engine.generate(prompts, max_new_tokens=args.new_tokens, ignore_eos=True)  # warm-up: compiles, captures graphs
    times, full = [], True
    for _ in range(args.reps):
        out = engine.generate(prompts, max_new_tokens=args.new_tokens, ignore_eos=True)
        full &= all(len(c.token_ids) == args.new_tokens for c in out)
        times.append(out[0].timings["total_s"] - out[0].timings["prefill_s"])
    return times, full, out[0].timings["cuda_graphs"]


def decode_row(base: dict, batch: int, times: list, weight_bytes: int, kv_bytes: float, ceilings: dict,
               steps: int) -> dict:
    s = statistics.median(times)
    step_s = s / steps
    gbps = ceilings["gbps"] * 1e9
    return dict(base, batch=batch, decode_s=s, decode_s_all=times, steps=steps, ms_per_step=1e3 * step_s,
                tokens_per_s=batch * steps / s, weight_bytes=weight_bytes, kv_bytes=kv_bytes,
                bytes_per_step=weight_bytes + kv_bytes,
                achieved_gbps=(weight_bytes + kv_bytes) / step_s / 1e9,
                pct_of_bandwidth=100 * (weight_bytes + kv_bytes) / step_s / gbps,
                pct_of_bandwidth_weights=100 * weight_bytes / step_s / gbps)


def bench_model(preset: str, cfg, kind: str, args, dtype, ceilings) -> tuple[list, dict]:
    """Build one (preset, weights) model, decode every batch size, free it. Returns (rows, model info)."""
    device, dsize = torch.device(args.device), dtype.itemsize
    t = cfg.text
    max_batch = max(args.batches)
    max_len = -(-(args.prompt_tokens + args.new_tokens + 1) // 256) * 256
    plan = weight_plan(cfg, BITS[kind], args.group_size)
    fallbacks = group_fallbacks(plan, args.group_size)
    base = dict(preset=preset, weights=kind, bits=BITS[kind] or 8 * dsize,
                group_size=args.group_size if BITS[kind] else None, group_fallbacks=fallbacks or None)
    need = plan_bytes(cfg, plan, dsize) + kv_cache_bytes(t, max_batch, max_len, dsize) + MARGIN_BYTES
    free_memory(args.device)
    have = free_bytes(device)
    info = dict(preset=preset, weights=kind, estimated_bytes=need, free_bytes=have, max_len=max_len)
    if need > have:
        reason = f"estimated {need / 2**30:.1f} GiB (weights + KV cache + margin) > {have / 2**30:.1f} GiB free"
        print(f"skip {preset} {kind}: {reason}")
        return [dict(base, batch=b, skipped=reason) for b in args.batches], dict(info, skipped=reason)

    from qwen2vl_fast.engine.engine import Engine

    rows, weights, model, engine = [], None, None, None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        weights = build_weights(cfg, plan, dtype, device, args.seed)
        model = Qwen2VLFastModel(cfg, weights, resolve(args.backend, device, cfg))
        engine = Engine(model, None, max_batch=max_batch, max_len=max_len, cuda_graphs=True)
        info.update(build_s=time.perf_counter() - t0, ops={k: model.ops.chosen[k] for k in
                                                           ("linear", "quant_linear", "rope_decode_attention")})
        wbytes = step_weight_bytes(weights)
        base["quant_linear_op"] = model.ops.chosen["quant_linear"] if BITS[kind] else None
        for b in args.batches:
            try:
                times, full, graphs = time_decode(engine, b, args)
                kv = kv_bytes_per_step(t, b, args.prompt_tokens, args.new_tokens, dsize)
                rows.append(decode_row(dict(base, all_rows_full=full, cuda_graphs=graphs), b, times, wbytes, kv,
                                       ceilings, args.new_tokens - 1))
            except Exception as e:
                rows.append(dict(base, batch=b, error=_error(e)))
        if device.type == "cuda":
            info["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except Exception as e:
        info["error"] = _error(e)
        rows += [dict(base, batch=b, error=info["error"]) for b in args.batches
                 if not any(r["batch"] == b for r in rows)]
    del engine, model, weights
    free_memory(args.device)
    return rows, info


def add_speedups(rows: list) -> None:
    """speedup_vs_bf16: tokens/s over the bf16 row of the same preset and batch (when both ran)."""
    dense = {(r["preset"], r["batch"]): r["tokens_per_s"] for r in rows
             if r["weights"] == "bf16" and "tokens_per_s" in r}
    for r in rows:
        ref = dense.get((r["preset"], r["batch"]))
        if "tokens_per_s" in r and ref:
            r["speedup_vs_bf16"] = r["tokens_per_s"] / ref


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    ceilings = roofline.device_ceilings(args.device, dtype)  # before any model takes memory
    free_memory(args.device)
    rows, models = [], []
    for preset in args.presets:
        cfg = parse_config(preset_config(preset))
        for kind in args.weights:
            r, info = bench_model(preset, cfg, kind, args, dtype, ceilings)
            rows += r
            models.append(info)
    add_speedups(rows)
    payload = dict(dtype=args.dtype, device=args.device, backend=args.backend, batches=args.batches,
                   new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens, group_size=args.group_size,
                   reps=args.reps, random_weights=True, ceilings=ceilings, models=models, rows=rows)
    path = results.write_result("quant_decode", payload, args.out_dir)
    print_table(payload, path)
    return 1 if any("error" in r for r in rows) else 0  # a skip (does not fit) is a result, not a failure


def print_table(p: dict, path) -> None:
    print(f"\nquant_decode  {p['dtype']}  {p['device']} ({results.gpu_name()})  prompt {p['prompt_tokens']}  "
          f"new {p['new_tokens']}  group {p['group_size']}  copy bandwidth {p['ceilings']['gbps']:.3g} GB/s")
    print(f"{'preset':<16}{'weights':<8}{'batch':>6}{'tok/s':>11}{'ms/step':>10}{'MB/step':>10}{'% BW':>7}"
          f"{'x bf16':>8}  note")
    for r in p["rows"]:
        head = f"{r['preset']:<16}{r['weights']:<8}{r['batch']:>6}"
        if "skipped" in r or "error" in r:
            print(f"{head}  {'SKIPPED: ' + r['skipped'] if 'skipped' in r else 'FAILED: ' + r['error'][:90]}")
            continue
        note = "group " + ", ".join(f"{k} {g}" for k, g in r["group_fallbacks"].items()) \
            if r.get("group_fallbacks") else ""
        speedup = f"{r['speedup_vs_bf16']:>8.2f}" if "speedup_vs_bf16" in r else f"{'-':>8}"
        print(f"{head}{r['tokens_per_s']:>11.1f}{r['ms_per_step']:>10.3f}{r['bytes_per_step'] / 1e6:>10.1f}"
              f"{roofline.format_pct(r['pct_of_bandwidth'], 7)}{speedup}  {note}")
    print(f"result: {path}")


if __name__ == "__main__":
    sys.exit(main())
