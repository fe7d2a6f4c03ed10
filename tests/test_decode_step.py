"""The device-resident decode step (issue: decode at the bandwidth roofline, item 2): what the host does per step
(counted with recorders: no GPU here), the pipelined launch (step n+1 before step n's tokens are read; tokens past
a stop dropped), the warm-up / capture mode that touches no sequence, and the counter-based sampling noise."""

import os

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from qwen2vl_fast.engine import Engine
from qwen2vl_fast.ops import step_state as F
from qwen2vl_fast.ops.registry import get_op
from qwen2vl_fast.ops.sampling import counter_noise, split_seed
from qwen2vl_fast.testing.inputs import text_prompt

from test_engine import hf_probs

FAMILIES = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]


class HostCalls(TorchFunctionMode):
    """Records every torch function the host calls, except while `paused` (inside a step's replay: on CUDA that is
    the captured graph, which the host does not run op by op)."""

    def __init__(self):
        super().__init__()
        self.paused, self.names = False, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def record_steps(engine, monkeypatch):
    """Per decode step of the engine thread: (replays, the torch calls the host made outside them)."""
    sched, steps = engine.scheduler, []
    real_replay, real_step = sched.steps.replay, sched._decode_step

    def replay(bs, sampling):
        mode, count = steps[-1]
        steps[-1] = (mode, count + 1)
        mode.paused = True
        try:
            return real_replay(bs, sampling)
        finally:
            mode.paused = False

    def step():
        mode = HostCalls()
        steps.append((mode, 0))
        with mode:
            real_step()

    monkeypatch.setattr(sched.steps, "replay", replay)
    monkeypatch.setattr(sched, "_decode_step", step)
    return lambda: [(count, mode.names) for mode, count in steps]


def two_prompts(n: int = 9) -> dict:
    a, b = text_prompt(n, seed=0), text_prompt(n, seed=1)
    return {k: torch.cat([a[k], b[k]]) for k in a}


@pytest.fixture(scope="module", params=FAMILIES)
def engine(request, tiny_checkpoints):
    return Engine.from_pretrained(tiny_checkpoints[request.param], dtype=torch.float32, max_batch=4, max_len=256)


@pytest.mark.parametrize("sampling", [False, True])
def test_a_steady_decode_step_is_one_replay_and_one_copy_on_the_host(engine, monkeypatch, sampling):
    recorded = record_steps(engine, monkeypatch)
    kw = dict(temperature=0.8, top_k=20, seed=3) if sampling else {}
    out = engine.generate(two_prompts(), max_new_tokens=10, ignore_eos=True, **kw)
    assert [len(c.token_ids) for c in out] == [10, 10]
    steps = recorded()
    # the prefill gives token 1; steps 1..9 give tokens 2..10; each call launches a step and reads the previous
    # one's tokens, so 10 calls: 9 launches (none wasted: the budget is known) and 9 reads.
    assert [count for count, _ in steps] == [1] * 9 + [0]
    first, *steady, last = [names for _, names in steps]
    assert first.count("copy_") >= 1  # the batch's rows go up once, with the first step
    for names in steady:  # one copy of the tokens out (non-blocking on CUDA) and the read of the other buffer
        assert names == ["copy_", "tolist"], names
    assert last == ["tolist"]


def test_step_n_plus_1_is_launched_before_step_n_is_read(engine, monkeypatch):
    sched, order = engine.scheduler, []
    real_replay, real_collect = sched.steps.replay, sched._collect
    monkeypatch.setattr(sched.steps, "replay", lambda bs, s: (order.append("launch"), real_replay(bs, s))[1])
    monkeypatch.setattr(sched, "_collect", lambda step: (order.append("read"), real_collect(step))[1])
    engine.generate(text_prompt(7), max_new_tokens=4, ignore_eos=True)
    assert order == ["launch", "launch", "read", "launch", "read", "read"]


def test_tokens_past_a_stop_token_are_dropped_and_the_device_stops_the_row(tiny_checkpoints):
    path = tiny_checkpoints["tiny-qwen2-vl"]
    free = Engine.from_pretrained(path, dtype=torch.float32, max_batch=2, max_len=256)
    [ref] = free.generate(text_prompt(11), max_new_tokens=12, ignore_eos=True)
    ids = ref.token_ids
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])  # a token first seen at position k
    stop = Engine(free.model, None, max_batch=2, max_len=256, stop_token_ids=(ids[k],))
    replays = []
    real = stop.scheduler.steps.replay
    stop.scheduler.steps.replay = lambda bs, s: (replays.append(bs), real(bs, s))[1]
    [c] = stop.generate(text_prompt(11), max_new_tokens=12)
    assert c.token_ids == ids[:k + 1] and c.finish_reason == "stop"
    # the step after the stop was launched before the host saw it (k tokens from steps, plus that one)
    assert len(replays) == k + 1
    ints = stop.scheduler.state.ints[0]  # slot 0
    assert ints[F.DONE] == 1 and ints[F.GENERATED] == k + 1  # the extra step changed nothing
    assert ints[F.LENGTH] == 11 + k  # prompt + the k step tokens written to the cache


