"""Next-token sampling on the device, without a host sync (reference).

Per-row parameters are tensors, so one captured CUDA graph serves any mix of settings. The order and the
semantics follow transformers' processors: repetition penalty (on every token seen, prompt included: positive
logits divided, negative multiplied), then temperature, top-k (ties with the k-th value kept), top-p (the
smallest set of tokens whose probability reaches top_p, at least one). A row samples by argmax(p / E) with E
~ Exp(1) noise (the exponential-race form of a categorical draw: no multinomial, no sync); a row with
temperature 0 is greedy (argmax of the penalised logits).

The engine's noise is counter-based (`counter_noise`): a pure function of (the request's seed, the index of the
token being drawn, the vocabulary id), computed with integer hashing on the device. No generator state lives on
the host, so the whole draw runs inside the captured decode graph, and a seeded request draws the same noise for
its k-th token whatever batch it shares and whichever step carries it.
"""

from __future__ import annotations

import torch

from .registry import reference


@reference("sample")
def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           repetition_penalty: torch.Tensor, seen: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """logits (B, V); temperature, top_p, repetition_penalty (B,) float; top_k (B,) int (0 = off);
    seen (B, V) bool; noise (B, V) Exp(1) samples -> next tokens (B,) int64."""
    x = penalize(logits, repetition_penalty, seen)
    greedy = x.argmax(dim=-1)
    t = temperature.float().view(-1, 1)
    x = x / torch.where(t > 0, t, torch.ones_like(t))
    vocab = x.shape[-1]
    ordered, order = x.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab)).long()
    kth = ordered.gather(-1, (k - 1).view(-1, 1))
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass of the tokens ranked above
    drop = before >= top_p.float().view(-1, 1)
    drop[:, 0] = False
    ordered = ordered.masked_fill(drop, float("-inf"))
    probs = ordered.softmax(dim=-1)
    noise_sorted = noise.float().gather(-1, order)
    pick = order.gather(-1, (probs / noise_sorted).argmax(dim=-1, keepdim=True)).squeeze(-1)
    return torch.where(temperature > 0, pick, greedy)


def penalize(logits: torch.Tensor, repetition_penalty: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """transformers' repetition penalty on the tokens already seen, in fp32."""
    x = logits.float()
    penalty = repetition_penalty.float().view(-1, 1)
    return torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)


def greedy(logits: torch.Tensor, repetition_penalty: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """The greedy rows of `sample` without its vocabulary sort: argmax of the penalised logits."""
    return penalize(logits, repetition_penalty, seen).argmax(dim=-1)


# 32-bit mixing with multipliers below 2^31: a product of a 32-bit value and one of them stays below 2^63, so
# the int64 arithmetic never overflows and the low 32 bits are the same on every device (CPU or CUDA).
_MASK32 = 0xFFFFFFFF
_MUL_A, _MUL_B = 0x7FEB352D, 0x5BD1E995
_GOLDEN = 0x9E3779B1  # spreads consecutive vocabulary ids over the 32-bit range before mixing
_SEED_BITS = 31


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche (xor-shift, multiply, twice) on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & _MASK32
    return x ^ (x >> 16)


def split_seed(seed: int) -> tuple[int, int]:
    """A request seed (any int) -> the two 31-bit halves `counter_noise` takes (the low 62 bits count)."""
    seed &= (1 << (2 * _SEED_BITS)) - 1
    return seed >> _SEED_BITS, seed & ((1 << _SEED_BITS) - 1)


def counter_noise(seed_hi: torch.Tensor, seed_lo: torch.Tensor, counter: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise (B, vocab) fp32 for rows with seeds (seed_hi, seed_lo) (B,) int64 (31 bits each, see
    split_seed) drawing their token number `counter` (B,) int64: element [b, v] is a function of (seed, counter,
    v) only. A row key is mixed from the seed and the counter, each vocabulary id is mixed with it twice, and
    the top 24 bits give a uniform u in (0, 1) (never 0 or 1), so -log(u) is finite and > 0."""
    key = _mix32(_mix32(seed_lo & _MASK32) ^ _mix32(seed_hi & _MASK32))
    key = _mix32(key ^ ((counter & _MASK32) * _MUL_B & _MASK32))
    ids = (torch.arange(vocab, device=counter.device, dtype=torch.int64) * _GOLDEN) & _MASK32
    bits = _mix32(_mix32(key.view(-1, 1) ^ ids) ^ key.view(-1, 1))
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))
    return -torch.log(uniform)
