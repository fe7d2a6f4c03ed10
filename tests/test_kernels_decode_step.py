"""kernels/decode_step.py (the decode step's bookkeeping: `decode_rows` before the model, `decode_commit` after it)
against the references in ops/step_state.py, under the Triton interpreter or on a GPU. Both must be bit-identical
(they pick tokens and write state): fresh random state every case, live and dead rows (inactive, or done), odd and
real vocabulary sizes, ties, penalties above and below 1 on positive and negative logits, no stop ids, a given
token (the sampling path), rows in any slot order, outputs poisoned."""

from __future__ import annotations

import pytest
import torch
from conftest import TEST_DEVICE

from qwen2vl_fast.ops import step_state as F
from qwen2vl_fast.ops.registry import get_op

ds = pytest.importorskip("qwen2vl_fast.kernels.decode_step")
DEV = torch.device(TEST_DEVICE)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch, triton_device):
    def poisoned(shape, dtype=None, device=None):
        size = (shape,) if isinstance(shape, int) else shape
        return torch.full(size, True if dtype == torch.bool else -7, dtype=dtype, device=device)

    monkeypatch.setattr(ds, "_empty", poisoned)


def random_state(n: int, vocab: int, gen: torch.Generator):
    ints = torch.zeros(n, F.INT_FIELDS, dtype=torch.long)
    ints[:, F.LAST] = torch.randint(0, vocab, (n,), generator=gen)
    ints[:, F.LENGTH] = torch.randint(1, 500, (n,), generator=gen)
    ints[:, F.DELTA] = torch.randint(-40, 40, (n,), generator=gen)
    ints[:, F.GENERATED] = torch.randint(0, 20, (n,), generator=gen)
    ints[:, F.MAX_NEW] = ints[:, F.GENERATED] + torch.randint(0, 3, (n,), generator=gen)  # some reach it now
    ints[:, F.STOP_ON_EOS] = torch.randint(0, 2, (n,), generator=gen)
    ints[:, F.DONE] = (torch.rand(n, generator=gen) < 0.25).long()
    seen = torch.rand(n, vocab, generator=gen) < 0.05
    penalty = torch.where(torch.rand(n, generator=gen) < 0.5, 1.3, 0.7).float()
    return ints.to(DEV), seen.to(DEV), penalty.to(DEV)


def pick_rows(n: int, bs: int, gen: torch.Generator):
    rows = torch.randperm(n, generator=gen)[:bs]
    active = torch.rand(bs, generator=gen) < 0.8
    return rows.to(DEV), active.to(DEV)


@pytest.mark.parametrize("n, bs", [(1, 1), (4, 3), (8, 8), (37, 19), (128, 128)])
@pytest.mark.parametrize("pad", [1, 64])
def test_decode_rows_equals_the_reference(n, bs, pad):
    gen = torch.Generator().manual_seed(n * 100 + bs + pad)
    ints, _, _ = random_state(n, 1000, gen)
    rows, active = pick_rows(n, bs, gen)
    pad_len = torch.tensor([pad], device=DEV)
    ours_ints, ref_ints = ints.clone(), ints.clone()
    got = ds.decode_rows(ours_ints, rows, active, pad_len)
    want = get_op("decode_rows").reference(ref_ints, rows, active, pad_len)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
    assert torch.equal(ours_ints, ref_ints)


def _commit_case(n, bs, vocab, dtype, seed, stops=(5, 7, 11)):
    gen = torch.Generator().manual_seed(seed)
    ints, seen, penalty = random_state(n, vocab, gen)
    rows, live = pick_rows(n, bs, gen)
    live &= ints[rows, F.DONE] == 0
    logits = (torch.randn(bs, vocab, generator=gen) * 3).to(dtype).to(DEV)
    stop_ids = torch.tensor(stops, dtype=torch.long, device=DEV)
    return ints, seen, penalty, rows, live, logits, stop_ids


def _run_both(logits, chosen, ints, penalty, seen, stop_ids, rows, live):
    bs = rows.shape[0]
    a = (ints.clone(), seen.clone(), torch.full((bs,), -7, dtype=torch.long, device=DEV))
    b = (ints.clone(), seen.clone(), torch.full((bs,), -7, dtype=torch.long, device=DEV))
    got = ds.decode_commit(logits, chosen, a[0], penalty, a[1], stop_ids, rows, live, a[2])
    want = get_op("decode_commit").reference(logits, chosen, b[0], penalty, b[1], stop_ids, rows, live, b[2])
    assert got is a[2] and torch.equal(got, want)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    return got, a


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n, bs, vocab", [(1, 1, 5), (4, 3, 1000), (9, 7, 1025), (16, 16, 4097), (3, 2, 151936)])
def test_greedy_commit_equals_the_reference(n, bs, vocab, dtype):
    case = _commit_case(n, bs, vocab, dtype, seed=vocab + bs)
    ints, seen, penalty, rows, live, logits, stop_ids = case
    _run_both(logits, None, ints, penalty, seen, stop_ids, rows, live)


def test_greedy_commit_takes_the_first_of_tied_maxima_and_stops_on_a_stop_id():
    vocab = 3000
    ints, seen, penalty, rows, live, logits, stop_ids = _commit_case(4, 4, vocab, torch.float32, seed=3)
    seen.zero_()
    logits.fill_(-1.0)
    live.fill_(True)
    ints[:, F.DONE] = 0
    ints[:, F.MAX_NEW] = 100
    ints[:, F.STOP_ON_EOS] = 1
    logits[0, [2999, 1200, 1030]] = 4.0  # ties across chunks and lanes: 1030 is first
    logits[1, [7, 2048]] = 2.0  # a stop id first
    logits[2, 5] = 9.0  # a stop id, but this row ignores them
    ints[rows[2], F.STOP_ON_EOS] = 0
    logits[3, 11] = 9.0
    seen[rows[3], 11] = True  # penalised (9 / p): still the max
    got, (ints_after, seen_after, _) = _run_both(logits, None, ints, penalty, seen, stop_ids, rows, live)
    assert got.tolist() == [1030, 7, 5, 11]
    assert ints_after[rows, F.DONE].tolist() == [0, 1, 0, 1]
    assert bool(seen_after[rows[0], 1030]) and bool(seen_after[rows[1], 7])


def test_commit_of_a_given_token_and_with_no_stop_ids():
    ints, seen, penalty, rows, live, logits, _ = _commit_case(12, 9, 777, torch.float32, seed=9)
    chosen = torch.randint(0, 777, (9,), generator=torch.Generator().manual_seed(1)).to(DEV)
    _run_both(logits, chosen, ints, penalty, seen, torch.empty(0, dtype=torch.long, device=DEV), rows, live)


def test_dead_rows_change_nothing():
    ints, seen, penalty, rows, live, logits, stop_ids = _commit_case(8, 8, 500, torch.float32, seed=4)
    live.fill_(False)
    before = ints.clone(), seen.clone()
    _, (ints_after, seen_after, _) = _run_both(logits, None, ints, penalty, seen, stop_ids, rows, live)
    assert torch.equal(ints_after, before[0]) and torch.equal(seen_after, before[1])


def test_bad_state_is_a_clear_error():
    ints = torch.zeros(4, 3, dtype=torch.long, device=DEV)
    with pytest.raises(ValueError, match="int64 tensor"):
        ds.decode_rows(ints, torch.zeros(2, dtype=torch.long, device=DEV), torch.ones(2, dtype=torch.bool,
                                                                                        device=DEV),
                       torch.ones(1, dtype=torch.long, device=DEV))
