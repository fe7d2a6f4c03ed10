"""Generation speed: decode tokens/s and image prefill time, ours (Engine) vs transformers, side by side.

Per preset (random-weight checkpoint, cached under $TMPDIR), one model loaded at a time, freed before the next:
- decode: `--batches` rows of `--prompt-tokens` random ids (< 1000), `--new-tokens` N greedy tokens per row, EOS
  ignored so every row decodes all N. Ours: `Engine.generate(ignore_eos=True)` on CUDA graphs (and eagerly at
  batch 1); decode time = total_s - prefill_s of the engine's timings: the N-1 steps after the first token, each
  a decode step + sampler + one host sync. transformers (sdpa): `generate(do_sample=False, min_new_tokens=N)`,
  decode time = end - arrival of the first token on the host (a streamer notes it), the same N-1 steps; then
  with a static cache + torch.compile (HOW: `cache_implementation="static"`, which on CUDA compiles the decode
  step, CompileConfig mode="reduce-overhead", transformers 4.57 and 5.x; else a compiled `model.forward`) at
  `--compile-batches` only (compiling costs minutes). transformers failures are recorded, not fatal.
- decode roofline: the fewest bytes of a step = every LLM weight once (decoder tensors, final norm, lm_head; the
  embedding only as the tied lm_head) + the K/V it reads, 2 * layers * Hkv * D * dtype_size * context per row,
  context averaged over the N-1 steps. pct_of_bandwidth_roofline = (bytes / measured copy GB/s) / step time (the
  issue's measure); pct_of_roofline also takes FLOPs / measured matmul TFLOP/s (the larger floor; memory binds).
- prefill: one `--image` (1344x896 -> grid 1x64x96, 1536 merged tokens) + `--prompt-tokens` text tokens, random
  pixel_values already on the device. Ours: `Engine.generate(max_new_tokens=1)` (vision + packed prefill + last
  token's logits + first sample); transformers: `model(use_cache=True, logits_to_keep=1)`. Both timed the same
  way: CUDA events around each call (end to end, host work included). FLOPs from bench/flops.forward_flops, as %
  of the measured matmul rate.
- ours is the default path: `Engine.from_pretrained(backend="auto")` (the measured dispatch; the engine's warm-up
  measures the text and decode shapes and captures the graphs), then `qwen2vl_fast.tune` at the image prompt's
  shapes where the package has it, before anything is timed (tune_s and its report are in the prefill row).
Goals (issue): batch-1 decode >= 80% of the bandwidth roofline, >= 10x transformers eager, >= 1.5x static cache +
compile; prefill >= 60% of the matmul rate. JSON via results.write_result("generate", ...).

    python bench/bench_generate.py --presets qwen2-vl-2b qwen2-vl-7b --batches 1 4 16 64 --new-tokens 128
CPU smoke: --presets tiny-qwen2-vl --batches 1 2 --new-tokens 4 --prompt-tokens 8 --device cpu --dtype float32
    --reps 1 (transformers eager runs on the CPU too; compile only on CUDA)
"""

from __future__ import annotations

import argparse
import inspect
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

from bench import flops, harness, results, roofline
from bench.bench_model_forward import DTYPES, _size, build_inputs, ensure_checkpoint, free_memory, load_transformers
from qwen2vl_fast.config import load_config

PAD, EOS = 151643, [151645, 151643]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["qwen2-vl-2b"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=64, help="text tokens per decode prompt and with the image")
    p.add_argument("--image", type=_size, default="1344x896", help="prefill image WIDTHxHEIGHT (multiples of 28)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-len", type=int, default=0, help="decode KV cache length; 0: prompt + new rounded up to 256")
    p.add_argument("--compile-batches", nargs="*", type=int, default=[1])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--out-dir", default="bench/results")
    return p.parse_args(argv)


def _error(e: BaseException) -> str:
    traceback.print_exc()
    return f"{type(e).__name__}: {str(e)[:300]}"


def text_prompts(batch: int, tokens: int, seed: int, device) -> dict:
    ids = torch.randint(0, 1000, (batch, tokens), generator=torch.Generator().manual_seed(seed + batch))
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device))


def config_weight_bytes(t, dsize: int) -> int:
    """Bytes of every LLM tensor a decode step reads once: matmul weights (lm_head included, the embedding table
    only as a tied lm_head), q/k/v biases, the 2L + 1 norm vectors."""
    kv = t.num_key_value_heads * t.head_dim
    extra = t.num_hidden_layers * (t.hidden_size + 2 * kv + 2 * t.hidden_size) + t.hidden_size
    return (flops.text_matmul_params(t) + extra) * dsize


