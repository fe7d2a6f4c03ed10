"""Preprocessing: images, videos and chat prompts to model inputs (REFERENCE.md §5).

Identical in layout to transformers' Qwen2-VL processor and qwen-vl-utils, with no transformers import:
`tokenizers`, Pillow and PyAV do the I/O, torch does the math, on the CPU or straight on the GPU.
"""

from .resize import smart_resize  # noqa: F401
