"""The decode step as one device-resident program: everything a step needs and changes lives on the device, per
KV-cache slot, so the step (decoder, LM head, sampling, the seen-token update, position / length / count updates
and the stop test) is one captured CUDA graph whose host side is a replay and a copy of the tokens out.

Per slot: the last token, the tokens in the cache, the M-RoPE delta, tokens generated, the token budget, whether
an end-of-sequence token stops it, the sampling parameters (temperature, top-k, top-p, repetition penalty), the
seed, the `done` flag and the seen-token mask. A step runs the rows `rows[:bs]` (slots; a batch-size bucket);
`active[:bs]` says which rows are sequences (the others pad the bucket on free slots). A row that is inactive or
already done does nothing visible: its token is fed as 0, its K/V go to position `pad_len - 1` of its own slot
(0 in a step; the last cache position during warm-up and capture, which no running sequence has reached), its
attention reads that one key, and none of its state changes. That is what lets the host launch step n+1 before it
has read step n's tokens: a sequence that stopped at step n is done on the device, so step n+1 computes nothing
for it, and the host drops the token it reads for it.

Sampling noise is counter-based (ops/sampling.py `counter_noise`): a function of the slot's seed and the index of
the token drawn, so a seeded request draws the same tokens alone or in any batch, on graphs or eagerly.
"""

from __future__ import annotations

import torch

from ..ops.sampling import counter_noise, greedy, split_seed


