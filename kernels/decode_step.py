"""The decode step's bookkeeping in Triton: one kernel before the model (`decode_rows`) and one or two after it
(`decode_commit`), in place of ~45 small ATen kernels (see qwen2vl_fast/ops/step_state.py for the contract and
the field layout). Both are graph-capturable (no host sync) and bit-identical to the references.

decode_rows: one program holds all the step's rows (bs <= a few hundred) in registers: gathers of the slot
state, the live test, the position / token / M-RoPE id choice, the length advance. Rows are distinct slots, so the
scattered stores never collide.

decode_commit: greedy (no `chosen`) takes two launches. First a grid of (row, vocabulary part): each program
applies the repetition penalty on the fly to the fp32 logits of its part where the seen mask is set, each lane
keeping its best value and the first id reaching it (strict >, in order); the part's result is the smallest id
among the lanes holding its maximum. Then one program per row takes the smallest id among the parts holding the
row's maximum (torch.argmax's first-maximum rule, exactly) and records the row: count, stop test (a short vector of
stop ids), done, last token, the seen bit. With a sampler's `chosen` token only the second launch runs. A row's
logits and seen bytes are read once, by many SMs: a single program per row would stream 152k x (2 + 1) B from one
SM, tens of microseconds. Penalty numerics equal the reference's fp32 `x / p` and `x * p` (correctly rounded).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from qwen2vl_fast.ops.step_state import (DELTA, DONE, GENERATED, INT_FIELDS, LAST, LENGTH, MAX_NEW,
                                         STOP_ON_EOS)

_empty = torch.empty  # output allocation; the tests swap in a poisoned allocator
# Greedy: the vocabulary in parts of _CHUNK ids, one program each (152k ids at batch 1: 38 programs, so the
# logits stream from many SMs at once rather than one), _BLOCK_V ids per loop step (8 per thread at 4 warps).
_CHUNK = 4096
_BLOCK_V = 1024
_PART_WARPS = 4


@triton.jit
def _decode_rows_kernel(INTS, ROWS, ACTIVE, PAD_LEN, TOKENS, ROPE, LENGTHS, LIVE, bs,
                        F: tl.constexpr, C_LAST: tl.constexpr, C_LENGTH: tl.constexpr, C_DELTA: tl.constexpr,
                        C_DONE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    inb = i < bs
    r = tl.load(ROWS + i, mask=inb, other=0).to(tl.int64)
    base = INTS + r * F
    live = (tl.load(ACTIVE + i, mask=inb, other=0) != 0) & (tl.load(base + C_DONE, mask=inb, other=1) == 0)
    length = tl.load(base + C_LENGTH, mask=inb, other=0)
    pad = tl.load(PAD_LEN)
    pos = tl.where(live, length, pad - 1)
    tl.store(TOKENS + i, tl.where(live, tl.load(base + C_LAST, mask=inb, other=0), 0), mask=inb)
    tl.store(ROPE + i, tl.where(live, pos + tl.load(base + C_DELTA, mask=inb, other=0), 0), mask=inb)
    tl.store(LENGTHS + i, pos + 1, mask=inb)
    tl.store(LIVE + i, live, mask=inb)
    tl.store(base + C_LENGTH, length + 1, mask=inb & live)


@triton.jit
def _argmax_part_kernel(LOGITS, logits_stride, PENALTY, SEEN, seen_stride, ROWS, PART_V, PART_I,
                        V: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr, NUM_PARTS: tl.constexpr):
    """Program (row i, part c): the best penalised logit of vocabulary ids [c * CHUNK, (c + 1) * CHUNK) and the
    first id reaching it."""
    i = tl.program_id(0)
    c = tl.program_id(1)
    r = tl.load(ROWS + i).to(tl.int64)
    p = tl.load(PENALTY + r)
    lanes = tl.arange(0, BLOCK_V)
    best = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    index = tl.zeros((BLOCK_V,), tl.int32)
    row = LOGITS + i.to(tl.int64) * logits_stride
    seen_row = SEEN + r * seen_stride
    for start in range(0, CHUNK, BLOCK_V):
        v = c * CHUNK + start + lanes
        m = v < V
        x = tl.load(row + v, mask=m, other=float("-inf")).to(tl.float32)
        s = tl.load(seen_row + v, mask=m, other=0) != 0
        x = tl.where(s, tl.where(x > 0, x / p, x * p), x)
        better = x > best  # strict: an earlier id keeps a tie within its lane
        best = tl.where(better, x, best)
        index = tl.where(better, v, index)
    top = tl.max(best, axis=0)
    tl.store(PART_V + i * NUM_PARTS + c, top)
    tl.store(PART_I + i * NUM_PARTS + c, tl.min(tl.where(best == top, index, V), axis=0))


@triton.jit
def _decode_commit_kernel(PART_V, PART_I, CHOSEN, INTS, SEEN, seen_stride, STOP, n_stop, ROWS, LIVE, OUT,
                          F: tl.constexpr, C_LAST: tl.constexpr, C_GENERATED: tl.constexpr,
                          C_MAX_NEW: tl.constexpr, C_STOP_ON_EOS: tl.constexpr, C_DONE: tl.constexpr,
                          GREEDY: tl.constexpr, NUM_PARTS: tl.constexpr, PARTS_POW2: tl.constexpr,
                          BLOCK_S: tl.constexpr):
    i = tl.program_id(0)
    r = tl.load(ROWS + i).to(tl.int64)
    live = tl.load(LIVE + i) != 0
    if GREEDY:  # the parts' maxima, then the smallest id among the parts holding the top value
        c = tl.arange(0, PARTS_POW2)
        vals = tl.load(PART_V + i * NUM_PARTS + c, mask=c < NUM_PARTS, other=float("-inf"))
        ids = tl.load(PART_I + i * NUM_PARTS + c, mask=c < NUM_PARTS, other=2147483647)
        top = tl.max(vals, axis=0)
        nxt = tl.min(tl.where(vals == top, ids, 2147483647), axis=0).to(tl.int64)
    else:
        nxt = tl.load(CHOSEN + i)
    base = INTS + r * F
    count = tl.load(base + C_GENERATED) + live.to(tl.int64)
    j = tl.arange(0, BLOCK_S)
    stops = tl.load(STOP + j, mask=j < n_stop, other=-1)
    eos = (tl.sum((stops == nxt).to(tl.int32), axis=0) > 0) & (tl.load(base + C_STOP_ON_EOS) != 0)
    done = (tl.load(base + C_DONE) != 0) | (live & (eos | (count >= tl.load(base + C_MAX_NEW))))
    tl.store(base + C_DONE, done.to(tl.int64))
    tl.store(base + C_LAST, nxt, mask=live)
    tl.store(base + C_GENERATED, count)
    tl.store(SEEN + r * seen_stride + nxt, live, mask=live)
    tl.store(OUT + i, nxt)


def _check_state(ints: torch.Tensor, rows: torch.Tensor, name: str) -> None:
    if ints.dim() != 2 or ints.shape[1] != INT_FIELDS or ints.dtype != torch.int64 or not ints.is_contiguous():
        raise ValueError(f"{name}: ints must be a contiguous (max_batch, {INT_FIELDS}) int64 tensor, got "
                         f"{tuple(ints.shape)} {ints.dtype}")
    if rows.dim() != 1 or rows.dtype != torch.int64:
        raise ValueError(f"{name}: rows must be a 1-D int64 tensor, got {tuple(rows.shape)} {rows.dtype}")


def decode_rows(ints: torch.Tensor, rows: torch.Tensor, active: torch.Tensor, pad_len: torch.Tensor):
    """ops.step_state.decode_rows in one launch: (tokens, rope, lengths, live), ints' lengths advanced."""
    _check_state(ints, rows, "decode_rows")
    bs, dev = rows.shape[0], rows.device
    tokens, rope, lengths = (_empty(bs, dtype=torch.int64, device=dev) for _ in range(3))
    live = _empty(bs, dtype=torch.bool, device=dev)
    if bs:
        _decode_rows_kernel[(1,)](ints, rows, active, pad_len, tokens, rope, lengths, live, bs,
                                  F=INT_FIELDS, C_LAST=LAST, C_LENGTH=LENGTH, C_DELTA=DELTA, C_DONE=DONE,
                                  BLOCK=max(16, triton.next_power_of_2(bs)), num_warps=1)
    return tokens, rope, lengths, live


