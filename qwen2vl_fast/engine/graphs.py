"""Decode steps on CUDA graphs: the whole step of `DecodeState.step` (decoder, LM head, sampling and every state
update) captured once per (batch-size bucket, greedy or sampling), largest bucket first, into one shared memory
pool. A replay reads its inputs from the state's device buffers and writes the tokens into `DecodeState.out`
(allocated outside the pool), so the host's part of a step is the replay and one copy of the tokens out.

`EagerSteps` is the same interface without graphs (CPU, or cuda_graphs=False): it runs the step directly, so both
run the same code.
"""

from __future__ import annotations

import torch

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


def buckets_for(max_batch: int) -> list:
    out = [b for b in BUCKETS if b <= max_batch] or [max_batch]
    if out[-1] != max_batch:
        out.append(max_batch)
    return out


class EagerSteps:
    """Steps run as they are (no capture): the reference for the graphs, and the CPU engine's path."""

    def __init__(self, state):
        self.state = state
        self.buckets = buckets_for(state.cache.max_batch)
        self.graphs: dict = {}

    def replay(self, bs: int, sampling: bool) -> torch.Tensor:
        return self.state.step(bs, sampling)


class DecodeGraphs(EagerSteps):
    def capture(self, sampling: bool) -> None:
        """Warm up (Triton compiles, measured dispatch, caches fill) and capture every bucket of one kind.
        Safe while sequences are running: warm-up and capture run with every row inactive, which writes K/V
        only at the last cache position (never reached by a running sequence, which writes a position before
        it reads it) and changes no sequence's state."""
        state = self.state
        saved = state.warming()
        try:
            pool = next(iter(self.graphs.values())).pool() if self.graphs else None
            for bs in reversed(self.buckets):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    state.step(bs, sampling)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: the engine thread captures while callers may still move their inputs to the device
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    state.step(bs, sampling)
                pool = graph.pool() if pool is None else pool
                self.graphs[(bs, sampling)] = graph
        finally:
            state.restore(saved)
        torch.cuda.synchronize()

    def replay(self, bs: int, sampling: bool) -> torch.Tensor:
        graph = self.graphs.get((bs, sampling))
        if graph is None:
            self.capture(sampling)
            graph = self.graphs[(bs, sampling)]
        graph.replay()
        return self.state.out_views[bs]
