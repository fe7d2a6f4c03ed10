"""Image sizes and the resize itself (REFERENCE.md §5).

`smart_resize` picks the size the model sees: both sides multiples of 28 (patch 14 x merge 2), the pixel
count inside [min_pixels, max_pixels], the aspect ratio kept as closely as possible. Python's round() is
round-half-to-even (round(2.5) == 2), which is what the reference uses; C's roundf would differ at halves.

`resize_uint8` is the resize of transformers' torchvision-backed processor done with torch alone: bicubic,
antialiased, align_corners=False. Like torchvision, uint8 images are resized by torch's native uint8 kernel on
the CPU, and on other devices in float32, then clamped to [0, 255], rounded and cast back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ImageError

IMAGE_FACTOR = 28
MIN_PIXELS = 4 * 28 * 28  # 3136, the official checkpoints' preprocessor_config.json
MAX_PIXELS = 16384 * 28 * 28  # 12,845,056, likewise (the code default is 1280 * 28 * 28)
MAX_RATIO = 200


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) -> the resized (height, width): multiples of `factor`, pixels within the budget."""
    if height <= 0 or width <= 0:
        raise ImageError(f"image of size {height}x{width} (HxW) has no pixels")
    if min_pixels > max_pixels:
        raise ImageError(f"min_pixels {min_pixels} is larger than max_pixels {max_pixels}")
    if max_pixels < factor * factor:
        raise ImageError(f"max_pixels {max_pixels} is below one {factor}x{factor} patch group: no size can meet it")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise ImageError(f"image of size {height}x{width} (HxW) has aspect ratio {ratio:.1f}, above the model's "
                         f"limit of {MAX_RATIO}")
    # No max(factor, .) here, as transformers: a side that rounds to 0 sends the image through the
    # min_pixels branch (qwen-vl-utils clamps instead, which differs for very thin images).
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    # transformers returns such an over-budget size silently; it happens when min_pixels is close to
    # max_pixels (rounding up to multiples of 28 overshoots) or when a side rounds to 0.
    if h == 0 or w == 0 or h * w > max_pixels:
        raise ImageError(f"image of size {height}x{width} (HxW) cannot meet max_pixels {max_pixels}: the "
                         f"nearest size {h}x{w} has {h * w} pixels")
    return h, w


def resize_uint8(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic antialiased resize of uint8 images (..., C, H, W) to (..., C, height, width), as torchvision."""
    if images.dtype != torch.uint8:
        raise ImageError(f"resize_uint8 expects uint8 images, got {images.dtype}")
    *lead, c, h, w = images.shape
    if (h, w) == (height, width):
        return images
    x = images.reshape(-1, c, h, w)
    if x.device.type == "cpu":
        out = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    else:
        out = F.interpolate(x.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        out = out.clamp_(0, 255).round_().to(torch.uint8)
    return out.reshape(*lead, c, height, width)
