"""The decode step's bookkeeping ops (references): what the engine's device-resident step does around the model
(engine/decode_state.py). Without them a step adds ~45 tiny ATen kernels (gathers, wheres, index_puts) to the
graph; each is one op here, one or two kernels in Triton (kernels/decode_step.py).

Per-slot state: `ints` (max_batch, INT_FIELDS) int64, one column per field below; `penalty` (max_batch,) fp32;
`seen` (max_batch, vocab) bool. A step's rows are `rows` (bs,) slots with `active` (bs,) bool flags.
"""

from __future__ import annotations

import torch

from .registry import implementation, reference, triton_auto_on, triton_runs_on
from .sampling import greedy

# columns of `ints`
LAST, LENGTH, DELTA, GENERATED, MAX_NEW, STOP_ON_EOS, DONE, TOP_K, SEED_HI, SEED_LO = range(10)
INT_FIELDS = 10


@reference("decode_rows")
def decode_rows(ints: torch.Tensor, rows: torch.Tensor, active: torch.Tensor, pad_len: torch.Tensor):
    """The step's inputs for rows (bs,): a row is live when active and its slot not done. Live rows feed their
    last token at cache position length (M-RoPE id position + delta); the others feed token 0 at position
    pad_len - 1 (pad_len (1,) int64), id 0. Advances the live rows' length by one (mutates ints). Returns
    tokens, rope ids, lengths after the write (position + 1), all (bs,) int64, and live (bs,) bool."""
    live = active & (ints[rows, DONE] == 0)
    length = ints[rows, LENGTH]
    pos = torch.where(live, length, pad_len - 1)
    tokens = torch.where(live, ints[rows, LAST], 0)
    rope = torch.where(live, pos + ints[rows, DELTA], 0)
    ints[rows, LENGTH] = length + live.long()
    return tokens, rope, pos + 1, live


@reference("decode_commit")
def decode_commit(logits: torch.Tensor, chosen, ints: torch.Tensor, penalty: torch.Tensor, seen: torch.Tensor,
                  stop_ids: torch.Tensor, rows: torch.Tensor, live: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Pick and record the next token of rows (bs,). chosen None: greedy, the argmax (first on ties) of the
    repetition-penalised logits (bs, vocab); else chosen (bs,) int64 (a sampler's draw). Live rows then record
    it: last token, one more generated, done when it is in stop_ids (and the row stops on them) or the budget
    is reached, seen. Writes the tokens into out (bs,) int64 and returns it; dead rows' state is unchanged."""
    nxt = greedy(logits, penalty[rows], seen[rows]) if chosen is None else chosen
    count = ints[rows, GENERATED] + live.long()
    eos = (nxt.view(-1, 1) == stop_ids).any(-1) & (ints[rows, STOP_ON_EOS] != 0)
    ints[rows, DONE] = ((ints[rows, DONE] != 0) | (live & (eos | (count >= ints[rows, MAX_NEW])))).long()
    ints[rows, LAST] = torch.where(live, nxt, ints[rows, LAST])
    ints[rows, GENERATED] = count
    seen[rows, nxt] = seen[rows, nxt] | live
    out.copy_(nxt)
    return out


# ---------------------------------------------------------------------------------- Triton (kernels/decode_step.py)

@implementation("decode_rows", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def decode_rows_triton(ints, rows, active, pad_len):
    from qwen2vl_fast.kernels.decode_step import decode_rows as _k

    return _k(ints, rows, active, pad_len)


@implementation("decode_commit", "triton", runs_on=triton_runs_on, auto_on=triton_auto_on)
def decode_commit_triton(logits, chosen, ints, penalty, seen, stop_ids, rows, live, out):
    from qwen2vl_fast.kernels.decode_step import decode_commit as _k

    return _k(logits, chosen, ints, penalty, seen, stop_ids, rows, live, out)
