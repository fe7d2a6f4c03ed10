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

from ..ops import step_state as F
from ..ops.sampling import counter_noise, split_seed


class DecodeState:
    def __init__(self, language_model, cache, stop_token_ids, ops):
        self.lm, self.cache, self.ops = language_model, cache, ops
        n, dev = cache.max_batch, cache.k[0].device
        self.device = dev
        # ints: one row per slot, one column per field of ops/step_state.py; a free slot is done
        self.ints = torch.zeros(n, F.INT_FIELDS, dtype=torch.long, device=dev)
        self.ints[:, F.DONE] = 1
        self.temperature, self.top_p, self.penalty = (torch.zeros(n, dtype=torch.float32, device=dev)
                                                      for _ in range(3))
        self.stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=dev)
        self.seen = None  # (max_batch, vocab) bool, made at the first admission (the vocabulary comes from logits)
        # The step's inputs: rows and active flags (one upload when the batch changes), the padding length.
        self.rows = torch.arange(n, device=dev)
        self.active = torch.zeros(n, dtype=torch.bool, device=dev)
        self.pad_len = torch.ones(1, dtype=torch.long, device=dev)
        self.out = torch.zeros(n, dtype=torch.long, device=dev)  # the step's tokens, rows [:bs]
        self.out_views = {bs: self.out[:bs] for bs in range(1, n + 1)}  # made once: a step slices nothing
        self.row_views = {bs: (self.rows[:bs], self.active[:bs]) for bs in range(1, n + 1)}

    def field(self, column: int) -> torch.Tensor:
        """One field of every slot (a view of `ints`), e.g. field(F.GENERATED)."""
        return self.ints[:, column]

    # -- host side: admission and batch changes (not per step) ---------------------------------------------
    def admit(self, slots, lengths, deltas, params, seeds, prompt_ids, logits) -> torch.Tensor:
        """Set the state of new sequences in `slots` (their prompts are in the cache: `lengths` tokens each) and
        draw their first tokens from the prefill `logits` (b, vocab). prompt_ids (b, L): the processed prompts,
        padding included (they count as seen, as in transformers). Returns the first tokens (b,) on the device."""
        dev, b = self.device, len(slots)
        if self.seen is None:
            self.seen = torch.zeros(self.cache.max_batch, logits.shape[-1], dtype=torch.bool, device=dev)
        host = torch.zeros(b, F.INT_FIELDS, dtype=torch.long)
        for i, (n, d, seed) in enumerate(zip(lengths, deltas, seeds)):
            host[i, F.LENGTH], host[i, F.DELTA] = n, d
            host[i, F.SEED_HI], host[i, F.SEED_LO] = split_seed(seed)
        host[:, F.MAX_NEW], host[:, F.STOP_ON_EOS] = params.max_new_tokens, int(not params.ignore_eos)
        host[:, F.TOP_K] = params.top_k
        floats = torch.tensor([[params.temperature, params.top_p, params.repetition_penalty]] * b,
                              dtype=torch.float32)
        r = torch.tensor(slots, dtype=torch.long).to(dev)
        self.ints[r] = host.to(dev)
        self.temperature[r], self.top_p[r], self.penalty[r] = floats.to(dev).unbind(1)
        rows = torch.zeros(b, self.seen.shape[1], dtype=torch.bool, device=dev)
        rows.scatter_(1, prompt_ids.to(dev), True)
        self.seen[r] = rows
        out = torch.empty(b, dtype=torch.long, device=dev)
        return self.pick(logits, r, torch.ones(b, dtype=torch.bool, device=dev), params.temperature > 0, out)

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
        r, active = self.row_views[bs]
        tokens, rope, lengths, live = self.ops.decode_rows(self.ints, r, active, self.pad_len)
        logits = lm.logits(lm.decode(lm.embed(tokens), rope, self.cache, r, lengths))
        return self.pick(logits, r, live, sampling, self.out_views[bs])

    def pick(self, logits: torch.Tensor, r: torch.Tensor, live: torch.Tensor, sampling: bool,
             out: torch.Tensor) -> torch.Tensor:
        """Draw the next token of rows r into `out` and record it where `live` (ops/step_state.py)."""
        chosen = None  # greedy: the commit takes the penalised argmax itself (no noise, no vocabulary sort)
        if sampling:  # greedy rows of a sampling batch are still greedy (temperature 0 inside `sample`)
            ints = self.ints[r]
            noise = counter_noise(ints[:, F.SEED_HI], ints[:, F.SEED_LO], ints[:, F.GENERATED], logits.shape[-1])
            chosen = self.ops.sample(logits, self.temperature[r], ints[:, F.TOP_K], self.top_p[r], self.penalty[r],
                                     self.seen[r], noise)
        return self.ops.decode_commit(logits, chosen, self.ints, self.penalty, self.seen, self.stop_ids, r, live,
                                      out)