def test_warm_up_mode_leaves_every_sequence_alone(tiny_checkpoints):
    """What capture runs while sequences are live: all rows inactive, K/V at the last cache position only."""
    eng = Engine.from_pretrained(tiny_checkpoints["tiny-qwen2.5-vl"], dtype=torch.float32, max_batch=4,
                                 max_len=64)
    eng.generate(two_prompts(7), max_new_tokens=3, ignore_eos=True)
    state, cache = eng.scheduler.state, eng.cache
    names = ["ints", "temperature", "top_p", "penalty", "seen", "out"]
    before = {n: getattr(state, n).clone() for n in names}
    k_before = [k.clone() for k in cache.k]
    with torch.inference_mode():  # as on the engine thread
        saved = state.warming()
        for bs in (4, 2):
            state.step(bs, sampling=True)
            state.step(bs, sampling=False)
        state.restore(saved)
    for n in names[:-1]:
        assert torch.equal(getattr(state, n), before[n]), n
    for k, kb in zip(cache.k, k_before):
        assert torch.equal(k[:, :-1], kb[:, :-1])  # only position max_len - 1 was written
    assert int(state.pad_len) == 1 and torch.equal(state.active, saved)


def test_counter_noise_is_exp1_and_a_function_of_seed_counter_and_token():
    hi, lo = split_seed(2 ** 40 + 12345)
    rows = lambda *c: torch.tensor(c, dtype=torch.long)  # noqa: E731
    noise = counter_noise(rows(hi, hi, hi, 0), rows(lo, lo, lo, 1), rows(0, 0, 1, 0), 100_000)
    assert torch.equal(noise[0], noise[1])  # same seed, same counter
    assert (noise[0] == noise[2]).float().mean() < 0.01 and (noise[0] == noise[3]).float().mean() < 0.01
    assert torch.all(noise > 0) and torch.isfinite(noise).all()
    for row in noise:
        assert abs(row.mean() - 1) < 0.02 and abs(row.var() - 1) < 0.05
        for q in (0.01, 0.1, 0.5, 0.9, 0.99, 0.999):  # Exp(1)'s CDF at its q-quantile -log(1 - q), within 4 sigma
            below = (row <= -torch.log1p(torch.tensor(-q))).double().mean()
            assert abs(below - q) < 4 * (q * (1 - q) / row.numel()) ** 0.5
    # the same (seed, counter) draws the same noise whatever the other rows are
    alone = counter_noise(rows(hi), rows(lo), rows(1), 100_000)
    assert torch.equal(alone[0], noise[2])


def test_counter_noise_samples_transformers_distribution():
    """The sampler fed counter noise (one draw per counter, as a request's successive tokens) matches the
    distribution of transformers' processors."""
    gen = torch.Generator().manual_seed(1)
    vocab, draws = 12, 30000
    logits = torch.randn(vocab, generator=gen) * 2
    seen_ids = [2, 5]
    expected = hf_probs(logits, seen_ids, 0.9, 6, 0.9, 1.2)
    seen = torch.zeros(draws, vocab, dtype=torch.bool)
    seen[:, seen_ids] = True
    hi, lo = split_seed(77)
    noise = counter_noise(torch.full((draws,), hi), torch.full((draws,), lo), torch.arange(draws), vocab)
    knob = lambda v, dt: torch.full((draws,), v, dtype=dt)  # noqa: E731
    tokens = get_op("sample").reference(logits.expand(draws, -1), knob(0.9, torch.float32),
                                        knob(6, torch.int64), knob(0.9, torch.float32),
                                        knob(1.2, torch.float32), seen, noise)
    freq = torch.bincount(tokens, minlength=vocab).float() / draws
    assert torch.all(freq[expected == 0] == 0)
    assert (freq - expected).abs().max() < 0.015