def decode_commit(logits: torch.Tensor, chosen: Optional[torch.Tensor], ints: torch.Tensor, penalty: torch.Tensor,
                  seen: torch.Tensor, stop_ids: torch.Tensor, rows: torch.Tensor, live: torch.Tensor,
                  out: torch.Tensor) -> torch.Tensor:
    """ops.step_state.decode_commit: greedy in two launches (vocabulary parts, then a program per row), a given
    token in one."""
    _check_state(ints, rows, "decode_commit")
    bs = rows.shape[0]
    if logits.dim() != 2 or logits.shape[0] != bs or logits.stride(-1) != 1:
        raise ValueError(f"decode_commit: logits must be (rows, vocab) with unit column stride, got "
                         f"{tuple(logits.shape)} for {bs} rows")
    if seen.dtype != torch.bool or seen.shape[1] != logits.shape[1] or seen.stride(-1) != 1:
        raise ValueError(f"decode_commit: seen must be a (max_batch, {logits.shape[1]}) bool tensor")
    if not bs:
        return out
    n_stop, vocab = stop_ids.numel(), logits.shape[1]
    parts = triton.cdiv(vocab, _CHUNK)
    part_v = part_i = out  # not read on the given-token path
    if chosen is None:
        part_v = _empty((bs, parts), dtype=torch.float32, device=logits.device)
        part_i = _empty((bs, parts), dtype=torch.int32, device=logits.device)
        _argmax_part_kernel[(bs, parts)](logits, logits.stride(0), penalty, seen, seen.stride(0), rows, part_v,
                                         part_i, V=vocab, CHUNK=_CHUNK, BLOCK_V=_BLOCK_V, NUM_PARTS=parts,
                                         num_warps=_PART_WARPS)
    _decode_commit_kernel[(bs,)](
        part_v, part_i, chosen if chosen is not None else out, ints, seen, seen.stride(0),
        stop_ids if n_stop else out, n_stop, rows, live, out,
        F=INT_FIELDS, C_LAST=LAST, C_GENERATED=GENERATED, C_MAX_NEW=MAX_NEW, C_STOP_ON_EOS=STOP_ON_EOS,
        C_DONE=DONE, GREEDY=chosen is None, NUM_PARTS=parts, PARTS_POW2=max(2, triton.next_power_of_2(parts)),
        BLOCK_S=max(2, triton.next_power_of_2(max(n_stop, 1))), num_warps=1)
    return out
