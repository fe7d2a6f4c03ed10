"""Weight-only quantizers that produce the runtime layout (weight.py): round-to-nearest and GPTQ.

Conventions (GPTQ's, so the results write out as GPTQ / GPTQ-v2 checkpoints unchanged):

    maxq = 2^bits - 1; every group (along K) and output channel n gets a scale s and an integer zero point z,
    q = clamp(round(w / s) + z, 0, maxq) and w ~= (q - z) * s.

    asymmetric  the range is widened to hold 0: lo = min(min(w), 0), hi = max(max(w), 0);
                s = (hi - lo) / maxq, z = round(-lo / s)  (in [0, maxq])
    symmetric   a = max(|lo|, hi); s = 2a / maxq, z = (maxq + 1) / 2 = 2^(bits-1)  (8 for 4-bit, 128 for 8-bit),
                i.e. GPTQ's sym=True (stored as 0x77777777 in v1 checkpoints), not absmax / (2^(bits-1) - 1)
    a group that is all zero gets lo, hi = -1, +1 (as GPTQ does), so s is never 0.

Scales and zeros are returned in the weight's dtype (the model dtype); the integer values are computed against
the scale as rounded to that dtype, so (q - z) * s is exactly what the runtime dequantizes.  Every element of
an RTN result is within s/2 of the input (rounding plus at most s/2 of clipping at the range ends).

GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") minimises ||X W^T - X Wq^T||^2 column by column: with H = 2 X^T X (damped), and U the upper
Cholesky factor of H^-1, each column k is quantized, its error e = (w_k - q_k) / U[k, k] is propagated to the
not-yet-quantized columns j > k as w_j -= e * U[k, j], lazily in blocks of `block_size` columns.  Group
parameters are computed when entering a group, from the weights as updated by every earlier column.  With
act_order the columns are processed in descending diag(H) order; the rows of the stored (K, N) qweight are then
in that order (groups are contiguous in it) and `perm[i]` is the original input index of stored row i, which is
exactly what dequantize / the runtime's x[:, perm] expect.
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch

from ..errors import InputError
from .weight import QuantizedWeight, pack_int32

__all__ = ["quantize_rtn", "quantize_gptq", "collect_hessian", "HessianAccumulator"]


# -------------------------------------------------------------------------------------------------- helpers

def _check(weight: torch.Tensor, bits: int, group_size: int) -> Tuple[int, int, int]:
    if weight.dim() != 2:
        raise InputError(f"the weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if bits not in (4, 8):
        raise InputError(f"{bits}-bit quantization is not supported (4 and 8 are)")
    n, k = weight.shape
    g = k if group_size == -1 else group_size
    if g <= 0 or k % g:
        raise InputError(f"group size {group_size} does not divide the input width {k}")
    if k % (32 // bits):
        raise InputError(f"the input width {k} is not a multiple of {32 // bits} ({bits}-bit int32 packing)")
    if not weight.is_floating_point():
        raise InputError(f"the weight must be floating point, got {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise InputError("the weight holds inf or nan")
    return n, k, g


def _params(x: torch.Tensor, bits: int, sym: bool, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (each (R,), float32) for each row of x (R, M); the scale is rounded to `dtype`."""
    maxq = 2**bits - 1
    zero = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    lo = torch.minimum(x.amin(dim=1), zero)
    hi = torch.maximum(x.amax(dim=1), zero)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo = torch.where(empty, -1.0, lo)
    hi = torch.where(empty, 1.0, hi)
    scale = ((hi - lo) / maxq).to(dtype).float()
    # a scale that underflows in a half dtype: fall back to the smallest normal value
    scale = torch.where(scale > 0, scale, torch.finfo(dtype).tiny)
    if sym:
        z = torch.full_like(scale, (maxq + 1) // 2)
    else:
        z = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, z


def _quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer values (as float) of x given broadcastable scale / zero."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def _result(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
            dtype: torch.dtype, perm: Optional[torch.Tensor]) -> QuantizedWeight:
    """q (N, K) integer-valued floats in stored order; scales / zeros (G, N) float32."""
    qweight = pack_int32(q.t().to(torch.int64), bits)
    return QuantizedWeight(qweight, scales.to(dtype).contiguous(), zeros.to(dtype).contiguous(), bits, group_size,
                           None if perm is None else perm.to(torch.int64).contiguous())


# ------------------------------------------------------------------------------------------------------ RTN

