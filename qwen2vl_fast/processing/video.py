"""Videos -> `pixel_values_videos`, `video_grid_thw`, `second_per_grid_ts` (REFERENCE.md §5 "Video").

The rules are qwen-vl-utils' (`fetch_video`, `smart_nframes`), the Qwen2.5-VL-era version, followed by the
HF video processor's normalize + patchify. Version choices:
- frame count: `floor_by_factor(n, 2)` at the end (the original Qwen2-VL release rounded instead);
- `VIDEO_TOTAL_PIXELS` defaults to int(128000*28*28*0.9), or float(env VIDEO_MAX_PIXELS) as in qwen-vl-utils
  (the original release used 24576*28*28 and no env var);
- `video_start` / `video_end` (seconds) follow the decord / torchcodec readers' `calculate_video_frame_range`:
  whole frame indices [ceil(start*fps), floor(end*fps)] and `sample_fps = n / range_frames * video_fps`.
Frames are decoded with PyAV. `total_frames` is the number of packets of the video stream (container frame
counts are often 0 or wrong; packets are counted without decoding, like decord's index); if fewer frames decode
than that, sampling is redone over the frames that did decode. `VideoProcessor.grid_thw` (behind
`Processor.count_tokens`) gives the grid from the container alone, decoding nothing (`probe_file`: the stream's
frame count where it has one, exact unless that count disagrees with the packets; else the packets counted the
same way, ~50 ms for a 250 MB Matroska file in the page cache).

Resize: qwen-vl-utils resizes uint8 frames with torchvision and then calls `.float()`; here frames stay uint8
through the same bicubic antialiased resize (`resize_uint8`, torchvision's semantics: native uint8 kernel on
the CPU, float + round elsewhere) and are normalized from uint8, as transformers' fast processors do.

Frames given already sampled (a list of PIL images / HWC uint8 arrays / image paths, a (T, H, W, 3) uint8
array or a uint8 (T, 3, H, W) tensor) are used as-is (sampling options are ignored), padded to an even count by
repeating the last frame; their sample fps is the `fps` option or 2.0. Like qwen-vl-utils (`fetch_image` per
frame) they are sized with the *image* budget, min/max_pixels defaulting to 4*28*28 / 16384*28*28, and no
total_pixels: the HF video processor's own resize is then an identity for the official checkpoints, whose
configs carry that budget too.
"""

from __future__ import annotations

import json
import math
import numbers
import os

import torch

from ..errors import ImageError, VideoError
from .patchify import CLIP_MEAN, CLIP_STD, normalize_patchify
from .resize import MAX_PIXELS, MIN_PIXELS, resize_uint8, smart_resize

FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(float(os.environ.get("VIDEO_MAX_PIXELS", 128000 * 28 * 28 * 0.9)))

_SAMPLING = ("fps", "nframes", "min_frames", "max_frames", "video_start", "video_end")
_PIXELS = ("min_pixels", "max_pixels", "total_pixels", "resized_height", "resized_width")
_ALIASES = {"video_min_pixels": "min_pixels", "video_max_pixels": "max_pixels"}


def _by_factor(x, rounding):  # round / ceil / floor to a multiple of FRAME_FACTOR
    return int(rounding(x / FRAME_FACTOR)) * FRAME_FACTOR


