"""CUDA C++ implementations (the extension qwen2vl_fast._C), registered as the "cuda" backend of their ops.

Each wrapper calls a `torch.ops.qwen2vl_fast.*` op defined in csrc/ (TORCH_LIBRARY); the extension is imported
only when an op first runs on a CUDA device (`cuda_ext_runs_on`), so CPU installs never need it.
"""
