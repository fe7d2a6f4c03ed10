"""Images -> `pixel_values` float32 (N, 1176) and `image_grid_thw` int64 (n, 3) (REFERENCE.md §5).

Sizes: transformers' / qwen-vl-utils' smart_resize. Pixels: torchvision's uint8 bicubic antialiased resize
(transformers' fast processor) done in torch on the target device, then normalize + patchify: bit-identical to
that processor on the CPU; a few uint8 levels off PIL's bicubic (the slow processor; bounds in the tests).

Inputs (decisions):
- PIL: RGBA/LA/PA, and P/RGB/L with a transparency entry, are composited on white (newer qwen-vl-utils);
  other modes use PIL's convert("RGB"), except 16-bit grey (I;16*), scaled round(v*255/65535), not clipped.
  EXIF orientation is NOT applied (as qwen-vl-utils and transformers); use PIL.ImageOps.exif_transpose first.
- numpy arrays / torch tensors: (H, W) grey, or 3-D with C = 1, 3 or 4 (RGBA: composited like PIL). numpy is
  channels-last when its last dim is 1/3/4, else channels-first; torch is channels-first when its first dim is
  1/3/4, else channels-last. uint8 is 0..255; floats must lie in [0, 1] (torchvision's convention) and are
  quantised to round(x*255); other ranges are refused, so a 0..255 float image cannot pass silently.
- Sources: path (str / os.PathLike), file:// URI, data:image/...;base64 URI, encoded bytes, or a dict
  {"image" | "image_url": source, + any of OPTIONS} whose options override the call's. Other dict keys are
  ignored (message parts carry "type"), misspelt options are refused. No network: http(s) is refused.
- resized_height/resized_width (both or neither) go through smart_resize with the effective budget, as
  qwen-vl-utils' fetch_image (which uses its defaults = ours, ignoring a min/max_pixels given with them).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import numbers
import os
from urllib.parse import unquote

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, ImageError
from .patchify import CLIP_MEAN, CLIP_STD, normalize_patchify
from .resize import MAX_PIXELS, MIN_PIXELS, resize_uint8, smart_resize

OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _pil_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image -> an RGB PIL image (transparency composited on white, I;16 scaled to 8 bits)."""
    if im.width == 0 or im.height == 0:
        raise ImageError(f"image of size {im.height}x{im.width} (HxW) has no pixels")
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode.startswith("I;16"):
        a = np.asarray(im).astype(np.uint32)
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def _pil_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(_pil_rgb(im), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _open(data_or_path, what: str) -> torch.Tensor:
    try:
        with Image.open(data_or_path) as im:
            im.load()
            return _pil_tensor(im)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(f"cannot read {what}: not an image Pillow recognises (corrupt or unsupported)") from None
    except _PIL_ERRORS as e:
        raise ImageError(f"cannot read {what}: {type(e).__name__}: {e}") from None


def _from_string(s: str) -> torch.Tensor:
    head = s[:16].lower()
    if head.startswith(("http://", "https://")):
        raise ImageError(f"{s!r:.80}: no network access here; download the image and pass a local file")
    if head.startswith("data:"):
        meta, comma, payload = s.partition(",")
        if not comma or not meta.lower().startswith("data:image/") or not meta.lower().endswith(";base64"):
            raise ImageError(f"{s!r:.80}: only 'data:image/<type>;base64,<data>' URIs are supported")
        try:
            raw = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageError(f"data URI {s!r:.80}: invalid base64 ({e})") from None
        if not raw:
            raise ImageError(f"data URI {s!r:.80}: empty payload")
        return _open(io.BytesIO(raw), f"the image in data URI {s!r:.80}")
    path = s
    if head.startswith("file://"):
        path = s[7:]
        if not os.path.exists(path) and os.path.exists(unquote(path)):
            path = unquote(path)  # percent-encoded URI
    return _from_path(path)


def _from_path(path: str) -> torch.Tensor:
    if not os.path.exists(path):
        raise ImageError(f"image file not found: {path!r}")
    if os.path.isdir(path):
        raise ImageError(f"{path!r} is a directory, not an image file")
    return _open(path, f"image file {path!r}")


def _from_array(t: torch.Tensor, channels_first: bool, kind: str) -> torch.Tensor:
    """(H, W) or 3-D uint8/float tensor -> (3, H, W) uint8 on the tensor's device."""
    if t.ndim == 2:
        t = t.unsqueeze(0)
    elif t.ndim == 3:
        first, last = t.shape[0] in (1, 3, 4), t.shape[-1] in (1, 3, 4)
        if not (first and channels_first) and last:
            t = t.permute(2, 0, 1)
        elif not first:
            raise ImageError(f"{kind} of shape {tuple(t.shape)}: expected (H, W), (H, W, C) or (C, H, W) "
                             "with C in 1 (grey), 3 (RGB), 4 (RGBA)")
    else:
        raise ImageError(f"{kind} of shape {tuple(t.shape)}: expected 2 or 3 dimensions (one image)")
    c, h, w = t.shape
    if h == 0 or w == 0:
        raise ImageError(f"{kind} of shape {tuple(t.shape)} (C, H, W) has no pixels")
    if t.dtype.is_floating_point:
        lo, hi = t.min().item(), t.max().item()
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1 / 510 or hi > 1 + 1 / 510:
            raise ImageError(f"float {kind} has values in [{lo:g}, {hi:g}]: float images must be in [0, 1]; "
                             "pass uint8 for 0..255 data")
        t = (t.to(torch.float64) * 255).round_().clamp_(0, 255).to(torch.uint8)
    elif t.dtype != torch.uint8:
        raise ImageError(f"{kind} of dtype {t.dtype}: expected uint8 (0..255) or float (0..1)")
    if c == 4:  # RGBA: composite on white exactly as for a PIL image
        rgba = Image.fromarray(t.permute(1, 2, 0).cpu().numpy(), "RGBA")
        return _pil_tensor(rgba).to(t.device)
    return t.expand(3, h, w).contiguous() if c == 1 else t.contiguous()


def _to_tensor(image) -> torch.Tensor:
    """One image source -> uint8 (3, H, W), contiguous; CPU unless it is a tensor already on a device."""
    if isinstance(image, Image.Image):
        try:
            image.load()
        except _PIL_ERRORS as e:
            raise ImageError(f"cannot read PIL image: {type(e).__name__}: {e}") from None
        return _pil_tensor(image)
    if isinstance(image, torch.Tensor):
        return _from_array(image.detach(), True, "tensor")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 and image.dtype.kind != "f":
            raise ImageError(f"array of dtype {image.dtype}: expected uint8 (0..255) or float (0..1)")
        image = image.astype(np.float64) if image.dtype.kind == "f" else image  # float16/big-endian -> native
        image = np.ascontiguousarray(image)  # negative strides (arr[..., ::-1]) -> a copy
        return _from_array(torch.from_numpy(image if image.flags.writeable else image.copy()), False, "array")
    if isinstance(image, str):
        return _from_string(image)
    if isinstance(image, os.PathLike):
        return _from_path(os.fspath(image))
    if isinstance(image, (bytes, bytearray)):
        return _open(io.BytesIO(image), f"{len(image)} bytes of encoded image")
    raise ImageError(f"unsupported image type {type(image).__name__} ({image!r:.80}): pass a PIL image, a uint8 "
                     "array/tensor, a path, a file:// or data: URI, or a dict with an 'image' key")


def _split(item) -> tuple[object, dict]:
    """An item of `images` -> (source, per-image options)."""
    if not isinstance(item, dict):
        return item, {}
    source = item.get("image", item.get("image_url"))
    if isinstance(source, dict):  # OpenAI style {"image_url": {"url": ...}}
        source = source.get("url")
    if source is None:
        raise ImageError(f"image dict {item!r:.80} has no 'image' (or 'image_url') entry")
    typos = [k for k in item if k not in OPTIONS and any(w in str(k) for w in ("pixel", "resize", "height", "width"))]
    if typos:
        raise ImageError(f"unknown image option(s) {typos}: the options are {list(OPTIONS)}")
    return source, {k: item[k] for k in OPTIONS if item.get(k) is not None}


def _check_options(opts: dict, factor: int) -> dict:
    for k, v in opts.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
                              or v < 0 or (v == 0 and k != "min_pixels")):
            raise ImageError(f"{k} must be a positive number, got {v!r:.80}")
    if opts["max_pixels"] < factor * factor:
        raise ImageError(f"max_pixels {opts['max_pixels']} is below one {factor}x{factor} patch group "
                         f"({factor * factor} pixels): no size can meet it")
    if opts["min_pixels"] > opts["max_pixels"]:
        raise ImageError(f"min_pixels {opts['min_pixels']} is larger than max_pixels {opts['max_pixels']}")
    if (opts["resized_height"] is None) != (opts["resized_width"] is None):
        raise ImageError("resized_height and resized_width must be given together")
    return opts