def smart_nframes(total_frames, video_fps, fps=None, nframes=None, min_frames=None, max_frames=None) -> int:
    """How many frames to sample from a video of `total_frames` at `video_fps` (an even number >= 2)."""
    if total_frames <= 0:
        raise VideoError("the video has no frames")
    if fps is not None and nframes is not None:
        raise VideoError(f"give either fps ({fps}) or nframes ({nframes}), not both")
    if nframes is not None:
        n = _by_factor(nframes, round)  # Python round, half to even as qwen-vl-utils: 5 -> 4, 7 -> 8
        if not FRAME_FACTOR <= n <= total_frames:
            raise VideoError(f"nframes={nframes} rounds to {n} frames, outside [{FRAME_FACTOR}, {total_frames}] "
                             f"(the video has {total_frames} frames)")
        return n
    if video_fps <= 0:
        raise VideoError(f"the video's frame rate is {video_fps}; cannot sample by fps (pass nframes)")
    lo = _by_factor(FPS_MIN_FRAMES if min_frames is None else min_frames, math.ceil)
    hi = _by_factor(min(FPS_MAX_FRAMES if max_frames is None else max_frames, total_frames), math.floor)
    n = _by_factor(min(max(total_frames / video_fps * (FPS if fps is None else fps), lo), hi, total_frames),
                   math.floor)
    if not FRAME_FACTOR <= n <= total_frames:
        raise VideoError(f"video too short: {total_frames} frame(s) give {n} sampled frames, at least "
                         f"{FRAME_FACTOR} are needed" + (" (a still image?)" if total_frames == 1 else ""))
    return n


def sample_indices(total_frames, video_fps, *, fps=None, nframes=None, min_frames=None, max_frames=None,
                   video_start=None, video_end=None):
    """-> (frame indices (n,) int64, sample_fps): linspace over the frame range, rounded half to even."""
    start, end = 0, total_frames - 1
    if (video_start is not None or video_end is not None) and total_frames > 0 and video_fps > 0:
        duration = total_frames / video_fps
        if video_start is not None:
            start = math.ceil(max(0.0, min(video_start, duration)) * video_fps)
        if video_end is not None:
            end = min(math.floor(max(0.0, min(video_end, duration)) * video_fps), total_frames - 1)
        if start >= end:
            raise VideoError(f"video_start={video_start}s / video_end={video_end}s select frames {start}..{end} "
                             f"of a {duration:.2f}s video ({total_frames} frames at {video_fps:g} fps): empty range")
    count = end - start + 1
    n = smart_nframes(count, video_fps, fps, nframes, min_frames, max_frames)
    return torch.linspace(start, end, n).round().long(), n / max(count, 1e-6) * video_fps


def _check_options(opts: dict) -> dict:
    """Validate option names and values; aliases (video_min_pixels, ...) are renamed."""
    out = {}
    for key, value in opts.items():
        key = _ALIASES.get(key, key)
        if key not in _SAMPLING + _PIXELS:
            raise VideoError(f"unknown video option {key!r}; known: {', '.join(_SAMPLING + _PIXELS)}")
        if value is None:
            continue
        times = key in ("video_start", "video_end")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or (
                value < 0 if times else value <= 0):
            raise VideoError(f"video option {key}={value!r} must be a {'non-negative' if times else 'positive'} "
                             f"number")
        out[key] = value
    if ("resized_height" in out) != ("resized_width" in out):
        raise VideoError("give both resized_height and resized_width, or neither")
    return out


def _split(video, overrides: dict):
    """A video (plain value or qwen-vl-utils dict) + call overrides -> (source, options); the dict wins."""
    opts = dict(overrides)
    if isinstance(video, dict):
        if "video" not in video:
            raise VideoError(f"a video dict needs a 'video' key, got keys {sorted(video)}")
        opts.update({k: v for k, v in video.items() if k not in ("video", "type")})
        video = video["video"]
    return video, _check_options(opts)


def _path(video: str) -> str:
    if video.startswith(("http://", "https://")):
        raise VideoError(f"{video}: http(s) videos are not fetched (no network access); download it first")
    path = video[7:] if video.startswith("file://") else video
    if not os.path.isfile(path):
        raise VideoError(f"{path}: no such video file")
    return path


_TEXT_CODECS = {"ansi", "bintext", "xbin", "idf"}  # text-art "video" codecs FFmpeg guesses for text files


def _open_video(path: str):
    """-> (PyAV container, its first video stream), or a VideoError saying why the file is not a video."""
    import av

    try:
        container = av.open(path)
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"{path}: cannot be read as a video ({e})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: has no video stream")
    if container.streams.video[0].codec_context.name in _TEXT_CODECS:
        container.close()  # FFmpeg's tty demuxer renders any .txt/.nfo/.asc file as "ANSI art" frames
        raise VideoError(f"{path}: not a decodable video (FFmpeg reads it as a text file); give a video "
                         "file such as .mp4, .mkv or .webm")
    return container, container.streams.video[0]


