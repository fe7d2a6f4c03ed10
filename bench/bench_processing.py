"""Preprocessing: ours (CPU and, where present, GPU) vs transformers' processor, same inputs, same run.

Inputs, both synthetic but realistic in size and content (smooth gradients, edges, noise; compressed):
- a 3840x2160 photo (JPEG, decoded once; the timing covers resize + rescale/normalize + patchify, which is
  what the processors do: decoding is the same PIL call for everyone and is reported separately);
- a 30 s 1280x720 30 fps video file (H.264 or MPEG-4), sampled at 2 fps: the timing covers decode + sampling +
  resize + normalize + patchify (transformers' video processor needs torchvision; without it that row is absent).
Reported: median ms, speedup of ours over transformers, grids, and the pixel difference between them.

    python bench/bench_processing.py [--device cuda] [--reps 5] [--skip-video]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    _ROOT = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, _ROOT)
    import bench  # noqa: F401
    import qwen2vl_fast  # noqa: F401
    sys.path.remove(_ROOT)

from bench import harness, results
from qwen2vl_fast.processing.image import ImageProcessor
from qwen2vl_fast.processing.video import VideoProcessor

CACHE = Path("/tmp/qwen2vl_fast_bench")


def synthetic_photo(width=3840, height=2160, seed=0) -> np.ndarray:
    """A photo-like uint8 (H, W, 3) image: gradients, a few hard-edged shapes and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 200 + 30, y / height * 180 + 40, (x + y) / (width + height) * 150 + 60], -1)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(50, 400)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def photo_file(path: Path) -> Path:
    if not path.exists():
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(synthetic_photo()).save(path, quality=90)
    return path


def video_file(path: Path, seconds=30, fps=30, width=1280, height=720) -> Path:
    """A moving-pattern clip written with PyAV (cached: encoding 900 720p frames takes a while)."""
    if path.exists():
        return path
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.mp4")
    base = synthetic_photo(width, height, seed=1)
    with av.open(str(tmp), "w") as out:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * fps):
            frame = np.roll(base, shift=(i * 4, i * 7), axis=(0, 1))
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.rename(path)
    return path


def transformers_processors():
    """transformers' image processor (fast if torchvision is there, else the slow PIL one) and video processor
    (None without torchvision)."""
    import transformers

    fast = importlib.util.find_spec("torchvision") is not None
    kw = dict(min_pixels=3136, max_pixels=12845056)
    image = transformers.Qwen2VLImageProcessorFast(**kw) if fast else transformers.Qwen2VLImageProcessor(**kw)
    video = transformers.Qwen2VLVideoProcessor() if fast else None
    return image, video, ("fast (torchvision)" if fast else "slow (PIL)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-video", action="store_true")
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    from PIL import Image

    path = photo_file(CACHE / "photo_3840x2160.jpg")  # written once, outside the timing
    t0 = time.perf_counter()
    photo = Image.open(path).convert("RGB")
    decode_ms = (time.perf_counter() - t0) * 1e3
    devices = ["cpu"] + ([args.device] if args.device != "cpu" else [])
    ours_img = ImageProcessor()
    rows = {}
    for dev in devices:
        sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)

        def run(dev=dev, sync=sync):
            out = ours_img([photo], device=dev)
            sync()
            return out

        ours = run()
        rows[f"image ours ({dev})"] = harness.time_fn(run, warmup=1, rep=args.reps, device="cpu")
    hf_image, hf_video, hf_kind = transformers_processors()
    ref = hf_image(images=[photo], return_tensors="pt")
    rows[f"image transformers {hf_kind}"] = harness.time_fn(lambda: hf_image(images=[photo], return_tensors="pt"),
                                                           warmup=1, rep=args.reps, device="cpu")
    diff = (ours["pixel_values"].cpu() - ref["pixel_values"]).abs()
    payload = {"photo": "3840x2160", "jpeg_decode_ms": decode_ms, "transformers_image_processor": hf_kind,
               "image_grid_ours": ours["image_grid_thw"].tolist(), "image_grid_transformers": ref["image_grid_thw"].tolist(),
               "image_max_abs_diff": float(diff.max()), "image_mean_abs_diff": float(diff.mean())}
    if not args.skip_video:
        path = str(video_file(CACHE / "video_30s_720p.mp4"))
        ours_vid = VideoProcessor()
        for dev in devices:
            rows[f"video ours ({dev})"] = harness.time_fn(lambda dev=dev: ours_vid([path], device=dev), warmup=1,
                                                         rep=max(1, args.reps // 2), device="cpu")
        v = ours_vid([path])
        payload.update(video="30 s 1280x720 @30fps", video_grid_ours=v["video_grid_thw"].tolist())
        if hf_video is not None:
            rows["video transformers"] = harness.time_fn(lambda: hf_video(videos=[path], return_tensors="pt"),
                                                         warmup=1, rep=max(1, args.reps // 2), device="cpu")
    payload["timings"] = rows
    print(f"preprocessing  photo 3840x2160 (JPEG decode {decode_ms:.0f} ms, not included)")
    print(f"{'what':42s} {'median ms':>10s} {'p20':>9s} {'p80':>9s}")
    for name, t in rows.items():
        print(f"{name:42s} {t['median_ms']:10.1f} {t['p20_ms']:9.1f} {t['p80_ms']:9.1f}")
    ref_name = f"image transformers {hf_kind}"
    for name, t in rows.items():
        if name.startswith("image ours"):
            payload[f"speedup {name} vs transformers"] = rows[ref_name]["median_ms"] / t["median_ms"]
            print(f"speedup {name} vs transformers {hf_kind}: {payload[f'speedup {name} vs transformers']:.1f}x")
    print(f"pixel_values vs transformers: max|d| {payload['image_max_abs_diff']:.3g}, "
          f"mean|d| {payload['image_mean_abs_diff']:.3g} (normalised units)")
    print("result:", results.write_result("processing", payload, out_dir=args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
