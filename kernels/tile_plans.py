"""Per-batch metadata shared by the packed-sequence attention kernels (ViT varlen, LLM prefill), and the ticket
counters of the in-launch reductions (split-K GEMV, decode attention, the CUDA quantized decode GEMM).

A batch's tile tables are built on the host from the host lengths, once per BLOCK_M, and copied to the
device from pinned memory without a sync; a plan is memoised on its VarlenMeta's identity for as long as the
meta lives, so every layer of a forward reuses it.
"""

from __future__ import annotations

import weakref

import torch


class TileTables:
    """Callable: tables(block_m) -> int32 (num_tiles, width) on the device, memoised per BLOCK_M.
    `build(lengths, block_m)` returns the flat host list of the table's rows."""

    def __init__(self, lengths: tuple, device: torch.device, build, width: int):
        self.lengths, self.device, self.build, self.width = lengths, device, build, width
        self._tables: dict = {}
        self._pinned: dict = {}  # host sources of in-flight non-blocking copies, kept alive

    def __call__(self, block_m: int) -> torch.Tensor:
        t = self._tables.get(block_m)
        if t is None:
            host = torch.tensor(self.build(self.lengths, block_m), dtype=torch.int32).reshape(-1, self.width)
            if self.device.type == "cuda":
                host = host.pin_memory()
                self._pinned[block_m] = host
            t = host.to(self.device, non_blocking=True)
            self._tables[block_m] = t
        return t


def memoized_plan(store: dict, meta, device, make):
    """store[(id(meta), device)], made by make(lengths, device) on first use and dropped when meta dies."""
    device = torch.device(device) if device is not None else meta.cu_seqlens.device
    key = (id(meta), device)
    plan = store.get(key)
    if plan is None:
        plan = make(tuple(int(n) for n in meta.lengths), device)
        store[key] = plan
        weakref.finalize(meta, store.pop, key, None)
    return plan


def ticket_counters(store: dict, device: torch.device, n: int, minimum: int, owner: str) -> torch.Tensor:
    """A device's int32 ticket counters for in-launch reductions (the last program of a group to take a ticket
    reduces it, and resets its counter), cached in `store` per device: every launch leaves them zeroed, so the next
    launch and every CUDA-graph replay find them as they need them. At least `minimum`, grown (outside a graph
    capture only: a capture cannot allocate what its replays then read) when a launch needs `n`. Kernels of one
    stream run in order; two streams must not run the owner's kernels at once on one device."""
    buf = store.get(device)
    if buf is None or buf.numel() < n:
        if buf is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{owner}: {n} ticket counters needed during CUDA-graph capture, {buf.numel()} "
                               f"allocated: run the shape once before capturing")
        buf = torch.zeros(max(n, minimum), dtype=torch.int32, device=device)
        store[device] = buf
    return buf
