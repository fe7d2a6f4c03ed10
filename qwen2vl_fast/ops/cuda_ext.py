"""CUDA C++ implementations (the extension qwen2vl_fast._C), registered as the "cuda" backend of their ops.

Each wrapper calls a `torch.ops.qwen2vl_fast.*` op defined in csrc/ (TORCH_LIBRARY); the extension is imported
only when an op first runs on a CUDA device (`cuda_ext_runs_on`), so CPU installs never need it.

- vision_rotary -> `rotary_2d_` (csrc/rotary_2d.cu): rotates q and k IN PLACE inside qkv, returns views of it.
- patch_embed_frames -> `patch_gather` (csrc/patch_gather.cu) writes the normalised patch rows straight in the
  weight dtype, then one cuBLAS GEMM (F.linear); the (N, 1176) float32 rows are never materialised.
- quant_linear -> `quant_gemm_decode` (csrc/quant_decode_gemm.cu) in the decode regime (<= DECODE_MAX_ROWS
  rows), the Triton weight-only GEMM (kernels/quant_gemm.py) above it: dispatch by M.
  Variant "cuda-marlin" (raced by `auto` only, never forced): `quant_gemm_decode_marlin`
  (csrc/quant_decode_marlin.cu, cp.async pipeline, scales hoisted per group) in the same regime, the same
  fallbacks elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BackendError
from ..layout import fused_tensor_shapes
from ..quant.config import QuantConfig
from .registry import cuda_ext_runs_on, implementation, variant

_ROTARY_HEAD_DIMS = (64, 80, 128)  # the instances compiled in csrc/rotary_2d.cu
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ops():
    """torch.ops.qwen2vl_fast, after importing the extension (the import runs its TORCH_LIBRARY registrations)."""
    from qwen2vl_fast import _C  # noqa: F401

    return torch.ops.qwen2vl_fast


@implementation("vision_rotary", "cuda", runs_on=cuda_ext_runs_on,
                supports=lambda cfg: cfg.vision.head_dim in _ROTARY_HEAD_DIMS)
def vision_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int):
    """2D rotary on the q and k of a fused qkv projection output, in place (csrc/rotary_2d.cu).

    qkv: (S, 3 * H * D) CUDA, fp32/fp16/bf16, last dim contiguous (rows may be padded), columns q | k | v, each
    head-major; cos, sin: (S, D) fp32. Returns q, k, v as (S, H, D) views of qkv, whose q and k parts are
    overwritten: rotated in fp32 and rounded once, bit-identical to the reference. v is untouched. Head dims
    64/80/128 only: `resolve` gives models with other head dims (the tiny test presets use 16) the next backend.
    """
    s, width = qkv.shape
    d = width // (3 * num_heads)
    if d not in _ROTARY_HEAD_DIMS or qkv.dtype not in _KERNEL_DTYPES or qkv.stride(-1) != 1:
        raise BackendError(f"the CUDA 2D rotary handles head_dim {sorted(_ROTARY_HEAD_DIMS)}, dtypes fp32/fp16/bf16 "
                           f"and a unit last stride; got head_dim {d}, {qkv.dtype}, stride {qkv.stride(-1)}")
    _ops().rotary_2d_(qkv, cos.float().contiguous(), sin.float().contiguous(), num_heads)
    return qkv.view(s, 3, num_heads, d).unbind(1)


@implementation("patch_embed_frames", "cuda", runs_on=cuda_ext_runs_on)
def patch_embed_frames(frames: torch.Tensor, weight: torch.Tensor, mean, std, patch_size: int = 14,
                       temporal_patch_size: int = 2, merge_size: int = 2) -> torch.Tensor:
    """The patch embedding from resized uint8 frames (T, C, H, W): gather + normalise into (N, C*tp*p*p) rows of
    weight's dtype in merge-group order (csrc/patch_gather.cu; rows bit-identical to
    normalize_patchify(...).to(weight.dtype)), then rows @ weight.T with weight (E, C*tp*p*p). Frames elsewhere
    than weight's device are copied there first."""
    if weight.dtype not in _KERNEL_DTYPES:
        raise BackendError(f"the CUDA patch gather writes fp32/fp16/bf16 rows, not {weight.dtype}")
    frames = frames.to(weight.device, non_blocking=True).contiguous()
    rows = _ops().patch_gather(frames, [float(m) for m in mean], [float(s) for s in std], patch_size,
                               temporal_patch_size, merge_size, weight.dtype)
    return F.linear(rows, weight)


# ---- weight-only quantized linear -------------------------------------------------------------------------------

# Rows up to which the CUDA decode kernel runs (its limit: two n8 token tiles); above, the Triton kernel's
# tensor-core tiles. bench/bench_quant.py times both at M = 1..64 on the GPU: the crossover it reports decides
# this constant (not yet measured: see bench/results/).
DECODE_MAX_ROWS = 16
_DECODE_DTYPES = (torch.float16, torch.bfloat16)
_COUNTERS: dict = {}  # device -> zeroed int32, one entry per 64-column tile (the kernel leaves them zeroed)
_COUNTERS_MIN = 8192  # covers N up to 524,288 (lm_head 152,064): allocated once, before any graph capture