def _count_packets(path: str, container, stream) -> int:
    """The number of (non-empty) packets of the video stream, one per frame, demuxed without decoding, up to any
    demuxing error: the video's `total_frames`."""
    import av

    total = 0
    try:
        for packet in container.demux(stream):
            total += bool(packet.size)
    except av.FFmpegError as e:
        if total == 0:
            raise VideoError(f"{path}: corrupt video ({e})") from None
    return total


def _frame_rate(stream, total: int) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate and stream.duration and total:  # no rate in the container: frames / duration
        rate = total / float(stream.duration * stream.time_base)
    return float(rate or 0)


def _file_sampling(opts: dict, default_fps: float, min_frames: int, max_frames: int) -> dict:
    """Checked options of a video file + the processor's defaults -> `sample_indices`' keyword arguments."""
    opts = {"min_frames": min_frames, "max_frames": max_frames, **opts}
    kw = {k: opts[k] for k in _SAMPLING if k in opts}
    if "nframes" not in kw:
        kw.setdefault("fps", default_fps)
    return kw


def probe_file(path: str):
    """(total_frames, video_fps, height, width) of a video file from its container, decoding no frame: the frame
    count is the stream's own (`nb_frames`, e.g. MP4, MOV, AVI) or, where the container has none (Matroska /
    WebM, fragmented MP4), the packets are counted as `_decode_file` counts them (demuxed, not decoded); the
    size is the codec's (0 where only decoding would tell). Raises VideoError where `_decode_file` refuses the
    file before decoding."""
    container, stream = _open_video(path)
    with container:
        total = stream.frames or _count_packets(path, container, stream)
        return total, _frame_rate(stream, total), stream.codec_context.height, stream.codec_context.width


def _decode_file(path: str, kw: dict):
    """Decode the sampled frames of a video file with PyAV -> (uint8 (n, 3, H, W), sample_fps); kw: the
    `sample_indices` arguments (`_file_sampling`)."""
    import av

    container, stream = _open_video(path)
    with container:  # count the packets (one per frame) without decoding, up to any demuxing error
        total = _count_packets(path, container, stream)
        video_fps = _frame_rate(stream, total)
    for _ in range(2):  # a second pass only if fewer frames decode than the stream has packets
        try:
            idx, sample_fps = sample_indices(total, video_fps, **kw)
        except VideoError as e:
            raise VideoError(f"{path}: {e}") from None
        wanted, last = set(idx.tolist()), int(idx.max())
        frames, decoded = {}, 0
        container, stream = _open_video(path)
        with container:
            stream.thread_type = "AUTO"
            error = None
            try:  # a demuxing error ends the stream: keep what decoded before it (like torchvision's reader)
                for packet in container.demux(stream):
                    try:
                        decoded_frames = packet.decode()
                    except av.FFmpegError as e:  # a corrupt packet is skipped: frames are those that decode
                        error = e
                        continue
                    for frame in decoded_frames:
                        if decoded in wanted:
                            frames[decoded] = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
                        decoded += 1
                    if decoded > last:
                        break
            except av.FFmpegError as e:
                error = e
        if decoded == 0:
            raise VideoError(f"{path}: " + (f"corrupt video, no frame decodes ({error})" if error else
                                            "the video stream has no frames"))
        if len(frames) == len(wanted):
            if len({f.shape for f in frames.values()}) > 1:
                raise VideoError(f"{path}: the frame size changes within the video")
            return torch.stack([frames[i] for i in idx.tolist()]), sample_fps
        total = decoded
    raise VideoError(f"{path}: frames could not be decoded consistently")