class KernelLaunches(TorchDispatchMode):
    """What a step would launch on a GPU: every Triton kernel launch (counted at the interpreter's launch entry)
    and every ATen op that is neither a view nor an allocation. `inside` tells which launches fall in the decoder
    layer stack. Custom ops (qwen2vl_fast::...) are wrappers: their Triton launches count, not themselves."""

    NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.inside, self.depth, self.step, self.layers = False, 0, [], []

    def note(self, name: str) -> None:
        (self.layers if self.inside else self.step).append(name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if (self.depth == 0 and func.namespace == "aten" and not func.is_view and name not in self.NO_KERNEL):
            self.note(f"aten.{name}")
        return func(*args, **(kwargs or {}))


def test_a_decoder_layer_is_at_most_7_kernels_in_the_decode_step(tiny_checkpoints, monkeypatch):
    """Counted under the Triton interpreter with the Triton backend (every op ours): residual add + RMSNorm,
    qkv, M-RoPE + KV write + split-KV attention with its merge (one kernel), o_proj, add + RMSNorm, gate/up +
    SwiGLU, down. On a GPU the measured dispatch may pick cuBLAS for a linear, whose kernel count is its own."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts launches at the Triton interpreter's entry")
    import triton.runtime.interpreter as interpreter

    import qwen2vl_fast

    model = qwen2vl_fast.load(tiny_checkpoints["tiny-qwen2-vl"], dtype=torch.float32, backend="triton")
    eng = Engine(model, None, max_batch=2, max_len=128, warmup=False)
    eng.generate(text_prompt(6), max_new_tokens=2, ignore_eos=True)
    lm, state, mode = model.language_model, eng.scheduler.state, KernelLaunches()
    real_run, real_layers = interpreter.InterpretedFunction.run, lm._layers

    def run(fn, *args, **kwargs):
        mode.note(f"triton.{fn.fn.__name__}")
        mode.depth += 1
        try:
            return real_run(fn, *args, **kwargs)
        finally:
            mode.depth -= 1

    def layers(*args, **kwargs):
        mode.inside = True
        try:
            return real_layers(*args, **kwargs)
        finally:
            mode.inside = False

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
    monkeypatch.setattr(lm, "_layers", layers)
    state.set_rows([0, 1], 1)
    with torch.inference_mode(), mode:
        state.step(2, sampling=False)
    n = len(lm.layers)
    # the stack opens with the first layer's input RMSNorm; each layer's last add + RMSNorm normalises for the next
    per_layer = (len(mode.layers) - 1) / n
    assert per_layer == int(per_layer) and per_layer <= 7, mode.layers
    assert all(name.startswith("triton.") for name in mode.layers), mode.layers
    # around the stack: rows (1), embedding (1), M-RoPE cos/sin (1), LM head (1), greedy pick + record (2)
    assert len(mode.step) <= 6, mode.step


# --- GPU: the captured step equals the eager step -----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graph_steps_sample_and_stop_as_the_eager_steps(tiny_checkpoints, family):
    """Greedy and seeded sampled requests, concurrently on the graphs (both kinds captured, batches that grow and
    shrink), each equal to the same request alone on the eager steps; stop tokens end rows inside the graph."""
    graphs = Engine.from_pretrained(tiny_checkpoints[family], device="cuda", dtype=torch.float32, max_batch=8,
                                    max_len=512)
    eager = Engine(graphs.model, None, max_batch=8, max_len=512, cuda_graphs=False, warmup=False)
    kws = [dict(max_new_tokens=4 + i % 7, seed=i, **(dict(temperature=0.9, top_k=50, top_p=0.95) if i % 2 else {}))
           for i in range(12)]
    expected = [eager.generate(text_prompt(5 + i, seed=i), **kw)[0].token_ids for i, kw in enumerate(kws)]
    handles = [graphs.submit(text_prompt(5 + i, seed=i), **kw) for i, kw in enumerate(kws)]
    assert [h.result(timeout=120).token_ids for h in handles] == expected
    assert {sampling for _, sampling in graphs.graphs.graphs} == {False, True}


def test_a_failed_first_token_fails_its_request_and_the_engine_serves_the_next(engine, monkeypatch):
    real = engine.scheduler.state.admit
    monkeypatch.setattr(engine.scheduler.state, "admit", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(Exception, match="boom"):
        engine.generate(text_prompt(5), max_new_tokens=3)
    monkeypatch.setattr(engine.scheduler.state, "admit", real)
    [c] = engine.generate(text_prompt(5), max_new_tokens=3, ignore_eos=True)
    assert len(c.token_ids) == 3 and engine.metrics()["kv_slots_in_use"] == 0