class DecodeState:
    def __init__(self, language_model, cache, stop_token_ids, sample):
        self.lm, self.cache, self.sample = language_model, cache, sample
        n, dev = cache.max_batch, cache.k[0].device
        self.device = dev
        z = lambda dtype: torch.zeros(n, dtype=dtype, device=dev)  # noqa: E731
        self.last, self.length, self.delta = z(torch.long), z(torch.long), z(torch.long)
        self.generated, self.max_new = z(torch.long), z(torch.long)
        self.stop_on_eos = z(torch.bool)
        self.done = torch.ones(n, dtype=torch.bool, device=dev)  # a free slot is done
        self.temperature, self.top_p, self.penalty = z(torch.float32), z(torch.float32), z(torch.float32)
        self.top_k, self.seed_hi, self.seed_lo = z(torch.long), z(torch.long), z(torch.long)
        self.stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=dev)
        self.seen = None  # (max_batch, vocab) bool, made at the first admission (the vocabulary comes from logits)
        # The step's inputs: rows and active flags (one upload when the batch changes), the padding length.
        self.rows = torch.arange(n, device=dev)
        self.active = z(torch.bool)
        self.pad_len = torch.ones(1, dtype=torch.long, device=dev)
        self.out = z(torch.long)  # the step's tokens, rows [:bs]
        self.out_views = {bs: self.out[:bs] for bs in range(1, n + 1)}  # made once: a step slices nothing

    # -- host side: admission and batch changes (not per step) ---------------------------------------------
    def admit(self, slots, lengths, deltas, params, seeds, prompt_ids, logits) -> torch.Tensor:
        """Set the state of new sequences in `slots` (their prompts are in the cache: `lengths` tokens each) and
        draw their first tokens from the prefill `logits` (b, vocab). prompt_ids (b, L): the processed prompts,
        padding included (they count as seen, as in transformers). Returns the first tokens (b,) on the device."""
        dev, b = self.device, len(slots)
        if self.seen is None:
            self.seen = torch.zeros(self.cache.max_batch, logits.shape[-1], dtype=torch.bool, device=dev)
        halves = [split_seed(s) for s in seeds]
        host = torch.tensor([[n, d, 0, params.max_new_tokens, int(not params.ignore_eos), params.top_k, hi, lo]
                             for n, d, (hi, lo) in zip(lengths, deltas, halves)], dtype=torch.long)
        floats = torch.tensor([[params.temperature, params.top_p, params.repetition_penalty]] * b,
                              dtype=torch.float32)
        r = torch.tensor(slots, dtype=torch.long).to(dev)
        host, floats = host.to(dev), floats.to(dev)
        for buf, col in zip((self.length, self.delta, self.generated, self.max_new), host.unbind(1)[:4]):
            buf[r] = col
        self.stop_on_eos[r] = host[:, 4].bool()
        self.top_k[r], self.seed_hi[r], self.seed_lo[r] = host[:, 5], host[:, 6], host[:, 7]
        self.temperature[r], self.top_p[r], self.penalty[r] = floats.unbind(1)
        self.done[r] = False
        rows = torch.zeros(b, self.seen.shape[1], dtype=torch.bool, device=dev)
        rows.scatter_(1, prompt_ids.to(dev), True)
        self.seen[r] = rows
        return self.pick(logits, r, torch.ones(b, dtype=torch.bool, device=dev), params.temperature > 0)

    def set_rows(self, rows: list, active: int) -> None:
        """The next steps' batch: rows (slots, a bucket's worth) of which the first `active` are sequences. One
        non-blocking copy from pinned memory (the caching host allocator keeps the buffer until it is done)."""
        host = torch.tensor([rows, [1] * active + [0] * (len(rows) - active)], dtype=torch.long)
        if self.device.type == "cuda":
            host = host.pin_memory()
        dev = host.to(self.device, non_blocking=True)
        self.rows[:len(rows)].copy_(dev[0])
        self.active[:len(rows)].copy_(dev[1].bool())

    def warming(self) -> torch.Tensor:
        """Warm-up / capture mode: every row inactive, padding K/V at the last cache position. Returns the
        previous active flags (pass them back to `restore`)."""
        saved = self.active.clone()
        self.active.zero_()
        self.pad_len.fill_(self.cache.max_len)
        return saved

    def restore(self, saved: torch.Tensor) -> None:
        self.active.copy_(saved)
        self.pad_len.fill_(1)

    # -- device side: the step (captured) -------------------------------------------------------------------
    def step(self, bs: int, sampling: bool) -> torch.Tensor:
        """One decode step of rows [:bs]; returns the tokens (bs,) (a view of `out`). No host sync."""
        lm = self.lm
        r = self.rows[:bs]
        act = self.active[:bs] & ~self.done[r]
        pos = torch.where(act, self.length[r], self.pad_len - 1)  # where this step's K/V go
        tokens = torch.where(act, self.last[r], 0)
        rope = torch.where(act, pos + self.delta[r], 0)
        logits = lm.logits(lm.decode(lm.embed(tokens), rope, self.cache, r, pos + 1))
        self.length[r] = self.length[r] + act.long()
        out = self.out_views[bs]
        out.copy_(self.pick(logits, r, act, sampling))
        return out

    def pick(self, logits: torch.Tensor, r: torch.Tensor, act: torch.Tensor, sampling: bool) -> torch.Tensor:
        """Draw the next token of rows r from logits and update their state where `act`: last token, count,
        done (an end-of-sequence token when it stops the row, or the token budget reached), seen."""
        penalty, seen = self.penalty[r], self.seen[r]
        if sampling:  # greedy rows of a sampling batch are still greedy (temperature 0 inside `sample`)
            noise = counter_noise(self.seed_hi[r], self.seed_lo[r], self.generated[r], logits.shape[-1])
            nxt = self.sample(logits, self.temperature[r], self.top_k[r], self.top_p[r], penalty, seen, noise)
        else:  # no noise, no vocabulary sort
            nxt = greedy(logits, penalty, seen)
        count = self.generated[r] + act.long()
        eos = (nxt.view(-1, 1) == self.stop_ids).any(-1) & self.stop_on_eos[r]
        self.done[r] = self.done[r] | (act & (eos | (count >= self.max_new[r])))
        self.last[r] = torch.where(act, nxt, self.last[r])
        self.generated[r] = count
        self.seen[r, nxt] = self.seen[r, nxt] | act
        return nxt
