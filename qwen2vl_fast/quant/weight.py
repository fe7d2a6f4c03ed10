"""The runtime layout of a weight-only quantized linear layer, which every format is repacked into at load.

    qweight  int32 (K * bits / 32, N)   column n's value for input k sits in word k // (32 / bits), at bit
                                        offset (k % (32 / bits)) * bits, lowest bits first (GPTQ's own order)
    scales   (G, N) in the model dtype  G = K / group_size groups along K (group_size -1: one group)
    zeros    (G, N) in the model dtype  the true zero point, so w[k, n] = (q[k, n] - zeros[g, n]) * scales[g, n]
                                        with g = k // group_size (GPTQ v1's stored zero - 1 is fixed at load);
                                        integer-valued, as every format stores it (the CUDA decode kernel's
                                        exact dequantisation relies on it)
    perm     int64 (K,) or None         act-order (desc_act): rows are sorted by group at load, so groups are
                                        contiguous; the activation's columns are permuted the same way at run
                                        time (x[:, perm]), never g_idx lookups inside a kernel

The layer computes y = x @ W^T + b with W (N, K) = dequantize(...).T.

Linears sharing an input (q/k/v, gate/up) are fused along N into one QuantizedWeight when their permutations
agree. GPTQ act-order checkpoints may give each its own g_idx: one x permutation cannot serve them all (re-sorting
a part's rows into another part's order breaks its group contiguity), so such a group stays a `QuantizedParts`,
run as one GEMM per part with the outputs concatenated along N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import CheckpointError


@dataclass
class QuantizedWeight:
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    perm: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise CheckpointError(f"{self.bits}-bit weights are not supported (4 and 8 are)")
        k = self.in_features
        g = k if self.group_size == -1 else self.group_size
        if g <= 0 or k % g:
            raise CheckpointError(f"group size {self.group_size} does not divide the input width {k}")
        if self.scales.shape != (k // g, self.out_features) or self.zeros.shape != self.scales.shape:
            raise CheckpointError(f"scales/zeros of shape {tuple(self.scales.shape)} / {tuple(self.zeros.shape)} do "
                                  f"not match {k // g} groups x {self.out_features} outputs")

    @property
    def pack(self) -> int:
        return 32 // self.bits

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * self.pack

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    def to(self, device) -> "QuantizedWeight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(move(self.qweight), move(self.scales), move(self.zeros), self.bits, self.group_size,
                               move(self.perm))


@dataclass
class QuantizedParts:
    """Quantized linears over the same input, concatenated along N in order, each with its own act-order `perm`."""
    parts: tuple

    def __post_init__(self):
        self.parts = tuple(self.parts)
        if len(self.parts) < 2 or len({p.in_features for p in self.parts}) != 1:
            raise CheckpointError("QuantizedParts needs two or more parts of the same input width")

    @property
    def in_features(self) -> int:
        return self.parts[0].in_features

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)

    @property
    def splits(self) -> list[int]:
        return [p.out_features for p in self.parts]

    def to(self, device) -> "QuantizedParts":
        return QuantizedParts(tuple(p.to(device) for p in self.parts))


def unpack_int32(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(K * bits / 32, N) int32 -> (K, N) int32 values in [0, 2^bits), lowest bits first along K."""
    pack = 32 // bits
    shifts = torch.arange(pack, device=packed.device, dtype=torch.int32) * bits
    vals = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
    return vals.reshape(packed.shape[0] * pack, packed.shape[1])


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(K, N) integer values in [0, 2^bits) -> (K * bits / 32, N) int32 (the inverse of unpack_int32)."""
    pack = 32 // bits
    k, n = values.shape
    if k % pack:
        raise ValueError(f"K={k} is not a multiple of {pack} for {bits}-bit packing")
    v = values.to(torch.int64).reshape(k // pack, pack, n)
    shifts = torch.arange(pack, device=values.device, dtype=torch.int64) * bits
    packed = (v << shifts.view(1, -1, 1)).sum(dim=1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def dequantize(w, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense weight (N, K) in the layer's input order (the act-order permutation undone), in `dtype`
    (default: the scales' dtype). Computed as (q - zero) * scale in fp32, then rounded once. A QuantizedParts
    gives its parts' weights concatenated along N."""
    if isinstance(w, QuantizedParts):
        return torch.cat([dequantize(p, dtype) for p in w.parts], 0)
    q = unpack_int32(w.qweight, w.bits).float()
    g = w.in_features if w.group_size == -1 else w.group_size
    rows = torch.arange(w.in_features, device=q.device) // g
    dense = (q - w.zeros.float()[rows]) * w.scales.float()[rows]  # (K, N), K in the stored (sorted) order
    if w.perm is not None:
        dense = torch.empty_like(dense).index_copy_(0, w.perm, dense)
    return dense.t().contiguous().to(dtype or w.scales.dtype)
