"""The whole vision tower (ViT + merger): ours (triton / auto / torch backends) vs transformers (sdpa).

What is measured: one tower forward, batch of one input, for 448x448, 1344x896, 2048x2048 images and a 16-frame
448x448 video, on the Qwen2-VL ViT (2B preset: merger to 1536) and the Qwen2.5-VL ViT (3B preset: windows,
merger to 2048). Weights are random, built in memory at the real shapes (no checkpoint on disk): both
implementations get the same values (ours in the runtime's layout: fused, MLP widths padded where
`qwen2vl_fast.load` pads them). Both sides are timed the same way, CUDA events around each call: an end-to-end
figure, the host work of each call included (metadata, per-window loops). Reported per case: median ms, TFLOP/s
(bench/flops.py), % of the measured bf16 matmul ceiling and of the roofline (each weight read once), and speedup
over transformers. Goals (issue): 1344x896 on the Qwen2-VL ViT >= 1.6x transformers sdpa and >= 60% of the
measured matmul rate; the Qwen2.5-VL ViT >= 5x transformers sdpa. Results JSON under bench/results/.

    python bench/bench_vision_tower.py [--presets qwen2-vl-2b qwen2.5-vl-3b] [--backends triton auto torch]
        [--cases 448x448 1344x896 2048x2048 video16x448] [--dtype bfloat16] [--reps 20]
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    _ROOT = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, _ROOT)
    import bench  # noqa: F401
    import qwen2vl_fast  # noqa: F401
    sys.path.remove(_ROOT)

from bench import flops, harness, results, roofline
from qwen2vl_fast.config import parse_config
from qwen2vl_fast.layout import RENAMES, fusion_plan, fused_tensor_shapes, hub_tensor_shapes
from qwen2vl_fast.ops import resolve
from qwen2vl_fast.presets import preset_config
from qwen2vl_fast.testing.checkpoint_writer import random_tensor
from qwen2vl_fast.vision import VisionTower

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CASES = {"448x448": [[1, 32, 32]], "1344x896": [[1, 64, 96]], "2048x2048": [[1, 146, 146]],
         "video16x448": [[8, 32, 32]],  # 16 frames -> 8 temporal patches
         "smoke56x84": [[1, 4, 6]]}  # CPU smoke test only


def hub_vision_weights(cfg, dtype, device, seed=0) -> dict:
    """Random hub-named vision tensors (what transformers' module loads)."""
    return {n: random_tensor(n, s, dtype, seed).to(device)
            for n, s in hub_tensor_shapes(cfg).items() if n.startswith("visual.")}


def fused_vision_weights(cfg, hub: dict) -> dict:
    """The same values in the runtime's fused layout (as the checkpoint loader builds it)."""
    plan, out = fusion_plan(cfg), {}
    for name in fused_tensor_shapes(cfg):
        if not name.startswith("visual."):
            continue
        if name in plan:
            out[name] = torch.cat([hub[p] for p in plan[name]])
        else:
            src = {v: k for k, v in RENAMES.items()}.get(name, name)
            out[name] = hub[src].reshape(hub[src].shape[0], -1) if name == "visual.patch_embed.weight" else hub[src]
    return out


def runtime_vision_weights(cfg, hub: dict) -> tuple[dict, str]:
    """The fused weights as `qwen2vl_fast.load` would hold them: MLP widths zero-padded to the runtime's alignment
    where the package pads them (qwen2vl_fast.align, exact: zero columns add zeros). Returns (weights, what was
    done) so the result says which shapes ours ran."""
    from qwen2vl_fast.align import pad_mlp_widths

    class VisionOnly(dict):  # the decoder's MLPs are absent: seen as non-tensors, which pad_mlp_widths skips
        def __missing__(self, key):
            return None
    weights = pad_mlp_widths(cfg, VisionOnly(fused_vision_weights(cfg, hub)))
    return dict(weights), "pad_mlp_widths"


def transformers_tower(raw, hub, dtype, device):
    import transformers

    if raw["model_type"] == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel as cls
        vcfg = transformers.Qwen2VLConfig(**raw).vision_config
    else:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel as cls
        vcfg = transformers.Qwen2_5_VLConfig(**raw).vision_config
    vcfg._attn_implementation = "sdpa"
    with torch.device(device):  # built on the device (its non-persistent buffers, e.g. inv_freq, too)
        tower = cls._from_config(vcfg) if hasattr(cls, "_from_config") else cls(vcfg)
    tower.load_state_dict({k[len("visual."):]: v for k, v in hub.items()}, strict=True)
    return tower.to(dtype=dtype).eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["qwen2-vl-2b", "qwen2.5-vl-3b"])
    p.add_argument("--backends", nargs="+", default=["triton", "auto", "torch"])
    p.add_argument("--cases", nargs="+", default=[c for c in CASES if c != "smoke56x84"], choices=list(CASES))
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    ceilings = roofline.device_ceilings(device, dtype)
    rows = []
    result_file = results.ResultFile("vision_tower", args.out_dir)
    payload = dict(dtype=args.dtype, device=str(device), cpu_smoke=device.type != "cuda", ceilings=ceilings,
                   timing_method="cuda-events per call (end to end, host work included)", rows=rows)
    for preset in args.presets:
        raw = preset_config(preset)
        cfg = parse_config(raw)
        hub = hub_vision_weights(cfg, dtype, device)
        impls = {}
        if not args.skip_transformers:
            impls["transformers/sdpa"] = transformers_tower(raw, hub, dtype, device)
        ours_weights, padding = runtime_vision_weights(cfg, hub)
        for backend in args.backends:
            try:
                impls[f"ours/{backend}"] = VisionTower(cfg, ours_weights, resolve(backend, device, cfg))
            except Exception as e:  # e.g. triton not runnable here: report, go on
                print(f"skip ours/{backend}: {e}")
        for case in args.cases:
            grid = torch.tensor(CASES[case])
            pixels = torch.randn(int(grid.prod(-1).sum()), cfg.vision.patch_dim, device=device)
            count = flops.vision_flops(cfg.vision, grid.tolist())
            weight_bytes = sum(flops.vision_matmul_params(cfg.vision).values()) * dtype.itemsize
            base, outputs = None, {}
            for name, tower in impls.items():
                if name.startswith("ours"):
                    call = lambda t=tower: t(pixels, grid)  # noqa: E731  (metadata included: once per batch)
                else:
                    call = lambda t=tower: t(pixels.to(dtype), grid_thw=grid.to(device))  # noqa: E731
                with torch.inference_mode():
                    out = call()
                    out = (out if torch.is_tensor(out) else out[0]).float()
                    outputs[name] = out
                    t = harness.time_fn(call, warmup=3, rep=args.reps, device=device, method="events")
                row = dict(preset=preset, case=case, impl=name, patches=int(grid.prod(-1).sum()), **t,
                           tflops=count["total"] / (t["median_ms"] * 1e-3) / 1e12)
                row["roofline"] = roofline.roofline_fraction(count["total"], weight_bytes, t["median_ms"], ceilings)
                row["pct_of_roofline"] = row["roofline"]["pct_of_roofline"]
                ref_out = outputs.get("transformers/sdpa", outputs.get("ours/torch"))
                if ref_out is not None and ref_out is not out and ref_out.shape == out.shape:
                    row["rel_err_vs_reference"] = float((out - ref_out).norm() / ref_out.norm())
                row["pct_matmul_peak"] = 100 * row["tflops"] / ceilings["tflops"]
                if name.startswith("transformers"):
                    base = t["median_ms"]
                row["mlp_padding"] = padding if name.startswith("ours") else None
                rows.append(row)
            for row in rows:
                if row["preset"] == preset and row["case"] == case and base:
                    row["speedup_vs_transformers"] = base / row["median_ms"]
            result_file.update(payload)  # after each case: a timeout keeps the finished ones
        del impls, hub
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"{'preset':14s} {'case':12s} {'impl':20s} {'ms':>9s} {'TFLOP/s':>8s} {'%peak':>6s} {'vs HF':>6s} "
          f"{'rel err':>8s}")
    for r in rows:
        print(f"{r['preset']:14s} {r['case']:12s} {r['impl']:20s} {r['median_ms']:9.2f} {r['tflops']:8.1f} "
              f"{r.get('pct_matmul_peak', float('nan')):6.1f} {r.get('speedup_vs_transformers', float('nan')):6.2f} "
              f"{r.get('rel_err_vs_reference', 0.0):8.1e}")
    print("result:", result_file.finish(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
