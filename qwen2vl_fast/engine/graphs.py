"""Decode steps on CUDA graphs: one graph per batch-size bucket, captured largest first into one shared memory
pool, replayed with static input buffers. Rows a bucket pads with point at spare cache slots (slots no running
sequence holds: the scheduler passes its free ones) with length 1, so the kernels' work on them is harmless and
never read.

The graph holds the decoder and the LM head; sampling runs eagerly after it (it needs fresh noise and
per-request parameters, and costs one small kernel chain).
"""

from __future__ import annotations

import torch

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


class DecodeGraphs:
    def __init__(self, language_model, cache):
        self.lm, self.cache = language_model, cache
        self.buckets = [b for b in BUCKETS if b <= cache.max_batch] or [cache.max_batch]
        if self.buckets[-1] != cache.max_batch:
            self.buckets.append(cache.max_batch)
        dev = cache.k[0].device
        n = cache.max_batch
        self.tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.arange(n, device=dev)
        self._spare = torch.arange(n, device=dev)  # padding rows use slots b..bs-1, unused by a batch of b
        self.lengths = torch.ones(n, dtype=torch.long, device=dev)
        self.graphs, self.outputs, self.pool = {}, {}, None

    def _step(self, bs: int) -> torch.Tensor:
        lm = self.lm
        hidden = lm.decode(lm.embed(self.tokens[:bs]), self.positions[:bs], self.cache, self.slots[:bs],
                           self.lengths[:bs])
        return lm.logits(hidden)

    def capture(self) -> None:
        """Warm up (Triton compiles, caches fill) and capture every bucket, largest first, one shared pool.
        Safe while sequences are running: the warm-up and capture steps write their K/V at the last cache
        position (length max_len), which no running sequence has reached (it writes a position before it
        reads it)."""
        self.tokens.zero_()
        self.positions.zero_()
        self.slots.copy_(self._spare)
        self.lengths.fill_(self.cache.max_len)
        for bs in reversed(self.buckets):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step(bs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the engine thread captures while callers may still move their inputs to the device
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self.outputs[bs] = self._step(bs)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def run(self, tokens, rope_positions, slots, lengths, spare=None) -> torch.Tensor:
        """One decode step for b rows on the smallest bucket >= b; returns logits (b, vocab) (a copy: the next
        replay overwrites the graph's output). spare: slots free of any sequence (a list), at least bucket - b of
        them (default: the slots b.. , right when the batch holds slots 0..b-1)."""
        if not self.graphs:
            self.capture()
        b = tokens.shape[0]
        bs = next(x for x in self.buckets if x >= b)
        self.tokens[:b].copy_(tokens)
        self.positions[:b].copy_(rope_positions)
        self.slots[:b].copy_(slots)
        self.lengths[:b].copy_(lengths)
        if bs > b:  # padding rows: spare slots (not used by this batch), one key, token 0
            self.tokens[b:bs].zero_()
            self.positions[b:bs].zero_()
            self.slots[b:bs].copy_(self._spare[b:bs] if spare is None else
                                   torch.tensor(spare[:bs - b], dtype=torch.long).to(self.slots.device))
            self.lengths[b:bs].fill_(1)
        self.graphs[bs].replay()
        return self.outputs[bs][:b].clone()
