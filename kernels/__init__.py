"""Triton kernels, one file per op family, installed as `qwen2vl_fast.kernels` (never as a top-level
`kernels` package: that name belongs to a PyPI package transformers imports when it finds it).

Each kernel module registers its launcher with `qwen2vl_fast.ops.registry.implementation(op, "triton", ...)`;
the op layer imports this package lazily, so importing qwen2vl_fast never needs Triton.
"""