@torch.no_grad()
def quantize_rtn(weight: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = False) -> QuantizedWeight:
    """Round-to-nearest quantization of `weight` (N, K) per group of `group_size` inputs (-1: one group) and
    output channel.  See the module docstring for the scale / zero conventions."""
    n, k, g = _check(weight, bits, group_size)
    maxq = 2**bits - 1
    w = weight.detach().float().reshape(n, k // g, g)  # (N, G, g)
    scale, zero = _params(w.reshape(-1, g), bits, sym, weight.dtype)
    scale = scale.view(n, k // g)
    zero = zero.view(n, k // g)
    q = _quant(w, scale.unsqueeze(-1), zero.unsqueeze(-1), maxq).reshape(n, k)
    return _result(q, scale.t(), zero.t(), bits, group_size, weight.dtype, None)


# -------------------------------------------------------------------------------------------------- Hessian

class HessianAccumulator:
    """Streams calibration activations into H = 2 X^T X / T (T: tokens seen), accumulated in float64.

    The 1/T normalisation (GPTQ's running mean) does not change the GPTQ solution: damping is relative to
    mean(diag(H)).  Feed it the inputs of one linear layer, e.g. from a forward pre-hook."""

    def __init__(self, in_features: int, device=None):
        self.in_features = in_features
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise InputError(f"calibration input of width {x.shape[-1]} for a layer of width {self.in_features}")
        x = x.detach().reshape(-1, self.in_features).to(device=self._sum.device, dtype=torch.float64)
        self._sum.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        if self.tokens == 0:
            raise InputError("no calibration tokens were collected")
        return (self._sum * (2.0 / self.tokens)).float()


def collect_hessian(inputs: Iterable[torch.Tensor]) -> torch.Tensor:
    """H = 2 X^T X / T (K, K) float32 over all rows of the given (tokens, K) (or (..., K)) activations."""
    acc = None
    for x in inputs:
        if acc is None:
            acc = HessianAccumulator(x.shape[-1], device=x.device)
        acc.add(x)
    if acc is None:
        raise InputError("collect_hessian needs at least one calibration input")
    return acc.hessian


# ----------------------------------------------------------------------------------------------------- GPTQ

def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; damping grows tenfold (up to 4 times)
    if the damped H is still not positive definite."""
    k = h.shape[0]
    mean_diag = torch.diagonal(h).mean().item()
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    d = damp
    for _ in range(5):
        hd = h + (d * mean_diag) * eye
        low, info = torch.linalg.cholesky_ex(hd)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(low)
            up, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0:
                return up
        d = d * 10 if d > 0 else 1e-4
    raise InputError(f"the Hessian is not positive definite even with damping {d / 10:g}; "
                     "collect more calibration tokens")


@torch.no_grad()
def quantize_gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128,
                  sym: bool = False, damp: float = 0.01, act_order: bool = False,
                  block_size: int = 128) -> QuantizedWeight:
    """GPTQ-quantize `weight` (N, K) against `hessian` (K, K) = 2 X^T X of the layer's calibration inputs
    (scale irrelevant; see collect_hessian).  `damp` is the fraction of mean(diag H) added to the diagonal;
    `act_order` processes columns by descending diag(H) (the result then carries `perm`); `block_size` is the
    lazy-update block width (it changes speed, not the result beyond float rounding).

    Works in float32 on the weight's device."""
    n, k, g = _check(weight, bits, group_size)
    if hessian.shape != (k, k):
        raise InputError(f"the Hessian of shape {tuple(hessian.shape)} does not match the input width {k}")
    if block_size <= 0:
        raise InputError(f"block_size must be positive, got {block_size}")
    if not torch.isfinite(hessian).all():
        raise InputError("the Hessian holds inf or nan")
    maxq = 2**bits - 1
    dev = weight.device
    w = weight.detach().to(dev, torch.float32).clone()
    h = hessian.detach().to(dev, torch.float32).clone()
    h = (h + h.t()) / 2

    # inputs that never fired: their column cannot matter, quantize it as 0
    dead = torch.diagonal(h) == 0
    if dead.any():
        h[dead, dead] = 1.0
        w[:, dead] = 0.0

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]

    u = _inverse_cholesky(h, damp)  # (K, K) upper
    del h

    q_all = torch.zeros_like(w)
    n_groups = k // g
    scales = torch.zeros(n_groups, n, dtype=torch.float32, device=dev)
    zeros = torch.zeros(n_groups, n, dtype=torch.float32, device=dev)
    scale = zero = None

    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        w1 = w[:, b0:b1].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % g == 0:
                # the group's current weights: inside this block w1 is up to date; columns past the block
                # still owe this block's pending (lazy) update
                end = col + g
                cur = w1[:, i:min(end, b1) - b0]
                if end > b1:
                    rest = w[:, b1:end] - err1[:, :i] @ u[b0:col, b1:end]
                    cur = torch.cat([cur, rest], dim=1)
                scale, zero = _params(cur, bits, sym, weight.dtype)
                scales[col // g] = scale
                zeros[col // g] = zero
            x = w1[:, i]
            q = _quant(x, scale, zero, maxq)
            q_all[:, col] = q
            deq = (q - zero) * scale
            e = (x - deq) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, b1:] -= err1 @ u[b0:b1, b1:]

    return _result(q_all, scales, zeros, bits, group_size, weight.dtype, perm)