def _frame(item, i: int) -> torch.Tensor:
    """One already-sampled frame (PIL image, HWC uint8 array, or image path) -> uint8 (3, H, W)."""
    import numpy as np
    from PIL import Image

    if isinstance(item, str):
        path = _path(item)
        try:
            with Image.open(path) as im:
                item = im.copy()
        except (OSError, Image.DecompressionBombError) as e:
            raise VideoError(f"frame {i}: {path} is not a readable image ({e})") from None
    if isinstance(item, Image.Image):
        if item.mode in ("RGBA", "LA", "PA") or (item.mode == "P" and "transparency" in item.info):
            rgba = item.convert("RGBA")  # composite on white, as qwen-vl-utils' to_rgb
            item = Image.new("RGB", rgba.size, (255, 255, 255))
            item.paste(rgba, mask=rgba.split()[3])
        item = np.array(item.convert("RGB"))
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
            raise VideoError(f"frame {i}: arrays must be HxWx3 uint8, got {item.dtype} {tuple(item.shape)}")
        return torch.from_numpy(np.require(item, requirements=["C", "W"])).permute(2, 0, 1)
    raise VideoError(f"frame {i}: expected a PIL image, an HxWx3 uint8 array or an image path, "
                     f"got {type(item).__name__}")


def _load(video, opts: dict, default_fps: float, min_frames: int, max_frames: int):
    """(source, checked options) -> (uint8 (T, 3, H, W) with T even for pre-sampled frames, sample_fps)."""
    if isinstance(video, str):
        return _decode_file(_path(video), _file_sampling(opts, default_fps, min_frames, max_frames))
    if type(video).__module__ == "numpy" and getattr(video, "ndim", 0) == 4:  # (T, H, W, 3), as transformers takes
        video = list(video)
    if isinstance(video, torch.Tensor):
        if video.dtype != torch.uint8 or video.dim() != 4 or video.shape[1] != 3:
            raise VideoError(f"a video tensor must be uint8 (T, 3, H, W), got {video.dtype} {tuple(video.shape)}")
        frames = video
    elif isinstance(video, (list, tuple)):
        frames = [_frame(f, i) for i, f in enumerate(video)]
        sizes = sorted({tuple(f.shape[1:]) for f in frames})
        if len(sizes) > 1:
            raise VideoError(f"the frames of a video must all have one size, got (H, W) sizes {sizes}")
        frames = torch.stack(frames) if frames else None
    else:
        raise VideoError(f"a video is a file path, a list of frames, a (T, H, W, 3) uint8 array, a uint8 (T, 3, "
                         f"H, W) tensor or a dict with a 'video' key, got {type(video).__name__} (wrap the frames "
                         f"of one video in a list)")
    if frames is None or frames.shape[0] == 0:
        raise VideoError("the video has no frames (empty frame list or tensor)")
    if frames.shape[0] % FRAME_FACTOR:  # qwen-vl-utils: pad to an even count with the last frame
        frames = torch.cat([frames, frames[-1:].expand(FRAME_FACTOR - frames.shape[0] % FRAME_FACTOR, -1, -1, -1)])
    return frames, float(opts.get("fps", FPS))


def _frame_hw(item, i: int) -> tuple[int, int]:
    """The (H, W) `_frame` gives a frame, from its header or shape alone (no pixel decoded); raises VideoError
    where `_frame` refuses the frame."""
    import numpy as np
    from PIL import Image

    if isinstance(item, str):
        path = _path(item)
        try:
            with Image.open(path) as im:
                return im.height, im.width
        except (OSError, Image.DecompressionBombError) as e:
            raise VideoError(f"frame {i}: {path} is not a readable image ({e})") from None
    if isinstance(item, Image.Image):
        return item.height, item.width
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 3 and item.shape[2] == 3:
        return item.shape[0], item.shape[1]
    raise VideoError(f"frame {i}: not a PIL image, an HxWx3 uint8 array or an image path")


