"""`qwen2vl-fast`: the command line.

  qwen2vl-fast demo [--check]                            the main job on an embedded default: write a random
                                                         checkpoint (tiny on the CPU, Qwen2-VL-2B on a GPU),
                                                         run one image + text prompt, generate, print tokens/s
  qwen2vl-fast generate --model DIR [--image P] [--video P] "prompt"   stream an answer
  qwen2vl-fast write-checkpoint --preset P --out DIR     a random-weight checkpoint in the HF format
  qwen2vl-fast presets                                   the presets and their sizes
  qwen2vl-fast ops [--device cuda]                       every op, its implementations, what `auto` picks, and
                                                         the measured winner per shape on this device, with times
  qwen2vl-fast tune --model DIR [--image 1344x896 ...]   measure every raced op at the model's real shapes
                                                         (prefill, images, decode batches) and cache the winners
  qwen2vl-fast serve --model DIR [--port 8000]          an OpenAI-compatible HTTP server (chat completions
                                                         with images / videos, streaming, /metrics)
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import sys
import tempfile
import time

import torch

from .errors import Qwen2VLFastError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _cmd_write_checkpoint(args) -> int:
    from .testing.checkpoint_writer import checkpoint_bytes, write_random_checkpoint

    try:  # refuse an unusable --out before generating gigabytes of weights
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise Qwen2VLFastError(f"--out {args.out!r}: cannot create the directory ({e.strerror})") from None
    if not os.access(args.out, os.W_OK | os.X_OK):
        raise Qwen2VLFastError(f"--out {args.out!r}: the directory is not writable")
    t0 = time.perf_counter()
    out = write_random_checkpoint(args.out, args.preset, dtype=_DTYPES[args.dtype], seed=args.seed,
                                  max_shard_bytes=int(args.max_shard_mb * 2**20), key_scheme=args.key_scheme)
    size = checkpoint_bytes(out)
    print(f"wrote {args.preset} ({args.dtype}, seed {args.seed}) to {out}: {size / 2**30:.2f} GiB "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_presets(args) -> int:
    from .config import parse_config
    from .layout import hub_tensor_shapes
    from .presets import PRESETS

    for name, raw in PRESETS.items():
        cfg = parse_config(raw)
        n = sum(math.prod(s) for s in hub_tensor_shapes(cfg).values())
        t = cfg.text
        print(f"{name:16s} {cfg.model_type:11s} {n / 1e9:7.3f}B params  LLM {t.num_hidden_layers}x{t.hidden_size} "
              f"heads {t.num_attention_heads}/{t.num_key_value_heads}  ViT {cfg.vision.depth}x{cfg.vision.embed_dim}")
    return 0


def _cmd_ops(args) -> int:
    from .model import check_device
    from .ops import available
    from .ops.tuning_cache import TuningCache, fingerprint

    device = check_device(args.device) if args.device else None  # `--device cuda` without CUDA says so here
    table = available(device)
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # measurements belong to a device that is here (its name and driver are part of the cache key)
    here = dev.type != "cuda" or torch.cuda.is_available()
    measured = TuningCache(args.cache, fingerprint(dev)).entries if here else {}
    if args.json:
        for name, info in table.items():
            info["measured"] = measured.get(name, {})  # shape key -> {"winner", "times_us"}
        print(json.dumps(table, indent=2))
        return 0
    for name, info in table.items():
        raced = len(info["candidates"]) > 1
        print(f"{name:18s} implementations: {','.join(info['implementations']):18s} auto -> "
              f"{('measured, else ' if raced else '') + info['auto']:22s} {info['doc']}")
    _print_measured(measured, dev)
    print(f"\n{_extension_line()}")
    return 0


def _extension_line() -> str:
    """Whether the CUDA extension is in this install and, if not, why (pip hides setup.py's own line)."""
    name = "CUDA extension qwen2vl_fast._C"
    try:
        from . import _C  # noqa: F401
    except (ImportError, OSError) as e:
        if torch.version.cuda is None:
            return f"{name}: not built (torch {torch.__version__} is a CPU-only build)"
        if isinstance(e, ModuleNotFoundError) and e.name == f"{__package__}._C":
            return (f"{name}: not built (skipped when installing: no nvcc matching torch's CUDA "
                    f"{torch.version.cuda}, or QWEN2VL_FAST_NO_CUDA set; pip install -v shows the reason)")
        return f"{name}: not built (import error: {e})"
    return f"{name}: built"


def _print_measured(measured: dict, dev) -> None:
    rows = [(op, key, rec) for op, shapes in sorted(measured.items()) for key, rec in sorted(shapes.items())]
    if not rows:
        print(f"\nno measured dispatch choices for {dev} yet (qwen2vl-fast tune --model DIR measures them)")
        return
    print(f"\nmeasured on {dev} (winner, then every candidate's median time in microseconds):")
    for op, key, rec in rows:
        times = ", ".join(f"{b} {'failed' if t is None else f'{t:.1f}'}" for b, t in sorted(rec["times_us"].items()))
        print(f"  {op:18s} {key:44s} -> {rec['winner']:7s} ({times})")


def _cmd_tune(args) -> int:
    from .engine import Engine
    from .testing.inputs import image_prompt
    from .tuning import measuring

    from .model import check_device

    device = check_device(args.device)
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(args.model, device=device, dtype=_DTYPES[args.dtype] if args.dtype else None,
                                    max_batch=args.max_batch, max_len=args.max_len, warmup=False,
                                    dispatch="cached", dispatch_cache=args.cache)
    model = engine.model
    if model.ops.dispatch is None:
        print(f"no op has more than one fast implementation on {device}: nothing to measure")
        return 0
    with measuring(model.ops, remeasure=args.remeasure):
        engine.warmup(prompt_lengths=args.prompt_tokens)  # LLM prefill and every decode batch bucket
        for size in args.image:
            w, h = _size(size)
            model(**image_prompt(model.config, w, h, text_tokens=64))  # the vision tower at this image size
    report = model.ops.dispatch_report()
    print(f"measured {len(report)} (op, shape) choices in {time.perf_counter() - t0:.1f} s "
          f"-> {model.ops.dispatch.cache.path}")
    _print_measured(model.ops.dispatch.cache.entries, device)
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise Qwen2VLFastError(f"image size {text!r}: expected WIDTHxHEIGHT, e.g. 1344x896") from None
    return w, h


def _demo_picture(h: int, w: int):
    """A synthetic photo-like picture (gradients and a disc), so the demo needs no file."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 128)], -1)
    img[(x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(h, w) / 4) ** 2] = (240, 200, 30)
    return Image.fromarray(img.astype(np.uint8))


def _cmd_demo(args) -> int:
    from .engine import Engine
    from .model import check_device
    from .testing.checkpoint_writer import write_random_checkpoint

    check_device(args.device)  # before writing a multi-GB checkpoint
    if args.preset is None:
        args.preset = "qwen2-vl-2b" if str(args.device).startswith("cuda") else "tiny-qwen2-vl"
    if args.dtype is None:
        args.dtype = "bfloat16" if str(args.device).startswith("cuda") else "float32"
    dtype = _DTYPES[args.dtype]
    with tempfile.TemporaryDirectory(prefix="qwen2vl_fast_demo_") as tmp:
        path = args.checkpoint or tmp
        if not args.checkpoint:
            t0 = time.perf_counter()
            write_random_checkpoint(path, args.preset, dtype=dtype, seed=0, std=0.05)
            print(f"[1/5] wrote a random-weight {args.preset} checkpoint ({args.dtype}) to {path} "
                  f"in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        engine = Engine.from_pretrained(path, device=args.device, dtype=dtype, backend=args.backend,
                                        cuda_graphs=not args.no_cuda_graphs, max_batch=1,
                                        max_len=args.max_new_tokens + 4096)
        model = engine.model
        print(f"[2/5] loaded {model} in {time.perf_counter() - t0:.1f} s")
        image = args.image_file or _demo_picture(*args.image)
        chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": args.prompt}]}]
        inputs = engine.processor(chat, device=args.device)
        ids, pixels, grid = inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"]
        source = args.image_file or f"a synthetic {args.image[0]}x{args.image[1]} picture"
        print(f"[3/5] prompt: {ids.shape[1]} tokens, {source} -> grid {grid.tolist()[0]}, {pixels.shape[0]} "
              f"patches, {pixels.shape[0] // 4} image tokens")
        t0 = time.perf_counter()
        out = model(**inputs)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        top = out.logits[0, -1].float().topk(5)
        print(f"[4/5] forward in {ms:.1f} ms on {args.device}: logits {tuple(out.logits.shape)} {out.logits.dtype}, "
              f"rope_delta {int(out.rope_deltas[0, 0])}, next-token top-5 ids {top.indices.tolist()}")
        engine.generate(chat, max_new_tokens=2, ignore_eos=True)  # warm-up (CUDA graphs, Triton compiles)
        [c] = engine.generate(chat, max_new_tokens=args.max_new_tokens, ignore_eos=True)
        t = c.timings
        print(f"[5/5] generated {len(c.token_ids)} tokens (random weights: ids, not words) {c.token_ids[:8]}...: "
              f"prefill {t['prefill_s'] * 1e3:.1f} ms, decode {t['decode_tokens_per_s']:.1f} tokens/s "
              f"({'CUDA graphs' if t['cuda_graphs'] else 'eager'})")
        if args.check:
            err = _check_against_transformers(path, model.config, ids, pixels, grid, out.logits, dtype, args.device)
            print(f"[check] transformers on the same checkpoint: ||Δlogits|| / ||logits|| = {err:.2e}")
    return 0


def _check_against_transformers(path, cfg, ids, pixels, grid, logits, dtype, device) -> float:
    try:
        import transformers
    except ImportError:
        raise Qwen2VLFastError("--check needs transformers installed (pip install 'qwen2vl_fast[test]')") from None
    cls = (transformers.Qwen2VLForConditionalGeneration if cfg.model_type == "qwen2_vl"
           else transformers.Qwen2_5_VLForConditionalGeneration)
    from .testing.hf_compat import transformers_inputs

    ref_model = cls.from_pretrained(path, dtype=dtype).to(device).eval()
    inputs = transformers_inputs(dict(input_ids=ids.to(device), pixel_values=pixels.to(device),
                                      image_grid_thw=grid.to(device)))
    with torch.no_grad():
        ref = ref_model(**inputs).logits
    return float((logits.float() - ref.float()).norm() / ref.float().norm())


def _cmd_generate(args) -> int:
    from .engine import Engine
    from .model import check_device

    device = check_device(args.device)
    dtype = _DTYPES[args.dtype] if args.dtype else None
    rank = 0
    if args.tensor_parallel:  # every rank runs this same command; rank 0 prints
        from .parallel import init_from_env

        rank, _ = init_from_env(device)
    engine = Engine.from_pretrained(args.model, device=device, dtype=dtype, backend=args.backend, max_batch=1,
                                    cuda_graphs=not args.no_cuda_graphs, max_len=args.max_len,
                                    tensor_parallel=args.tensor_parallel)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # the same tokens as rank 0; only rank 0 talks to the user
    content = ([{"type": "image", "image": p} for p in args.image] + [{"type": "video", "video": p} for p in args.video]
               + [{"type": "text", "text": args.prompt}])
    events = engine.stream([{"role": "user", "content": content}], max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           repetition_penalty=args.repetition_penalty, seed=args.seed)
    for event in events:
        print(event.text, end="", flush=True)
    print()
    t = engine.last_timings
    print(f"[{t['generated_tokens']} tokens, prefill {t['prefill_s'] * 1e3:.0f} ms, "
          f"{t['decode_tokens_per_s']:.1f} tokens/s]", file=sys.stderr if rank == 0 else sys.stdout)
    if args.tensor_parallel:
        import torch.distributed as dist

        engine.close()
        dist.destroy_process_group()
    return 0


def _cmd_quantize(args) -> int:
    from .model import check_device
    from .quant.export import quantize_checkpoint

    check_device(args.device)
    t0 = time.perf_counter()
    out = quantize_checkpoint(args.model, args.out, bits=args.bits, group_size=args.group_size, fmt=args.format,
                              method=args.method, sym=args.sym, act_order=args.act_order, device=args.device)
    print(f"quantized {args.model} ({args.method}, {args.bits}-bit, group {args.group_size}) into {args.format} "
          f"format at {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 0..65535 (0: any free port), got {text!r}")
    return value


def _listen_socket(host: str, port: int):
    """The server's socket, bound before the model loads so that a taken port fails in a second."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise Qwen2VLFastError(f"--host {host!r}: not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise _ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


class _ServeError(Exception):
    """A failure at run time of `serve` (exit 1), e.g. a port already in use."""


def _cmd_serve(args) -> int:
    try:
        import uvicorn

        from .server.app import create_app
    except ImportError as e:
        raise Qwen2VLFastError(f"serve needs FastAPI and uvicorn ({e.name} is not installed): "
                               f"pip install 'qwen2vl_fast[serve]'") from None
    from .engine import Engine
    from .model import check_device

    if args.allowed_local_media_path is not None and not os.path.isdir(args.allowed_local_media_path):
        raise Qwen2VLFastError(f"--allowed-local-media-path {args.allowed_local_media_path!r}: not a directory")
    if args.min_pixels is not None and args.max_pixels is not None and args.min_pixels > args.max_pixels:
        raise Qwen2VLFastError(f"--min-pixels {args.min_pixels} is larger than --max-pixels {args.max_pixels}")
    device = check_device(args.device)
    options = {k: getattr(args, k) for k in ("max_len", "max_pixels", "min_pixels", "vision_cache_mb", "max_queue")
               if getattr(args, k) is not None}
    if args.tensor_parallel:  # under torchrun: rank 0 serves HTTP, the other ranks run its engine's steps
        from .parallel import init_from_env

        if init_from_env(device)[0] != 0:
            import torch.distributed as dist

            try:
                Engine.from_pretrained(args.model, device=device, dtype=_DTYPES[args.dtype] if args.dtype else None,
                                       max_batch=args.max_batch, tensor_parallel=True, **options).follow()
            finally:  # an initialised group torn down at interpreter exit can abort the process (gloo's threads)
                dist.destroy_process_group()
            return 0
    try:
        sock = _listen_socket(args.host, args.port)
    except _ServeError as e:
        return _fail(str(e), 1)
    try:
        t0 = time.perf_counter()
        engine = Engine.from_pretrained(args.model, device=device, dtype=_DTYPES[args.dtype] if args.dtype else None,
                                        max_batch=args.max_batch, tensor_parallel=args.tensor_parallel, **options)
        if args.tensor_parallel:
            engine.lead()  # the other ranks get each admitted request's inputs from rank 0
        if engine.processor is None:
            raise Qwen2VLFastError(f"--model {args.model!r} has no tokenizer.json: the server needs the tokenizer "
                                   f"to render chat requests")
        name = args.served_model_name or args.model
        app = create_app(engine, served_model_name=name,
                         api_key=args.api_key or os.environ.get("QWEN2VL_FAST_API_KEY") or None,
                         allowed_local_media_path=args.allowed_local_media_path, close_engine_on_shutdown=True)
        host, port = sock.getsockname()[:2]
        ready = (f"qwen2vl-fast: serving {name!r} ({engine.model}, loaded in {time.perf_counter() - t0:.1f} s) on "
                 f"http://{f'[{host}]' if ':' in host else host}:{port}/v1 (Ctrl-C to stop)")
        state = app.state.server

        class Server(uvicorn.Server):
            async def startup(self, sockets=None):
                await super().startup(sockets=sockets)
                if not self.should_exit:
                    print(ready, file=sys.stderr, flush=True)  # the line to wait for: requests are taken now

            def handle_exit(self, sig, frame):  # SIGINT / SIGTERM: refuse new requests, cancel those in flight
                state.begin_shutdown()
                super().handle_exit(sig, frame)

        config = uvicorn.Config(app, host=args.host, port=port, log_level=args.log_level, access_log=args.access_log,
                                timeout_graceful_shutdown=10)
        Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen2vl-fast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    from .presets import PRESETS

    d = sub.add_parser("demo", help="run the main job on an embedded tiny random checkpoint")
    d.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="default: qwen2-vl-2b on a GPU, tiny-qwen2-vl on the CPU")
    d.add_argument("--checkpoint", help="use this checkpoint directory instead of writing one")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--dtype", default=None, choices=list(_DTYPES), help="default: bfloat16 on a GPU, else float32")
    d.add_argument("--backend", default="auto")
    d.add_argument("--max-new-tokens", type=int, default=32)
    d.add_argument("--no-cuda-graphs", action="store_true")
    d.add_argument("--image", type=int, nargs=2, default=[224, 336], metavar=("H", "W"),
                   help="size of the synthetic picture (without --image-file)")
    d.add_argument("--image-file", help="a real image (path, file:// or data URI), run through the processor")
    d.add_argument("--prompt", default="Describe this image.")
    d.add_argument("--check", action="store_true", help="also run transformers and print the logits difference")
    d.set_defaults(fn=_cmd_demo)

    g = sub.add_parser("generate", help="stream an answer to a prompt with images / videos")
    g.add_argument("prompt")
    g.add_argument("--model", required=True, help="checkpoint directory")
    g.add_argument("--image", action="append", default=[], help="image path / file:// / data URI (repeatable)")
    g.add_argument("--video", action="append", default=[], help="video path (repeatable)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", default=None, choices=list(_DTYPES), help="default: the checkpoint's")
    g.add_argument("--backend", default="auto")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--max-len", type=int, default=None, help="KV cache length (default: min(context, 8192))")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--no-cuda-graphs", action="store_true")
    g.add_argument("--tensor-parallel", action="store_true",
                   help="shard the language model over the ranks of torchrun (torchrun --nproc-per-node N "
                        "$(which qwen2vl-fast) generate --tensor-parallel ...); rank 0 prints")
    g.set_defaults(fn=_cmd_generate)

    w = sub.add_parser("write-checkpoint", help="write a random-weight checkpoint in the HF format")
    w.add_argument("--preset", required=True, choices=list(PRESETS))
    w.add_argument("--out", required=True)
    w.add_argument("--dtype", default="bfloat16", choices=list(_DTYPES))
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--max-shard-mb", type=float, default=2048)
    w.add_argument("--key-scheme", default="hub", choices=["hub", "transformers"])
    w.set_defaults(fn=_cmd_write_checkpoint)

    q = sub.add_parser("quantize", help="quantize a checkpoint into the GPTQ or AWQ format")
    q.add_argument("--model", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--bits", type=int, default=4, choices=[4, 8])
    q.add_argument("--group-size", type=int, default=128)
    q.add_argument("--format", default="gptq", choices=["gptq", "awq"])
    q.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    q.add_argument("--sym", action="store_true")
    q.add_argument("--act-order", action="store_true")
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    q.set_defaults(fn=_cmd_quantize)

    sub.add_parser("presets", help="list the presets").set_defaults(fn=_cmd_presets)

    o = sub.add_parser("ops", help="list ops, implementations, what auto picks and the measured winners")
    o.add_argument("--device", default=None)
    o.add_argument("--json", action="store_true")
    o.add_argument("--cache", default=None, help="tuning cache file (default ~/.cache/qwen2vl_fast/dispatch.json)")
    o.set_defaults(fn=_cmd_ops)

    t = sub.add_parser("tune", help="measure the raced ops at a model's real shapes and cache the winners")
    t.add_argument("--model", required=True, help="checkpoint directory")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--dtype", default=None, choices=list(_DTYPES), help="default: the checkpoint's")
    t.add_argument("--image", nargs="*", default=["448x448", "1344x896"], metavar="WxH",
                   help="image sizes whose vision-tower shapes to measure (multiples of 28)")
    t.add_argument("--prompt-tokens", type=int, nargs="*", default=[64, 1024], help="text prefill lengths")
    t.add_argument("--max-batch", type=int, default=16, help="decode batch buckets up to this size")
    t.add_argument("--max-len", type=int, default=None)
    t.add_argument("--cache", default=None, help="tuning cache file (default ~/.cache/qwen2vl_fast/dispatch.json)")
    t.add_argument("--remeasure", action="store_true", help="forget this device's earlier winners first")
    t.set_defaults(fn=_cmd_tune)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat completions, /v1/models, /metrics)")
    s.add_argument("--model", required=True, help="checkpoint directory")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=_port, default=8000, help="TCP port (0: any free port, printed at start)")
    s.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model as given)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (default: "
                   "$QWEN2VL_FAST_API_KEY, else no key)")
    s.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="let requests name local image / video files inside DIR (default: data: URIs only)")
    s.add_argument("--max-batch", type=_positive_int, default=16, help="sequences decoded together (KV slots)")
    s.add_argument("--max-len", type=_positive_int, default=None,
                   help="KV cache tokens per sequence (default: min(context, 8192))")
    s.add_argument("--min-pixels", type=_positive_int, default=None, help="every image's minimum pixel budget")
    s.add_argument("--max-pixels", type=_positive_int, default=None,
                   help="every image's pixel budget (default: the checkpoint's, capped at max_len // 2 * 784)")
    s.add_argument("--vision-cache-mb", type=float, default=None,
                   help="vision encoder output cache in MiB (0: off; default: the engine's, 256)")
    s.add_argument("--max-queue", type=_positive_int, default=None,
                   help="sequences that may wait for a KV slot; past it requests get 429 (default 256)")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--dtype", default=None, choices=list(_DTYPES), help="default: the checkpoint's")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--access-log", action="store_true", help="log every request")
    s.add_argument("--tensor-parallel", action="store_true",
                   help="shard the language model over the ranks of torchrun (torchrun --nproc-per-node N "
                        "$(which qwen2vl-fast) serve --tensor-parallel ...); rank 0 listens")
    s.set_defaults(fn=_cmd_serve)
    return p


