"""Preprocessing: images, videos and chat prompts to model inputs (REFERENCE.md §5).

Identical in layout to transformers' Qwen2-VL processor and qwen-vl-utils, with no transformers import:
`tokenizers`, Pillow and PyAV do the I/O, torch does the math, on the CPU or straight on the GPU.
"""

from .resize import smart_resize  # noqa: F401


def __getattr__(name):
    # Image/video/processor classes load Pillow and PyAV: imported on first use.
    import importlib

    homes = {"ImageProcessor": ".image", "load_image": ".image", "VideoProcessor": ".video", "load_video": ".video",
             "Processor": ".processor", "render_chat": ".chat", "extract_media": ".chat"}
    if name in homes:
        return getattr(importlib.import_module(homes[name], __name__), name)
    raise AttributeError(f"module 'qwen2vl_fast.processing' has no attribute {name!r}")