def _presampled_shape(video) -> tuple[int, int, int]:
    """(T, H, W) that `_load` gives frames passed already sampled, before its padding to an even count, from
    their shapes (and image files' headers) alone; raises VideoError where `_load` refuses them."""
    if type(video).__module__ == "numpy" and getattr(video, "ndim", 0) == 4:  # as _load: a list of HxWx3 frames
        if video.dtype.name != "uint8" or video.shape[3] != 3:
            raise VideoError(f"arrays must be HxWx3 uint8, got {video.dtype} {tuple(video.shape)}")
        t, h, w = video.shape[:3]
    elif isinstance(video, torch.Tensor):
        if video.dtype != torch.uint8 or video.dim() != 4 or video.shape[1] != 3:
            raise VideoError(f"a video tensor must be uint8 (T, 3, H, W), got {video.dtype} {tuple(video.shape)}")
        t, h, w = video.shape[0], video.shape[2], video.shape[3]
    elif isinstance(video, (list, tuple)):
        sizes = {_frame_hw(f, i) for i, f in enumerate(video)}
        if len(sizes) > 1:
            raise VideoError(f"the frames of a video must all have one size, got (H, W) sizes {sorted(sizes)}")
        t, (h, w) = len(video), (sizes.pop() if sizes else (0, 0))
    else:
        raise VideoError(f"not a video: {type(video).__name__}")
    if t == 0:
        raise VideoError("the video has no frames (empty frame list or tensor)")
    return int(t), int(h), int(w)


def load_video(video, **overrides):
    """Decode and sample one video -> (frames uint8 (T, 3, H, W) at the source resolution, sample_fps)."""
    src, opts = _split(video, overrides)
    return _load(src, opts, FPS, FPS_MIN_FRAMES, FPS_MAX_FRAMES)


