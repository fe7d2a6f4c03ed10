"""The generation engine: greedy tokens identical to transformers' generate, sampling semantics against
transformers' logits processors, streaming, seeding, bad input, and (GPU) CUDA-graph decode == eager."""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import qwen2vl_fast
from qwen2vl_fast.engine import Engine
from qwen2vl_fast.errors import EngineError, InputError, PromptError, Qwen2VLFastError
from qwen2vl_fast.ops import get_op
from qwen2vl_fast.testing.hf_compat import transformers_inputs

FAMILIES = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]


def picture(h, w, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def chats():
    return [
        [{"role": "user", "content": [{"type": "image", "image": picture(60, 90, 1)},
                                      {"type": "text", "text": "What is in the picture?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def engine(request, tiny_checkpoints):
    return Engine.from_pretrained(tiny_checkpoints[request.param], dtype=torch.float32, max_batch=4, max_len=1024)


def hf_generate(path, inputs, max_new_tokens):
    cfg = qwen2vl_fast.load_config(path)
    cls = (transformers.Qwen2VLForConditionalGeneration if cfg.model_type == "qwen2_vl"
           else transformers.Qwen2_5_VLForConditionalGeneration)
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(**transformers_inputs(inputs), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=151643, eos_token_id=[151645, 151643])
    return out[:, inputs["input_ids"].shape[1]:]


def trim(row, stops=(151645, 151643)):
    out = []
    for t in row:
        out.append(int(t))
        if int(t) in stops:
            break
    return out


def test_greedy_tokens_equal_transformers_generate(engine, tiny_checkpoints):
    """Text and image prompts, batch of 2 (left padded for transformers), CPU fp32."""
    path = [p for p in tiny_checkpoints.values() if qwen2vl_fast.load_config(p).model_type ==
            engine.model.config.model_type][0]
    inputs = engine.processor(chats())
    ref = hf_generate(path, inputs, max_new_tokens=12)
    ours = engine.generate(inputs, max_new_tokens=12)
    for completion, row in zip(ours, ref):
        assert completion.token_ids == trim(row.tolist())


def test_stream_gives_the_generate_tokens_and_text(engine):
    done = engine.generate(chats(), max_new_tokens=6)
    events = list(engine.stream(chats(), max_new_tokens=6))
    for i, completion in enumerate(done):
        assert [e.token_id for e in events if e.index == i] == completion.token_ids
        assert "".join(e.text for e in events if e.index == i) == completion.text
    assert events[-1].finished


def test_one_chat_returns_one_completion_with_timings(engine):
    [c] = engine.generate(chats()[1], max_new_tokens=3)
    assert len(c.token_ids) <= 3 and c.finish_reason in ("stop", "length")
    assert c.timings["prefill_s"] > 0 and c.timings["generated_tokens"] >= 1


def test_seeded_sampling_is_reproducible(engine):
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a = engine.generate(chats(), **kw)
    b = engine.generate(chats(), **kw)
    c = engine.generate(chats(), **{**kw, "seed": 8})
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_ignore_eos_runs_to_the_length(engine):
    out = engine.generate(chats(), max_new_tokens=5, ignore_eos=True)
    assert all(len(c.token_ids) == 5 and c.finish_reason == "length" for c in out)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(seed="x"), "seed"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_bad_sampling_parameters_are_refused_and_the_engine_serves_the_next(engine, kwargs, match):
    with pytest.raises(InputError, match=match):
        engine.generate(chats(), **kwargs)
    assert engine.generate(chats(), max_new_tokens=2)


def test_too_long_and_empty_prompts_are_refused(engine):
    with pytest.raises(PromptError, match="exceeds the KV cache length"):
        engine.generate(chats(), max_new_tokens=5000)
    empty = engine.processor(chats()[1])
    empty["attention_mask"][:] = 0
    with pytest.raises(PromptError, match="empty prompt"):
        engine.generate(empty, max_new_tokens=2)
    with pytest.raises(EngineError, match="max_batch"):
        engine.generate(chats() * 3, max_new_tokens=2)
    with pytest.raises(PromptError):
        engine.generate([], max_new_tokens=2)
    assert issubclass(EngineError, Qwen2VLFastError)
    assert engine.generate(chats(), max_new_tokens=2)


# --- the sampler against transformers' processors ------------------------------------------------------------

def hf_probs(logits, seen_ids, temperature, top_k, top_p, penalty):
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    ids = torch.tensor([seen_ids])
    x = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits[None].clone())
    x = TemperatureLogitsWarper(temperature)(ids, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(ids, x)
    x = TopPLogitsWarper(top_p)(ids, x)
    return x.softmax(-1)[0]


@pytest.mark.parametrize("temperature, top_k, top_p, penalty", [
    (1.0, 0, 1.0, 1.0), (0.7, 5, 1.0, 1.0), (1.3, 0, 0.8, 1.0), (1.0, 8, 0.9, 1.3), (0.5, 3, 0.5, 0.8)])
def test_sampler_distribution_matches_transformers_processors(temperature, top_k, top_p, penalty):
    gen = torch.Generator().manual_seed(0)
    vocab, draws = 12, 40000
    logits = torch.randn(vocab, generator=gen) * 2
    seen_ids = [1, 4, 4, 9]
    expected = hf_probs(logits, seen_ids, temperature, top_k, top_p, penalty)
    seen = torch.zeros(draws, vocab, dtype=torch.bool)
    seen[:, seen_ids] = True
    knob = lambda v, dt: torch.full((draws,), v, dtype=dt)  # noqa: E731
    noise = torch.empty(draws, vocab).exponential_(generator=gen)
    tokens = get_op("sample").reference(logits.expand(draws, -1), knob(temperature, torch.float32),
                                        knob(top_k, torch.int64), knob(top_p, torch.float32),
                                        knob(penalty, torch.float32), seen, noise)
    freq = torch.bincount(tokens, minlength=vocab).float() / draws
    assert torch.all(freq[expected == 0] == 0)  # never a filtered token
    assert (freq - expected).abs().max() < 0.015


def test_sampler_greedy_rows_take_the_penalised_argmax():
    logits = torch.tensor([[3.0, 2.9, -1.0, 0.5], [0.1, -0.2, 0.3, 0.2]])
    seen = torch.tensor([[True, False, False, False], [False, False, True, False]])
    f32, i64 = torch.float32, torch.int64
    tokens = get_op("sample").reference(logits, torch.zeros(2, dtype=f32), torch.zeros(2, dtype=i64),
                                        torch.ones(2, dtype=f32), torch.tensor([1.2, 2.0]), seen,
                                        torch.ones(2, 4))
    assert tokens.tolist() == [1, 3]  # 3.0 / 1.2 = 2.5 < 2.9; 0.3 / 2.0 = 0.15 < 0.2


# --- GPU: CUDA-graph decode equals eager -----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graph_decode_gives_the_eager_tokens(tiny_checkpoints, family):
    path = tiny_checkpoints[family]
    graphs = Engine.from_pretrained(path, device="cuda", dtype=torch.bfloat16, cuda_graphs=True, max_batch=4,
                                    max_len=1024)
    eager = Engine.from_pretrained(path, device="cuda", dtype=torch.bfloat16, cuda_graphs=False, max_batch=4,
                                   max_len=1024)
    a = graphs.generate(chats(), max_new_tokens=16)
    b = eager.generate(chats(), max_new_tokens=16)
    assert graphs.graphs is not None and graphs.graphs.graphs
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_out_of_memory_at_prefill_is_a_clear_error_and_the_engine_recovers(engine, monkeypatch):
    lm = engine.model.language_model
    real = lm.prefill

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(lm, "prefill", oom)
    with pytest.raises(EngineError, match="out of memory in the prefill"):
        engine.generate(chats(), max_new_tokens=2)
    monkeypatch.setattr(lm, "prefill", real)
    assert len(engine.generate(chats(), max_new_tokens=2)) == 2