def load_image(image) -> torch.Tensor:
    """An image (PIL, array, tensor, path, URI, bytes, or {"image": ...} dict) -> uint8 (3, H, W) RGB on the CPU."""
    return _to_tensor(_split(image)[0]).cpu()


class ImageProcessor:
    """Qwen2-VL / Qwen2.5-VL image preprocessing; stateless per call. Defaults are the official checkpoints'."""

    def __init__(self, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, temporal_patch_size=2,
                 merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD):
        for k, v in dict(patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size).items():
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ImageError(f"{k} must be a positive integer, got {v!r}")
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.factor = patch_size * merge_size
        _check_options(dict(min_pixels=min_pixels, max_pixels=max_pixels, resized_height=None,
                            resized_width=None), self.factor)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ImageError(f"image_mean and image_std need 3 values (RGB), got {image_mean} and {image_std}")

    @classmethod
    def from_pretrained(cls, checkpoint_dir) -> "ImageProcessor":
        """Settings from `checkpoint_dir`/preprocessor_config.json (min_pixels / max_pixels, which override
        size={"shortest_edge", "longest_edge"} as in transformers; patch sizes; mean/std); defaults without one."""
        d = os.fspath(checkpoint_dir)
        if not os.path.isdir(d):
            raise ConfigError(f"checkpoint directory not found: {d!r}")
        path = os.path.join(d, "preprocessor_config.json")
        if not os.path.isfile(path):
            return cls()
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
        size = cfg.get("size") if isinstance(cfg.get("size"), dict) else {}
        kw = {"min_pixels": size.get("shortest_edge", size.get("min_pixels")),
              "max_pixels": size.get("longest_edge", size.get("max_pixels"))}
        kw |= {k: cfg[k] for k in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size",
                                   "image_mean", "image_std") if cfg.get(k) is not None}
        try:
            return cls(**{k: v for k, v in kw.items() if v is not None})
        except (ImageError, TypeError) as e:
            raise ConfigError(f"{path}: {e}") from None

    def target_size(self, height: int, width: int, **options) -> tuple[int, int]:
        """The (height, width) an image of height x width is resized to, under the given OPTIONS."""
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise ImageError(f"unknown image option(s) {sorted(unknown)}: the options are {list(OPTIONS)}")
        o = _check_options(dict(min_pixels=self.min_pixels, max_pixels=self.max_pixels, resized_height=None,
                                resized_width=None) | options, self.factor)
        if o["resized_height"] is not None:
            height, width = o["resized_height"], o["resized_width"]
        return smart_resize(height, width, self.factor, o["min_pixels"], o["max_pixels"])

    def __call__(self, images, device=None, min_pixels=None, max_pixels=None, resized_height=None,
                 resized_width=None, return_frames: bool = False) -> dict:
        """One image or a list (any source `load_image` takes; dicts override the call's options) ->
        {"pixel_values": float32 (N, C*tp*p*p) = (N, 1176), "image_grid_thw": int64 (n, 3)}, both on `device`
        (default CPU). Rows are the images' patches in order; image i contributes grid_thw[i].prod() rows.

        return_frames=True stops after the resize: {"pixel_frames": [uint8 (1, 3, h, w) per image],
        "image_grid_thw"}, for the model's fused patch embedding (normalise + patchify inside its GEMM)."""
        device = torch.device("cpu") if device is None else torch.device(device)
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        call = dict(min_pixels=min_pixels, max_pixels=max_pixels, resized_height=resized_height,
                    resized_width=resized_width)
        call = {k: v for k, v in call.items() if v is not None}
        jobs = []  # everything is read and checked before any compute
        for i, item in enumerate(items):
            try:
                source, own = _split(item)
                img = _to_tensor(source)
                size = self.target_size(img.shape[1], img.shape[2], **(call | own))
            except ImageError as e:
                raise (ImageError(f"image {i + 1} of {len(items)}: {e}") if len(items) > 1 else e) from None
            jobs.append((img, size))
        groups: dict = {}  # same source and target size -> one batched resize
        for i, (img, size) in enumerate(jobs):
            groups.setdefault((tuple(img.shape), size), []).append(i)
        rows, grids = [None] * len(jobs), [None] * len(jobs)
        for (_, (h, w)), idx in groups.items():
            batch = torch.stack([jobs[i][0].to(device) for i in idx]) if len(idx) > 1 \
                else jobs[idx[0]][0].to(device).unsqueeze(0)
            x = resize_uint8(batch, h, w)  # (n, 3, h, w) uint8
            for j, i in enumerate(idx):
                if return_frames:
                    rows[i] = x[j:j + 1]
                    grids[i] = (1, h // self.patch_size, w // self.patch_size)
                    continue
                rows[i], grids[i] = normalize_patchify(x[j:j + 1], self.image_mean, self.image_std, self.patch_size,
                                                       self.temporal_patch_size, self.merge_size)
        grid_thw = torch.tensor(grids, dtype=torch.int64, device=device).reshape(-1, 3)
        if return_frames:
            return {"pixel_frames": rows, "image_grid_thw": grid_thw}
        width = 3 * self.temporal_patch_size * self.patch_size ** 2
        return {"pixel_values": torch.cat(rows) if rows else torch.empty(0, width, device=device),
                "image_grid_thw": torch.tensor(grids, dtype=torch.int64, device=device).reshape(-1, 3)}