# input / output paths that do not exist or cannot be written: the user's to fix (2), unlike a full disk (1)
_PATH_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EROFS, errno.EEXIST,
                errno.ENAMETOOLONG}


def main(argv=None) -> int:
    """Exit status: 0 done, 2 bad input (a one-line `qwen2vl-fast: error: ...`), 1 a failure at run time (one
    line too; QWEN2VL_FAST_DEBUG=1 re-raises it with its traceback), 130 interrupted (Ctrl-C, no traceback)."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130  # 128 + SIGINT, as a shell reports it
    except Qwen2VLFastError as e:
        return _fail(str(e), 2)
    except OSError as e:
        message = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else f"{type(e).__name__}: {e}"
        return _fail(message, 2 if e.errno in _PATH_ERRNOS else 1)
    except Exception as e:
        if os.environ.get("QWEN2VL_FAST_DEBUG"):
            raise
        return _fail(f"{type(e).__name__}: {e} (QWEN2VL_FAST_DEBUG=1 shows the traceback)", 1)


def _fail(message: str, status: int) -> int:
    one_line = re.sub(r":?\s*\n\s*", ": ", message.strip(), count=1)
    one_line = re.sub(r"\s*\n\s*", "; ", one_line)
    print(f"qwen2vl-fast: error: {one_line}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