def _decode_shape_ok(n: int, k: int, group_size: int, bits: int) -> bool:
    """The kernel's shape rule (csrc/kernels.h): N % 8, and K and the group multiples of one iteration's k
    (4 packed word rows: 32 for int4, 16 for int8); group_size -1 is one group of K."""
    step = 4 * (32 // bits)
    group = k if group_size == -1 else group_size
    return n % 8 == 0 and k % step == 0 and group > 0 and k % group == 0 and group % step == 0


def decode_kernel_handles(w, dtype: torch.dtype) -> bool:
    """Whether csrc/quant_decode_gemm.cu takes this QuantizedWeight with activations of `dtype` (no GPU sync)."""
    return (dtype in _DECODE_DTYPES and w.scales.dtype == dtype and w.zeros.dtype == dtype
            and _decode_shape_ok(w.out_features, w.in_features, w.group_size, w.bits))


def decode_kernel_supports(cfg) -> bool:
    """The model-level check `resolve` uses: every linear a quantized checkpoint may store (fused qkv, o, fused
    gate/up, down, lm_head) has a shape and group size the decode kernel takes. Unquantized models: True (the op
    never runs)."""
    qc = QuantConfig.from_config(cfg.raw)
    if qc is None:
        return True
    shapes = [shape for name, shape in fused_tensor_shapes(cfg).items()
              if name == "lm_head.weight" or (name.startswith("model.layers.0.") and name.endswith("proj.weight"))]
    return all(_decode_shape_ok(n, k, qc.group_size, qc.bits) for n, k in shapes)


def _counters(device: torch.device, tiles: int) -> torch.Tensor:
    from qwen2vl_fast.kernels.tile_plans import ticket_counters

    return ticket_counters(_COUNTERS, device, tiles, _COUNTERS_MIN, "quant decode GEMM")


def decode_gemm(x2: torch.Tensor, w, bias=None, kernel: str = "quant_gemm_decode") -> torch.Tensor:
    """(M <= 16, K) activation rows in the weight's input order -> (M, N), csrc/quant_decode_gemm.cu (`kernel`
    "quant_gemm_decode_marlin": csrc/quant_decode_marlin.cu, same contract). The split-K counters are shared by
    every launch on the device (both kernels leave them zeroed): launches must not run concurrently on two
    streams."""
    if x2.data_ptr() % 16 or (x2.shape[0] > 1 and (x2.stride(0) * x2.element_size()) % 16):
        x2 = x2.clone()  # 16-byte activation loads (e.g. a view at an odd offset)
    counters = _counters(x2.device, -(-w.out_features // 64))
    return getattr(_ops(), kernel)(x2, w.qweight, w.scales, w.zeros, bias, w.bits, w.group_size, counters)


def decode_gemm_marlin(x2: torch.Tensor, w, bias=None) -> torch.Tensor:
    """decode_gemm with the Marlin-class kernel (csrc/quant_decode_marlin.cu)."""
    return decode_gemm(x2, w, bias, kernel="quant_gemm_decode_marlin")


@implementation("quant_linear", "cuda", runs_on=cuda_ext_runs_on, supports=decode_kernel_supports)
def quant_linear_cuda(x: torch.Tensor, w, bias=None) -> torch.Tensor:
    """y = x @ dequantize(w).T + b: the CUDA decode kernel for <= DECODE_MAX_ROWS rows of fp16/bf16 (the decode
    steps), the Triton kernel for more rows (prefill) and for fp32 activations (parity runs), both with fused
    dequantisation. Act-order weights: x's columns are permuted first, as the Triton launcher does."""
    return _quant_linear(x, w, bias, lambda x2, w, b: decode_gemm(x2, w, b))


def _quant_linear(x: torch.Tensor, w, bias, decode) -> torch.Tensor:
    """quant_linear_cuda's routing with `decode(x2, w, bias)` as the decode-regime kernel."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if rows > DECODE_MAX_ROWS or rows == 0 or not decode_kernel_handles(w, x.dtype):
        from qwen2vl_fast.kernels.quant_gemm import quant_linear as triton_quant_linear

        return triton_quant_linear(x, w, bias)
    from qwen2vl_fast.kernels.gemm import as_rows  # the row view both Triton GEMMs use (act-order included)

    lead, x2 = as_rows(x, k, w.perm)
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        bias = bias.to(x.dtype).contiguous()
    return decode(x2, w, bias).reshape(*lead, w.out_features)


@variant("quant_linear", "cuda-marlin", runs_on=cuda_ext_runs_on, auto_on=cuda_ext_runs_on)
def quant_linear_cuda_marlin(x: torch.Tensor, w, bias=None) -> torch.Tensor:
    """quant_linear_cuda with the Marlin-class decode kernel (csrc/quant_decode_marlin.cu) for the decode rows:
    a candidate `auto` races against the register-direct kernel, Triton and the reference, per shape. Shapes
    the decode kernels do not take go where quant_linear_cuda sends them (Triton)."""
    return _quant_linear(x, w, bias, lambda x2, w, b: decode_gemm_marlin(x2, w, b))