def decode_cost(t, weight_bytes: int, batch: int, prompt: int, new: int, dsize: int) -> dict:
    """Mean bytes and FLOPs of one of the N-1 decode steps (step s attends over prompt + s + 1 keys)."""
    steps = max(new - 1, 1)
    mean_ctx = prompt + (steps + 1) / 2
    kv_per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * dsize
    kv = batch * kv_per_token * mean_ctx
    fl = 2 * batch * flops.text_matmul_params(t) \
        + 4 * batch * t.num_attention_heads * t.head_dim * mean_ctx * t.num_hidden_layers
    return dict(steps=steps, mean_context=mean_ctx, weight_bytes=weight_bytes, kv_bytes=kv,
                kv_bytes_per_token=kv_per_token, bytes=weight_bytes + kv, flops=fl)


def decode_row(impl, batch, decode_times, cost, ceilings, **extra) -> dict:
    """tokens/s, ms per step and the roofline of a list of measured decode times (seconds, N-1 steps each)."""
    s = statistics.median(decode_times)
    ms = 1e3 * s / cost["steps"]
    row = dict(impl=impl, batch=batch, decode_s=s, decode_s_all=decode_times, ms_per_step=ms,
               tokens_per_s=batch * cost["steps"] / s, **extra)
    row["roofline"] = roofline.roofline_fraction(cost["flops"], cost["bytes"], ms, ceilings)
    row["pct_of_roofline"] = row["roofline"]["pct_of_roofline"]  # floor: max(bytes / GB/s, FLOPs / TFLOP/s)
    row["pct_of_bandwidth_roofline"] = row["roofline"]["pct_of_gbps"]  # the issue's: bytes / copy GB/s
    return row


def tune_for_image(model, image) -> dict:
    """`qwen2vl_fast.tune` at the image prompt's shapes (the engine's warm-up measures the text and decode shapes;
    image shapes would otherwise be measured by the first image request)."""
    import qwen2vl_fast

    if image is None:
        return {}
    t0 = time.perf_counter()
    report = qwen2vl_fast.tune(model, image)
    return dict(tune_s=time.perf_counter() - t0, tune_report=report)