class VideoProcessor:
    """Videos -> model inputs. `max_pixels` is the per-frame ceiling (qwen-vl-utils' VIDEO_MAX_PIXELS);
    `total_pixels` is shared by the frames: max_pixels_per_frame = max(min(max_pixels, total_pixels / n * 2),
    int(min_pixels * 1.05)). A per-video / per-call `max_pixels` can only lower that, as in qwen-vl-utils.
    Frames given already sampled are sized as images instead (module docstring)."""

    def __init__(self, min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS, total_pixels=VIDEO_TOTAL_PIXELS,
                 fps=FPS, min_frames=FPS_MIN_FRAMES, max_frames=FPS_MAX_FRAMES, patch_size=14,
                 temporal_patch_size=2, merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD):
        _check_options(dict(min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels, fps=fps,
                            min_frames=min_frames, max_frames=max_frames))
        self.min_pixels, self.max_pixels, self.total_pixels = min_pixels, max_pixels, total_pixels
        self.fps, self.min_frames, self.max_frames = fps, min_frames, max_frames
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    @classmethod
    def from_pretrained(cls, directory):
        """Patch sizes and mean/std from video_preprocessor_config.json, else preprocessor_config.json; fps and
        min/max_frames from those files too. Their min/max_pixels are NOT read: official checkpoints (and video
        configs re-saved from them) carry the image budget there (3136 .. 16384*28*28), which qwen-vl-utils
        never applies to videos; pass min_pixels / max_pixels / total_pixels explicitly instead."""
        keys = ("fps", "min_frames", "max_frames", "patch_size", "temporal_patch_size", "merge_size", "image_mean",
                "image_std")
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                try:
                    with open(path, encoding="utf-8") as f:
                        cfg = json.load(f)
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise VideoError(f"{path}: unreadable JSON ({e})") from None
                return cls(**{k: cfg[k] for k in keys if isinstance(cfg, dict) and cfg.get(k) is not None})
        return cls()

    def frame_size(self, height: int, width: int, nframes: int | None, **opts) -> tuple[int, int]:
        """The resized (height, width) of the frames of a video sampled to `nframes` (qwen-vl-utils' fetch_video);
        nframes=None: frames given already sampled, sized as images (module docstring)."""
        opts = _check_options(opts)
        factor = self.patch_size * self.merge_size
        try:
            if "resized_height" in opts:  # qwen-vl-utils: smart_resize with the *image* defaults
                return smart_resize(round(opts["resized_height"]), round(opts["resized_width"]), factor,
                                    MIN_PIXELS, MAX_PIXELS)
            if nframes is None:
                return smart_resize(height, width, factor, opts.get("min_pixels", MIN_PIXELS),
                                    opts.get("max_pixels", MAX_PIXELS))
            min_pixels = opts.get("min_pixels", self.min_pixels)
            total = opts.get("total_pixels", self.total_pixels)
            max_pixels = max(min(self.max_pixels, total / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
            max_pixels = min(opts.get("max_pixels", max_pixels), max_pixels)
            if min_pixels <= max_pixels and round(height / factor) * round(width / factor) * factor ** 2 < min_pixels:
                # The upscale branch: qwen-vl-utils never checks its result against max_pixels, which it can
                # pass when max_pixels is near min_pixels (it may be as low as 1.05 * min_pixels here).
                max_pixels = math.inf
            return smart_resize(height, width, factor, min_pixels, max_pixels)
        except ImageError as e:
            raise VideoError(f"video frames of {height}x{width} (HxW): {e}") from None

    def grid_thw(self, video, **overrides):
        """The (t, h, w) patch grid `__call__` gives `video` (the same item and overrides), from its sizes alone:
        no frame is decoded or resized. A file's frame count, frame rate and size come from its container
        (`probe_file`), then `sample_indices` and `frame_size` pick the sampled frames and their size as
        `__call__` does; frames given already sampled are sized from their shapes (image files from their
        headers). Exact but for damaged files (where fewer frames decode than the container lists, `__call__`
        resamples over the frames that do decode), a container whose frame count disagrees with its packets, or
        frames whose size changes within the video (`__call__` then refuses it). None where the size cannot be
        known without decoding; raises VideoError for what `__call__` refuses without decoding."""
        src, opts = _split(video, overrides)
        if isinstance(src, str):
            total, video_fps, height, width = probe_file(_path(src))
            if not (total and height and width):  # no frames (`__call__` refuses it) or a size only decoding tells
                return None
            idx, _ = sample_indices(total, video_fps, **_file_sampling(opts, self.fps, self.min_frames,
                                                                        self.max_frames))
            t = nframes = len(idx)
        else:
            t, height, width = _presampled_shape(src)
            t, nframes = t + -t % FRAME_FACTOR, None  # _load's padding to an even count; sized as images
        h, w = self.frame_size(height, width, nframes, **{k: opts[k] for k in _PIXELS if k in opts})
        return -(-t // self.temporal_patch_size), h // self.patch_size, w // self.patch_size

    def load(self, video, **overrides):
        """Like `load_video`, with this processor's fps and min/max_frames defaults."""
        src, opts = _split(video, overrides)
        return _load(src, opts, self.fps, self.min_frames, self.max_frames)

    def __call__(self, videos, device=None, **overrides) -> dict:
        """One video or a list of videos -> dict(pixel_values_videos (N, 1176) float32, video_grid_thw (n, 3)
        int64, second_per_grid_ts [temporal_patch_size / sample_fps], fps [sample_fps]), on `device`."""
        items = list(videos) if isinstance(videos, (list, tuple)) else [videos]
        if not items:
            raise VideoError("no videos given")
        rows, grids, fps = [], [], []
        for i, video in enumerate(items):
            src, opts = _split(video, overrides)
            try:
                frames, sample_fps = _load(src, opts, self.fps, self.min_frames, self.max_frames)
            except VideoError as e:  # with several videos, say which one
                if len(items) == 1:
                    raise
                raise VideoError(f"video {i + 1} of {len(items)}: {e}") from None
            h, w = self.frame_size(frames.shape[2], frames.shape[3], frames.shape[0] if isinstance(src, str) else None,
                                   **{k: opts[k] for k in _PIXELS if k in opts})
            frames = resize_uint8(frames.to(device) if device is not None else frames, h, w)
            pixels, grid = normalize_patchify(frames, self.image_mean, self.image_std, self.patch_size,
                                              self.temporal_patch_size, self.merge_size)
            rows.append(pixels)
            grids.append(grid)
            fps.append(sample_fps)
        return {"pixel_values_videos": torch.cat(rows),
                "video_grid_thw": torch.tensor(grids, dtype=torch.int64, device=rows[0].device),
                "second_per_grid_ts": [self.temporal_patch_size / f for f in fps], "fps": fps}
