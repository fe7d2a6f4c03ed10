"""Published checkpoint formats (ENGINES.md §5.2) <-> the runtime `QuantizedWeight` layout (weight.py).

GPTQ (AutoGPTQ v1 / GPTQModel v2), per linear `prefix.`:
    qweight int32 (K*bits/32, N)  packed along K, lowest bits first -- already the runtime layout
    qzeros  int32 (G, N*bits/32)  packed along N, lowest bits first
    scales  fp16  (G, N)
    g_idx   int32 (K,)            group of each input row; k // group_size unless act-order (desc_act)
  v1 stores zero - 1 and its kernels compute w = s * (q - (z_stored + 1)). The stored field is `bits` wide, so
  a true zero of 0 (possible only for asymmetric quantization) is stored as 2^bits - 1 and every v1 kernel
  reads it back as 2^bits: that is what the checkpoint means, and we reproduce it (true = stored + 1, without
  masking; zeros are floats here so 2^bits is representable). Symmetric checkpoints (zero 8 / 128, stored
  7 / 127, words 0x77777777) never hit this. v2 stores the true zero.
  act-order: perm = argsort(g_idx, stable) sorts the rows so groups become contiguous; qweight rows are
  reordered (unpack, index, repack) and `perm` is kept so the runtime permutes x's columns instead. Each linear
  may have its own g_idx: q/k/v (gate/up) with different ones load as a QuantizedParts, not one fused weight.

AWQ GEMM (AutoAWQ), per linear:
    qweight int32 (K, N/8)   packed along N, interleaved
    qzeros  int32 (G, N/8)   same interleave
    scales  fp16  (G, N)
  Nibble i (shift 4*i) of word c holds column 8*c + AWQ_ORDER[i], AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7];
  equivalently column 8*c + j sits in nibble AWQ_REVERSE_ORDER[j] = [0, 4, 1, 5, 2, 6, 3, 7][j] (the constant
  AutoAWQ's `reverse_awq_order` and vLLM's awq tests use to unpack). w = (q - z) * s, no offset.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from ..errors import CheckpointError
from .config import AWQ, GPTQ, QuantConfig
from .weight import QuantizedParts, QuantizedWeight, pack_int32, unpack_int32

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)          # nibble position -> column offset within the word
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column offset -> nibble position


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    v = v.to(torch.int64)
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def _unpack_cols(packed: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """(R, C) int32 packed along the last dim -> (R, C * 32/bits) int64 values. `order[i]` is the column offset
    stored at field i (None: field i holds offset i)."""
    pack = 32 // bits
    shifts = torch.arange(pack, device=packed.device, dtype=torch.int64) * bits
    fields = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (R, C, pack), by field
    if order is not None:
        cols = torch.empty_like(fields)
        cols[..., list(order)] = fields  # column offset order[i] <- field i
        fields = cols
    return fields.reshape(packed.shape[0], -1)


def _pack_cols(values: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """Inverse of `_unpack_cols`: (R, N) values in [0, 2^bits) -> (R, N * bits/32) int32."""
    pack = 32 // bits
    r, n = values.shape
    v = values.to(torch.int64).reshape(r, n // pack, pack)
    if order is not None:
        v = v[..., list(order)]  # field i <- column offset order[i]
    shifts = torch.arange(pack, device=values.device, dtype=torch.int64) * bits
    return _to_int32((v << shifts).sum(-1))


def _shape_err(what: str, t: torch.Tensor, expected: tuple, why: str) -> CheckpointError:
    return CheckpointError(f"{what}: shape {tuple(t.shape)}, expected {expected} ({why})")


def _check_kinds(name: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> None:
    """Packed tensors are 2-D int32, scales 2-D floating (shared by every format)."""
    for t, tname in ((qweight, "qweight"), (qzeros, "qzeros")):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise CheckpointError(f"{name}.{tname}: expected a 2-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    if scales.dim() != 2 or not scales.is_floating_point():
        raise CheckpointError(f"{name}.scales: expected a 2-D floating tensor, got {scales.dtype} "
                              f"{tuple(scales.shape)}")


def _groups(k: int, group_size: int, what: str) -> int:
    g = k if group_size == -1 else group_size
    if g <= 0 or k % g:
        raise CheckpointError(f"{what}: group_size={group_size} does not divide the input width K={k}")
    return k // g


# ---------------------------------------------------------------------------------------------- GPTQ


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              g_idx: Optional[torch.Tensor], bits: int, group_size: int, version: int = 1,
              dtype: Optional[torch.dtype] = None, name: str = "gptq linear") -> QuantizedWeight:
    """One GPTQ linear -> QuantizedWeight (scales/zeros in `dtype`, default the stored scales' dtype)."""
    if bits not in (4, 8):
        raise CheckpointError(f"{name}: bits={bits} is not supported (4 and 8 are)")
    if version not in (1, 2):
        raise CheckpointError(f"{name}: GPTQ checkpoint_format version {version} is not supported (1 or 2)")
    pack = 32 // bits
    _check_kinds(name, qweight, qzeros, scales)
    k, n = qweight.shape[0] * pack, qweight.shape[1]
    groups = _groups(k, group_size, name)
    if tuple(scales.shape) != (groups, n):
        raise _shape_err(f"{name}.scales", scales, (groups, n), f"K={k}, N={n}, group_size={group_size}")
    if n % pack or tuple(qzeros.shape) != (groups, n // pack):
        raise _shape_err(f"{name}.qzeros", qzeros, (groups, n / pack), f"{bits}-bit zeros packed along N={n}")
    dtype = dtype or scales.dtype
    zeros = _unpack_cols(qzeros, bits) + (1 if version == 1 else 0)

    perm = None
    gs = k if group_size == -1 else group_size
    trivial = torch.arange(k, device=qweight.device) // gs
    if g_idx is not None:
        if g_idx.dim() != 1 or g_idx.shape[0] != k or g_idx.is_floating_point():
            raise CheckpointError(f"{name}.g_idx: expected an integer tensor of shape ({k},), got "
                                  f"{g_idx.dtype} {tuple(g_idx.shape)}")
        g_idx = g_idx.to(device=qweight.device, dtype=torch.int64)
        if not torch.equal(g_idx, trivial):
            order = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[order], trivial):
                raise CheckpointError(f"{name}.g_idx is inconsistent with group_size={group_size}: every one of "
                                      f"the {groups} groups must hold exactly {gs} input rows")
            perm = order
            qweight = pack_int32(unpack_int32(qweight, bits)[perm], bits)
    return QuantizedWeight(qweight.contiguous(), scales.to(dtype).contiguous(), zeros.to(dtype).contiguous(),
                           bits, group_size, perm)


def _integer_zeros(w: QuantizedWeight, lo: int, hi: int, what: str) -> torch.Tensor:
    z = w.zeros.float()
    zi = torch.round(z)
    if not torch.equal(z, zi) or zi.min() < lo or zi.max() > hi:
        raise CheckpointError(f"{what}: zero points must be integers in [{lo}, {hi}] for {w.bits}-bit "
                              f"(found range [{z.min().item()}, {z.max().item()}])")
    return zi.to(torch.int64)


def to_gptq(w: QuantizedWeight, version: int = 1, scale_dtype: torch.dtype = torch.float16) -> dict:
    """QuantizedWeight -> {"qweight", "qzeros", "scales", "g_idx"} in the GPTQ v1 or v2 layout."""
    if version not in (1, 2):
        raise CheckpointError(f"GPTQ checkpoint_format version {version} is not supported (1 or 2)")
    k, n, pack = w.in_features, w.out_features, w.pack
    if n % pack:
        raise CheckpointError(f"GPTQ qzeros need N={n} to be a multiple of {pack} for {w.bits}-bit")
    maxq = (1 << w.bits) - 1
    if version == 1:  # stored = zero - 1; zero 2^bits is how v1 kernels read a stored all-ones field
        stored = _integer_zeros(w, 1, maxq + 1, "GPTQ v1") - 1
    else:
        stored = _integer_zeros(w, 0, maxq, "GPTQ v2")
    gs = k if w.group_size == -1 else w.group_size
    rows = torch.arange(k, device=w.qweight.device) // gs
    qweight, g_idx = w.qweight, rows
    if w.perm is not None:  # undo the sort: stored row j is input row perm[j]
        q = unpack_int32(w.qweight, w.bits)
        qweight = pack_int32(torch.empty_like(q).index_copy_(0, w.perm, q), w.bits)
        g_idx = torch.empty_like(rows).index_copy_(0, w.perm, rows)
    return {"qweight": qweight.contiguous(), "qzeros": _pack_cols(stored, w.bits),
            "scales": w.scales.to(scale_dtype).contiguous(), "g_idx": g_idx.to(torch.int32)}


# ---------------------------------------------------------------------------------------------- AWQ


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
             bits: int = 4, dtype: Optional[torch.dtype] = None, name: str = "awq linear") -> QuantizedWeight:
    """One AWQ GEMM linear -> QuantizedWeight."""
    if bits != 4:
        raise CheckpointError(f"{name}: AWQ bits={bits} is not supported (only 4)")
    _check_kinds(name, qweight, qzeros, scales)
    k, n = qweight.shape[0], qweight.shape[1] * 8
    if k % 8:
        raise CheckpointError(f"{name}.qweight: K={k} must be a multiple of 8 to repack along K")
    groups = _groups(k, group_size, name)
    if tuple(scales.shape) != (groups, n):
        raise _shape_err(f"{name}.scales", scales, (groups, n), f"K={k}, N={n}, group_size={group_size}")
    if tuple(qzeros.shape) != (groups, n // 8):
        raise _shape_err(f"{name}.qzeros", qzeros, (groups, n // 8), "4-bit zeros packed along N")
    dtype = dtype or scales.dtype
    q = _unpack_cols(qweight, 4, AWQ_ORDER)   # (K, N)
    z = _unpack_cols(qzeros, 4, AWQ_ORDER)    # (G, N)
    return QuantizedWeight(pack_int32(q, 4), scales.to(dtype).contiguous(), z.to(dtype).contiguous(), 4,
                           group_size, None)


def to_awq(w: QuantizedWeight, scale_dtype: torch.dtype = torch.float16) -> dict:
    """QuantizedWeight -> {"qweight", "qzeros", "scales"} in the AWQ GEMM layout (no act-order, 4-bit)."""
    if w.bits != 4:
        raise CheckpointError(f"AWQ stores only 4-bit weights, not {w.bits}-bit")
    if w.perm is not None:
        raise CheckpointError("AWQ has no g_idx: an act-order (perm) weight cannot be written as AWQ")
    if w.out_features % 8:
        raise CheckpointError(f"AWQ needs N={w.out_features} to be a multiple of 8")
    z = _integer_zeros(w, 0, 15, "AWQ")
    q = unpack_int32(w.qweight, 4)
    return {"qweight": _pack_cols(q, 4, AWQ_ORDER), "qzeros": _pack_cols(z, 4, AWQ_ORDER),
            "scales": w.scales.to(scale_dtype).contiguous()}


# ---------------------------------------------------------------------------------------------- loading


def is_quantized(tensors: Mapping[str, object], prefix: str) -> bool:
    """Whether the linear at `prefix` ("model.layers.0.mlp.down_proj") is stored quantized (has a qweight)."""
    return f"{prefix}.qweight" in tensors


def load_quantized_linear(tensors: Mapping[str, torch.Tensor], prefix: str, qcfg: QuantConfig,
                          dtype: Optional[torch.dtype] = None) -> QuantizedWeight:
    """Read `{prefix}.qweight/qzeros/scales[/g_idx]` from `tensors` (name -> tensor) per `qcfg`."""
    def get(suffix, required=True):
        t = tensors.get(f"{prefix}.{suffix}")
        if t is None and required:
            raise CheckpointError(f"missing tensor {prefix}.{suffix} of a {qcfg.method} quantized linear")
        return t

    if qcfg.method == GPTQ:
        return from_gptq(get("qweight"), get("qzeros"), get("scales"), get("g_idx", required=False), qcfg.bits,
                         qcfg.group_size, qcfg.version, dtype=dtype, name=prefix)
    if qcfg.method == AWQ:
        return from_awq(get("qweight"), get("qzeros"), get("scales"), qcfg.group_size, qcfg.bits, dtype=dtype,
                        name=prefix)
    raise CheckpointError(f"quant_method {qcfg.method!r} is not supported")


def fuse_quantized(parts: list[QuantizedWeight], name: str = "fused linear"):
    """Concatenate quantized linears along the output dim (N, dim 1 of qweight/scales/zeros): q/k/v, gate/up.
    All parts must share bits, group_size and input width. Parts with one act-order permutation (or none) fuse
    into one QuantizedWeight. GPTQ act-order checkpoints may give each part its own g_idx: those stay a
    QuantizedParts, each part sorted by its own permutation, run as one GEMM per part."""
    first = parts[0]
    for p in parts[1:]:
        if p.bits != first.bits or p.group_size != first.group_size or p.in_features != first.in_features:
            raise CheckpointError(f"{name}: cannot fuse parts with different bits/group_size/input width")
    if len(parts) == 1:
        return first
    if any(_perm_differs(p.perm, first.perm) for p in parts[1:]):
        return QuantizedParts(tuple(parts))
    return QuantizedWeight(torch.cat([p.qweight for p in parts], 1), torch.cat([p.scales for p in parts], 1),
                           torch.cat([p.zeros for p in parts], 1), first.bits, first.group_size, first.perm)


def _perm_differs(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    return (a is None) != (b is None) or (a is not None and not torch.equal(a, b))
