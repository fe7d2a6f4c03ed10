"""Next-token sampling on the device, without a host sync (reference).

Per-row parameters are tensors, so one captured CUDA graph serves any mix of settings. The order and the
semantics follow transformers' processors: repetition penalty (on every token seen, prompt included: positive
logits divided, negative multiplied), then temperature, top-k (ties with the k-th value kept), top-p (the
smallest set of tokens whose probability reaches top_p, at least one). A row samples by argmax(p / E) with E
~ Exp(1) noise drawn by the caller from its own seeded generator (the exponential-race form of a categorical
draw: no multinomial, no sync); a row with temperature 0 is greedy (argmax of the penalised logits).
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
