"""`qwen2vl-fast`: the command line.

  qwen2vl-fast demo [--preset tiny-qwen2-vl] [--check]   the main job on an embedded default: write a random
                                                         checkpoint, load it, run one image + text prompt
  qwen2vl-fast write-checkpoint --preset P --out DIR     a random-weight checkpoint in the HF format
  qwen2vl-fast presets                                   the presets and their sizes
  qwen2vl-fast ops [--device cuda]                       every op, its implementations, what `auto` picks
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time

import torch

from .errors import Qwen2VLFastError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _cmd_write_checkpoint(args) -> int:
    from .testing.checkpoint_writer import checkpoint_bytes, write_random_checkpoint

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
    from .ops import available

    table = available(args.device)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    for name, info in table.items():
        print(f"{name:18s} implementations: {','.join(info['implementations']):18s} auto -> {info['auto']:7s} "
              f"{info['doc']}")
    return 0


def demo_inputs(cfg, image_hw=(224, 336), text="Describe this image.", seed=0):
    """A chat prompt with one image, built without the image processor: the image is random normalised
    pixels already patchified into (N, 1176) rows for a grid of (1, H/14, W/14)."""
    from .testing.tokenizer import QWEN_SPECIAL_TOKENS as tok

    h, w = image_hw
    grid = torch.tensor([[1, h // 14, w // 14]])
    n_pad = int(grid.prod()) // cfg.vision.merge_unit
    gen = torch.Generator().manual_seed(seed)
    words = [100 + i for i in range(len(text.split()))]  # stand-in text ids below the special range
    ids = ([tok["<|im_start|>"], 872, 198, tok["<|vision_start|>"]] + [tok["<|image_pad|>"]] * n_pad
           + [tok["<|vision_end|>"]] + words + [tok["<|im_end|>"], 198, tok["<|im_start|>"], 77091, 198])
    pixel_values = torch.randn(int(grid.prod()), cfg.vision.patch_dim, generator=gen)
    return torch.tensor([ids]), pixel_values, grid


def _cmd_demo(args) -> int:
    import qwen2vl_fast

    from .testing.checkpoint_writer import write_random_checkpoint

    dtype = _DTYPES[args.dtype]
    with tempfile.TemporaryDirectory(prefix="qwen2vl_fast_demo_") as tmp:
        path = args.checkpoint or tmp
        if not args.checkpoint:
            t0 = time.perf_counter()
            write_random_checkpoint(path, args.preset, dtype=dtype, seed=0)
            print(f"[1/4] wrote a random-weight {args.preset} checkpoint ({args.dtype}) to {path} "
                  f"in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        model = qwen2vl_fast.load(path, device=args.device, dtype=dtype, backend=args.backend)
        print(f"[2/4] loaded {model} in {time.perf_counter() - t0:.1f} s")
        if args.image_file:  # a real image through the processor (chat template, resize, patchify)
            from .processing.processor import Processor

            chat = [{"role": "user", "content": [{"type": "image", "image": args.image_file},
                                                 {"type": "text", "text": args.prompt}]}]
            inputs = Processor.from_pretrained(path)(chat, device=args.device)
            ids, pixels, grid = inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"]
            source = f"{args.image_file} (processed)"
        else:
            ids, pixels, grid = demo_inputs(model.config, tuple(args.image))
            source = f"one random {args.image[0]}x{args.image[1]} image"
        print(f"[3/4] prompt: {ids.shape[1]} tokens, {source} -> grid {grid.tolist()[0]}, {pixels.shape[0]} "
              f"patches, {pixels.shape[0] // 4} image tokens")
        t0 = time.perf_counter()
        out = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid)
        ms = (time.perf_counter() - t0) * 1e3
        top = out.logits[0, -1].float().topk(5)
        print(f"[4/4] forward in {ms:.1f} ms on {args.device}: logits {tuple(out.logits.shape)} {out.logits.dtype}, "
              f"rope_delta {int(out.rope_deltas[0, 0])}, next-token top-5 ids {top.indices.tolist()}")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen2vl-fast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    from .presets import PRESETS

    d = sub.add_parser("demo", help="run the main job on an embedded tiny random checkpoint")
    d.add_argument("--preset", default="tiny-qwen2-vl", choices=list(PRESETS))
    d.add_argument("--checkpoint", help="use this checkpoint directory instead of writing one")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--dtype", default="float32", choices=list(_DTYPES))
    d.add_argument("--backend", default="auto")
    d.add_argument("--image", type=int, nargs=2, default=[224, 336], metavar=("H", "W"),
                   help="size of the random stand-in image (without --image-file)")
    d.add_argument("--image-file", help="a real image (path, file:// or data URI), run through the processor")
    d.add_argument("--prompt", default="Describe this image.")
    d.add_argument("--check", action="store_true", help="also run transformers and print the logits difference")
    d.set_defaults(fn=_cmd_demo)

    w = sub.add_parser("write-checkpoint", help="write a random-weight checkpoint in the HF format")
    w.add_argument("--preset", required=True, choices=list(PRESETS))
    w.add_argument("--out", required=True)
    w.add_argument("--dtype", default="bfloat16", choices=list(_DTYPES))
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--max-shard-mb", type=float, default=2048)
    w.add_argument("--key-scheme", default="hub", choices=["hub", "transformers"])
    w.set_defaults(fn=_cmd_write_checkpoint)

    sub.add_parser("presets", help="list the presets").set_defaults(fn=_cmd_presets)

    o = sub.add_parser("ops", help="list ops, implementations and what auto picks")
    o.add_argument("--device", default=None)
    o.add_argument("--json", action="store_true")
    o.set_defaults(fn=_cmd_ops)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except Qwen2VLFastError as e:
        print(f"qwen2vl-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