def run_ours(args, ckpt, dtype, ceilings, image, costs):
    from qwen2vl_fast.engine.engine import Engine

    decode, prefill = [], None
    P, N = args.prompt_tokens, args.new_tokens
    max_len = args.max_len or -(-(P + N + 1) // 256) * 256
    engine = None
    try:
        t0 = time.perf_counter()
        engine = Engine.from_pretrained(ckpt, device=args.device, dtype=dtype, cuda_graphs=True, backend="auto",
                                        max_batch=max(args.batches), max_len=max_len)
        load_s = time.perf_counter() - t0
        tuned = tune_for_image(engine.model, image)
        variants = [("ours", engine, args.batches)]
        if engine.graphs is not None and 1 in costs:  # the eager decode loop, for what the graphs buy
            variants.append(("ours-eager", Engine(engine.model, None, 1, max_len, cuda_graphs=False), [1]))
        for name, eng, batches in variants:
            for b in batches:
                prompts = text_prompts(b, P, args.seed, args.device)
                try:
                    eng.generate(prompts, max_new_tokens=N, ignore_eos=True)  # warm-up (graph capture)
                    times, ok = [], True
                    for _ in range(args.reps):
                        out = eng.generate(prompts, max_new_tokens=N, ignore_eos=True)
                        ok &= all(len(c.token_ids) == N for c in out)
                        times.append(out[0].timings["total_s"] - out[0].timings["prefill_s"])
                    decode.append(decode_row(name, b, times, costs[b], ceilings, all_rows_full=ok, load_s=load_s,
                                             cuda_graphs=out[0].timings["cuda_graphs"], max_len=max_len))
                except Exception as e:
                    decode.append(dict(impl=name, batch=b, error=_error(e)))
        if image is not None:
            eng = Engine(engine.model, None, 1, image["input_ids"].shape[1] + 16, cuda_graphs=False)
            prefill_s = []

            def call():
                prefill_s.append(eng.generate(image, max_new_tokens=1)[0].timings["prefill_s"])
            prefill = dict(timing=harness.time_fn(call, warmup=1, rep=max(args.reps, 3), device=args.device,
                                                  method="events"), **tuned)
            prefill["host_prefill_s_median"] = statistics.median(prefill_s)
    except Exception as e:
        decode.append(dict(impl="ours", error=_error(e)))
    del engine
    free_memory(args.device)
    return decode, prefill


class _FirstTokenClock:
    """A generate streamer that notes when the first new token reaches the host (generate calls put() with the
    prompt, then with each new token as `.cpu()`, a sync): decode time = end - that, as the engine measures."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def _hf_generate(model, inputs, n, device, **kw) -> float:
    """One generate of exactly n new tokens; returns its decode time (after the first token) in seconds."""
    clock = _FirstTokenClock()
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=PAD,
                         eos_token_id=EOS, streamer=clock, **kw)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    if out.shape[1] - inputs["input_ids"].shape[1] != n:
        raise RuntimeError(f"generate returned {out.shape[1] - inputs['input_ids'].shape[1]} new tokens, not {n}")
    return end - clock.first


def _hf_decode(model, inputs, args, reps, **kw) -> list:
    return [_hf_generate(model, inputs, args.new_tokens, args.device, **kw) for _ in range(reps)]


def run_transformers(args, ckpt, cfg, dtype, ceilings, image, costs):
    from qwen2vl_fast.testing.hf_compat import transformers_inputs

    decode, prefill, model = [], None, None
    cuda = torch.device(args.device).type == "cuda"
    try:
        model = load_transformers(ckpt, args.device, dtype, cfg.model_type)
        for b in args.batches:
            inputs = transformers_inputs(text_prompts(b, args.prompt_tokens, args.seed, args.device))
            try:
                _hf_generate(model, inputs, 2, args.device)  # warm-up
                decode.append(decode_row("transformers-eager", b, _hf_decode(model, inputs, args, args.reps),
                                         costs[b], ceilings, attn="sdpa", cache="dynamic"))
            except Exception as e:
                decode.append(dict(impl="transformers-eager", batch=b, error=_error(e)))
        if image is not None:
            kw = dict(use_cache=True)
            if "logits_to_keep" in inspect.signature(model.forward).parameters:
                kw["logits_to_keep"] = 1
            img = transformers_inputs(image)
            try:
                with torch.inference_mode():
                    prefill = dict(timing=harness.time_fn(lambda m=model: m(**img, **kw), warmup=1,
                                                          rep=max(args.reps, 3), device=args.device, method="events"),
                                   kwargs=list(kw))
            except Exception as e:
                prefill = dict(error=_error(e))
        if cuda and not args.skip_compile:
            decode += _compiled_rows(model, args, ceilings, costs, transformers_inputs)
    except Exception as e:
        decode.append(dict(impl="transformers", error=_error(e)))
    del model
    free_memory(args.device)
    return decode, prefill


HOW = {"auto": "generate(cache_implementation='static'), its auto-compile of the decode step",
       "manual": "generate(cache_implementation='static') + model.forward = torch.compile(mode='reduce-overhead')"}


def _compiled_rows(model, args, ceilings, costs, to_hf) -> list:
    """Static cache + torch.compile: generate's auto-compile; if that fails or does not compile, a compiled forward."""
    rows, methods = [], ["auto", "manual"]
    for b in [b for b in args.compile_batches if b in costs]:
        inputs, kw, errors = to_hf(text_prompts(b, args.prompt_tokens, args.seed, args.device)), {}, {}
        kw["cache_implementation"] = "static"
        for how in list(methods):
            try:
                if how == "manual" and not getattr(model, "_bench_compiled", False):
                    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
                    model._bench_compiled = True
                    model.generation_config.disable_compile = True  # the forward is compiled already
                t0 = time.perf_counter()
                _hf_generate(model, inputs, args.new_tokens, args.device, **kw)  # compiles
                t_first = time.perf_counter() - t0
                if how == "auto" and not hasattr(model, "_compiled_call"):
                    raise RuntimeError("generate did not compile the forward (no model._compiled_call)")
                for _ in range(2):  # cudagraph trees record on the first replays
                    _hf_generate(model, inputs, args.new_tokens, args.device, **kw)
                times = _hf_decode(model, inputs, args, args.reps, **kw)
                rows.append(decode_row("transformers-static-compile", b, times, costs[b], ceilings, how=HOW[how],
                                       first_call_s=t_first, errors=errors))
                break
            except Exception as e:
                errors[how] = _error(e)
                methods = ["manual"]
        else:
            rows.append(dict(impl="transformers-static-compile", batch=b, error=str(errors)))
    return rows


def bench_preset(preset, args, dtype, ceilings) -> dict:
    ckpt = ensure_checkpoint(preset, dtype, args.seed)
    cfg = load_config(ckpt)
    image, pf = None, None
    if not args.skip_prefill:
        width, height = args.image
        image = {k: v.to(args.device) for k, v in build_inputs(cfg, width, height, args.prompt_tokens,
                                                               args.seed).items()}
        seq = image["input_ids"].shape[1]
        pf = dict(image=[width, height], image_grid_thw=image["image_grid_thw"].tolist(), seq_len=seq,
                  flops=flops.forward_flops(cfg, image["image_grid_thw"].tolist(), seq), impls={})
    wbytes = config_weight_bytes(cfg.text, dtype.itemsize)
    costs = {b: decode_cost(cfg.text, wbytes, b, args.prompt_tokens, args.new_tokens, dtype.itemsize)
             for b in args.batches}
    decode, ours_pf = run_ours(args, ckpt, dtype, ceilings, image, costs)
    pf_impls = {"ours": ours_pf}
    if not args.skip_transformers:
        hf_decode, pf_impls["transformers"] = run_transformers(args, ckpt, cfg, dtype, ceilings, image, costs)
        decode += hf_decode
    if pf is not None:
        for name, r in pf_impls.items():
            if r and "timing" in r:
                r["tflops"] = pf["flops"]["total"] / (r["timing"]["median_ms"] * 1e-3) / 1e12
                r["pct_of_matmul"] = 100 * r["tflops"] / ceilings["tflops"]
            if r:
                pf["impls"][name] = r
        if all("timing" in pf["impls"].get(k, {}) for k in ("ours", "transformers")):
            pf["speedup_vs_transformers"] = (pf["impls"]["transformers"]["timing"]["median_ms"]
                                             / pf["impls"]["ours"]["timing"]["median_ms"])
    tps = {(r["impl"], r["batch"]): r["tokens_per_s"] for r in decode if "tokens_per_s" in r}
    speedups = {b: {f"vs_{other}": tps[("ours", b)] / tps[(other, b)]
                    for other in ("transformers-eager", "transformers-static-compile") if (other, b) in tps}
                for b in args.batches if ("ours", b) in tps}
    b1 = next((r for r in decode if r.get("impl") == "ours" and r.get("batch") == 1 and "tokens_per_s" in r), None)
    sp1 = speedups.get(1, {})

    def at_least(value, goal):
        return None if value is None else value >= goal
    goals = dict(decode_b1_pct_bandwidth_roofline_ge_80=at_least(b1 and b1["pct_of_bandwidth_roofline"], 80),
                 decode_b1_vs_eager_ge_10x=at_least(sp1.get("vs_transformers-eager"), 10),
                 decode_b1_vs_compile_ge_1_5x=at_least(sp1.get("vs_transformers-static-compile"), 1.5),
                 prefill_pct_matmul_ge_60=at_least(pf and pf["impls"].get("ours", {}).get("pct_of_matmul"), 60))
    return dict(preset=preset, model_type=cfg.model_type, checkpoint=ckpt, random_weights=True,
                decode_costs=costs, decode=decode, prefill=pf, speedups=speedups, goals=goals)


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2 (decode time is measured over tokens 2..N)")
    ceilings = roofline.device_ceilings(args.device, dtype)  # before any model takes memory
    free_memory(args.device)
    presets = {}
    for preset in args.presets:
        presets[preset] = bench_preset(preset, args, dtype, ceilings)
        free_memory(args.device)
    payload = dict(dtype=args.dtype, device=args.device, batches=args.batches, new_tokens=args.new_tokens,
                   prompt_tokens=args.prompt_tokens, reps=args.reps, ceilings=ceilings, presets=presets)
    path = results.write_result("generate", payload, args.out_dir)
    print_table(payload, path)
    # ours failing fails the run; a transformers baseline that fails (e.g. compile) is recorded, not fatal
    failed = any("error" in r and r.get("impl", "").startswith("ours") for p in presets.values() for r in p["decode"])
    return 1 if failed else 0


def print_table(p: dict, path) -> None:
    c = p["ceilings"]
    print(f"\ngenerate  {p['dtype']}  {p['device']} ({results.gpu_name()})  prompt {p['prompt_tokens']}  "
          f"new {p['new_tokens']}  ceilings {c['tflops']:.3g} TFLOP/s  {c['gbps']:.3g} GB/s")
    for name, r in p["presets"].items():
        print(f"-- {name}  goals: {r['goals']}\n{'impl':<30}{'batch':>6}{'tok/s':>11}{'ms/step':>10}{'floor ms':>10}"
              f"{'% roof':>8}{'% BW':>7}")
        for d in r["decode"]:
            print(f"{d['impl']:<30}{d.get('batch', '-'):>6}  FAILED: {d['error'][:90]}" if "error" in d else
                  f"{d['impl']:<30}{d['batch']:>6}{d['tokens_per_s']:>11.1f}{d['ms_per_step']:>10.3f}"
                  f"{d['roofline']['floor_ms']:>10.3f}{roofline.format_pct(d['pct_of_roofline'], 8)}"
                  f"{roofline.format_pct(d['pct_of_bandwidth_roofline'], 7)}")
        print(f"speedups (ours tok/s / theirs): {r['speedups']}")
        for impl, x in (r["prefill"] or {}).get("impls", {}).items():
            print(f"prefill {impl:<14} FAILED: {x['error'][:90]}" if "error" in x else
                  f"prefill {impl:<14} seq {r['prefill']['seq_len']}  {x['timing']['median_ms']:.2f} ms  "
                  f"{x['tflops']:.3g} TFLOP/s  {roofline.format_pct(x['pct_of_matmul'])} of matmul")
    print(f"result: {path}")


if __name__ == "__main__":
    sys.exit(main())
