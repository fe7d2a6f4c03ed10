"""Measured dispatch (ops/dispatch.py, ops/tuning_cache.py) on the CPU: the choice logic, shape keys, the
persistent cache's keying and invalidation, and a whole model choosing per shape, with injected timings.

On the CPU `auto` races nothing (Triton under the interpreter is never a fast candidate), so these tests admit
the interpreted Triton kernels as candidates (`interpreted=True`) and replace the device timer with a table.
"""

import json
import logging

import pytest
import torch

import qwen2vl_fast
from qwen2vl_fast.cli import main as cli
from qwen2vl_fast.errors import BackendError
from qwen2vl_fast.ops import available as ops_available
from qwen2vl_fast.ops import get_op, resolve
from qwen2vl_fast.ops.dispatch import TIE, bucket, choose, shape_key
from qwen2vl_fast.ops.attention import VarlenMeta
from qwen2vl_fast.ops.tuning_cache import FORMAT, TuningCache, fingerprint, fingerprint_key

pytestmark = pytest.mark.usefixtures("triton_device")  # the interpreter must be available for Triton candidates


class Timings:
    """An injected timer: seconds per (op, backend) from `table` (default per backend), and a log of calls."""

    def __init__(self, table=None, per_backend=None):
        self.table = table or {}
        self.per_backend = per_backend or {"torch": 2.0, "triton": 1.0, "cuda": 3.0}
        self.calls = []

    def __call__(self, op, backend, fn, args):
        self.calls.append((op, backend))
        t = self.table.get((op, backend), self.per_backend.get(backend, 5.0))
        if isinstance(t, Exception):
            raise t
        return t


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv("QWEN2VL_FAST_DISPATCH", raising=False)
    monkeypatch.delenv("QWEN2VL_FAST_BACKEND", raising=False)


def table_with(tmp_path, timer, mode="measure", name="dispatch.json"):
    return resolve("auto", "cpu", dispatch=mode, cache_path=tmp_path / name, timer=timer, interpreted=True)


def linear_args(m, n=32, k=64, dtype=torch.float32, bias=False):
    return (torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype),
            torch.randn(n, dtype=dtype) if bias else None)


# ------------------------------------------------------------------------------------------ choice and keys

def test_choose_fastest_with_ties_to_the_default():
    assert choose({"torch": 2.0, "triton": 1.0}, "torch") == "triton"
    assert choose({"torch": 1.0, "triton": 2.0}, "torch") == "torch"
    # within TIE of the default: the default stays (noise never flips a choice between equals)
    assert choose({"torch": 1.0, "triton": 1.0 - TIE / 2}, "torch") == "torch"
    assert choose({"torch": 1.0, "triton": 1.0 - 2 * TIE}, "torch") == "triton"
    assert choose({"torch": 1.0, "triton": None, "cuda": 0.5}, "torch") == "cuda"  # a failed candidate
    assert choose({"torch": None, "triton": 3.0}, "torch") == "triton"


def test_buckets_and_linear_keys():
    assert [bucket(n) for n in (0, 1, 2, 3, 16, 17, 6144, 8193)] == [1, 1, 2, 4, 16, 32, 8192, 16384]
    k = lambda m, **kw: shape_key("linear", linear_args(m, **kw))  # noqa: E731
    assert k(5) == k(8) == "float32 M8 N32 K64"  # one measurement per power-of-two bucket of rows
    assert k(9) != k(8) and k(1) == "float32 M1 N32 K64"
    assert k(8, n=48) != k(8) and k(8, k=128) != k(8) and k(8, bias=True) == "float32 M8 N32 K64 bias"
    assert k(8, dtype=torch.float16).startswith("float16 ")
    x3 = torch.randn(2, 3, 64)  # leading dims are flattened into rows
    assert shape_key("linear", (x3, torch.randn(32, 64), None)) == k(6)
    assert shape_key("linear_act", (*linear_args(8), "gelu")).endswith(" gelu")


def test_generic_keys_bucket_the_token_count_only():
    def attn_key(lengths):
        s = sum(lengths)
        q, k, v = (torch.randn(s, 4, 16) for _ in range(3))
        return shape_key("varlen_attention", (q, k, v, VarlenMeta.from_lengths(lengths, "cpu"), 0.25))

    assert attn_key([60, 60]) == attn_key([50, 62, 8])  # same bucket of 128 tokens, same longest-segment bucket
    assert attn_key([60, 60]) != attn_key([120])  # the longest segment's bucket differs
    assert attn_key([60, 60]) == "float32 rows512x16 128x4x16 128x4x16 seg64 0.25"
    # the decoder's (B, L, E) activations: no exact sequence length in the key of a second argument either
    x = lambda L: (torch.randn(1, L, 48), torch.randn(1, L, 48), torch.randn(48), 1e-6)  # noqa: E731
    assert shape_key("add_rms_norm", x(1602)) == shape_key("add_rms_norm", x(1900)) == \
        "float32 rows2048x48 1x2048x48 48 1e-06"
    pos = lambda L: (torch.zeros(3, 1, L, dtype=torch.long), torch.randn(8), (1, 1, 2), torch.float32)  # noqa: E731
    assert shape_key("mrope_cos_sin", pos(100)) == shape_key("mrope_cos_sin", pos(120))
    assert shape_key("mrope_cos_sin", pos(100)) != shape_key("mrope_cos_sin", pos(300))


# ------------------------------------------------------------------------------------------ one op

def test_untuned_default_is_cublas_for_gemms_and_no_measurement_in_cached_mode(tmp_path):
    timer = Timings()
    table = table_with(tmp_path, timer, mode="cached")
    assert table.chosen["linear"] == table.chosen["linear_swiglu"] == table.chosen["patch_embed"] == "torch"
    assert table.chosen["rms_norm"] == "triton"  # no PyTorch op to prefer: our kernel until measured
    assert "linear" in table.measured
    x, w, b = linear_args(5)
    torch.testing.assert_close(table.linear(x, w, b), x @ w.T)
    assert timer.calls == [] and table.dispatch_report() == []
    assert not (tmp_path / "dispatch.json").exists()


def test_measure_once_per_shape_then_run_the_winner(tmp_path, monkeypatch):
    timer = Timings()
    table = table_with(tmp_path, timer)
    op = table.measured["linear"]
    ran = []
    for name, fn in list(op.fns.items()):
        op.fns[name] = (lambda f, n: lambda *a: (ran.append(n), f(*a))[1])(fn, name)
    x, w, b = linear_args(5)
    y = table.linear(x, w, b)
    torch.testing.assert_close(y, x @ w.T, atol=1e-4, rtol=1e-4)
    assert sorted(timer.calls) == [("linear", "torch"), ("linear", "triton")]
    # each candidate once for the agreement check (the reference first), then the winner computes the result
    # (the timer here never ran anything)
    assert ran == ["torch", "triton", "triton"]
    table.linear(*linear_args(7))  # same bucket: no new measurement
    assert len(timer.calls) == 2 and ran == ["torch", "triton", "triton", "triton"]
    table.linear(*linear_args(40))  # a new bucket is measured
    assert len(timer.calls) == 4
    report = table.dispatch_report()
    assert [(r[0], r[1], r[2]) for r in report] == [("linear", "float32 M64 N32 K64", "triton"),
                                                  ("linear", "float32 M8 N32 K64", "triton")]
    assert report[0][3] == {"torch": 2e6, "triton": 1e6}  # microseconds


def test_a_candidate_that_disagrees_with_the_reference_never_wins(tmp_path, caplog):
    """The fastest candidate computes garbage (as a kernel miscompiled for a new GPU might): it is refused at
    measurement, with one warning naming it, and the reference runs."""
    timer = Timings()  # triton is the faster one
    table = table_with(tmp_path, timer)
    op = table.measured["linear"]
    op.fns["triton"] = lambda x, w, b=None: (x @ w.T) * 1.5
    x, w, b = linear_args(5)
    with caplog.at_level("WARNING", logger="qwen2vl_fast.dispatch"):
        y = table.linear(x, w, b)
    torch.testing.assert_close(y, x @ w.T)
    assert table.dispatch_report()[0][2] == "torch"
    assert ("linear", "triton") not in timer.calls
    assert any("'triton' disagrees with the PyTorch reference" in r.message for r in caplog.records)
    # and a NaN where the reference is finite
    op.fns["triton"] = lambda x, w, b=None: torch.full_like(x @ w.T, float("nan"))
    assert op.dispatch.measure(op, "probe", (x, w, b)) == "torch"


def test_per_shape_winners_differ(tmp_path):
    class BySize(Timings):
        def __call__(self, op, backend, fn, args):  # triton wins small M, torch large M
            self.calls.append((op, backend))
            small = args[0].shape[0] <= 16
            return {"torch": 2.0 if small else 1.0, "triton": 1.0 if small else 2.0}.get(backend, 3.0)

    table = table_with(tmp_path, BySize())
    table.linear(*linear_args(4))
    table.linear(*linear_args(100))
    winners = {key: winner for _, key, winner, _ in table.dispatch_report()}
    assert winners == {"float32 M4 N32 K64": "triton", "float32 M128 N32 K64": "torch"}


@pytest.mark.parametrize("op,extra", [("linear_act", ("quick_gelu",)), ("linear_act", ("gelu",)),
                                      ("linear_swiglu", ())])
def test_fused_epilogues_race_cublas_plus_our_activation_kernel(tmp_path, op, extra):
    timer = Timings({(op, "cublas+triton"): 0.5})
    table = table_with(tmp_path, timer)
    assert set(table.measured[op].fns) == {"torch", "triton", "cublas+triton"}
    x, w, b = linear_args(6, n=64, bias=True)
    got = getattr(table, op)(x, w, b, *extra)
    expected = get_op(op).reference(x, w, b, *extra)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert table.dispatch_report()[0][2] == "cublas+triton"
    assert "cublas+triton" not in ops_available("cpu")[op]["implementations"]  # never a backend by name


def test_a_failing_candidate_loses_and_a_failing_default_raises(tmp_path):
    timer = Timings({("linear", "triton"): RuntimeError("no kernel for this shape")})
    table = table_with(tmp_path, timer)
    table.linear(*linear_args(3))
    [(_, _, winner, times)] = table.dispatch_report()
    assert winner == "torch" and times["triton"] is None
    timer = Timings({("linear", "torch"): ValueError("bad input")})
    table = table_with(tmp_path, timer, name="other.json")
    with pytest.raises(ValueError, match="bad input"):
        table.linear(*linear_args(3))
    assert table.dispatch_report() == []  # nothing recorded for a call that failed


def test_arguments_written_in_place_are_fresh_for_every_timed_call(tmp_path):
    """vision_rotary's fast versions rotate q and k inside qkv: measuring (real timer, CPU) must not rotate the
    caller's tensor more than once."""
    from qwen2vl_fast.ops.rotary import vision_rotary as reference

    table = resolve("auto", "cpu", cache_path=tmp_path / "d.json", interpreted=True)  # the real timer (CPU)
    s, heads, d = 6, 2, 16
    qkv = torch.randn(s, 3 * heads * d)
    cos, sin = torch.randn(s, d), torch.randn(s, d)
    expected = [t.clone() for t in reference(qkv.clone(), cos, sin, heads)]
    got = table.vision_rotary(qkv, cos, sin, heads)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    [(op, _, _, times)] = table.dispatch_report()
    assert op == "vision_rotary" and all(t is not None and t > 0 for t in times.values())


# ------------------------------------------------------------------------------------------ the cache

def test_winners_persist_keyed_by_environment(tmp_path):
    table_with(tmp_path, Timings()).linear(*linear_args(5))
    data = json.loads((tmp_path / "dispatch.json").read_text())
    assert data["format"] == FORMAT
    [(key, section)] = data["environments"].items()
    fp = section["fingerprint"]
    assert set(fp) == {"device", "capability", "driver", "cuda", "torch", "triton", "qwen2vl_fast"}
    assert fp["torch"] == torch.__version__ and key == fingerprint_key(fingerprint("cpu"))
    assert section["ops"]["linear"]["float32 M8 N32 K64"]["winner"] == "triton"
    # a new process (a new table) reads the winner and measures nothing
    timer = Timings({("linear", "triton"): 9.0})
    table = table_with(tmp_path, timer)
    assert table.measured["linear"].winners == {"float32 M8 N32 K64": "triton"}
    table.linear(*linear_args(6))
    assert timer.calls == []


def test_stale_cache_is_ignored_with_one_warning(tmp_path, monkeypatch, caplog):
    table_with(tmp_path, Timings()).linear(*linear_args(5))
    import qwen2vl_fast.ops.tuning_cache as tc

    real = tc.fingerprint
    monkeypatch.setattr(tc, "fingerprint", lambda dev: {**real(dev), "torch": "9.9.9"})
    import qwen2vl_fast.ops.dispatch as dispatch_mod

    monkeypatch.setattr(dispatch_mod, "fingerprint", tc.fingerprint)
    timer = Timings({("linear", "triton"): 5.0})  # under the "new torch", torch wins
    with caplog.at_level(logging.WARNING, logger="qwen2vl_fast.dispatch"):
        table = table_with(tmp_path, timer)
    warnings = [r for r in caplog.records if r.name == "qwen2vl_fast.dispatch"]
    assert len(warnings) == 1 and "torch changed" in warnings[0].getMessage()
    assert table.measured["linear"].winners == {}
    table.linear(*linear_args(5))
    assert table.dispatch_report()[0][2] == "torch"
    sections = json.loads((tmp_path / "dispatch.json").read_text())["environments"]
    assert len(sections) == 2  # the old environment's section is kept for the stack it belongs to


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 99, "environments": {}}), "[]"])
def test_corrupt_cache_is_ignored_with_one_warning_and_rewritten(tmp_path, caplog, content):
    (tmp_path / "dispatch.json").write_text(content)
    with caplog.at_level(logging.WARNING, logger="qwen2vl_fast.dispatch"):
        table = table_with(tmp_path, Timings())
    assert len([r for r in caplog.records if r.name == "qwen2vl_fast.dispatch"]) == 1
    table.linear(*linear_args(5))  # still measures and runs
    assert json.loads((tmp_path / "dispatch.json").read_text())["format"] == FORMAT


def test_recorded_winner_that_is_no_candidate_here_is_remeasured(tmp_path):
    cache = TuningCache(tmp_path / "dispatch.json", fingerprint("cpu"))
    cache.put("linear", "float32 M8 N32 K64", "cuda", {"cuda": 1e-6, "torch": 2e-6})
    cache.save()
    timer = Timings()
    table = table_with(tmp_path, timer)
    assert table.measured["linear"].winners == {}
    table.linear(*linear_args(5))
    assert len(timer.calls) == 2


def test_default_mode_ignores_the_cache_and_bad_modes_are_typed_errors(tmp_path, monkeypatch):
    table_with(tmp_path, Timings()).linear(*linear_args(5))
    timer = Timings()
    table = table_with(tmp_path, timer, mode="default")
    assert table.measured["linear"].winners == {}
    table.linear(*linear_args(5))
    assert timer.calls == []
    with pytest.raises(BackendError, match="dispatch mode"):
        table_with(tmp_path, timer, mode="fastest")
    monkeypatch.setenv("QWEN2VL_FAST_DISPATCH", "cached")
    assert table_with(tmp_path, timer).dispatch.mode == "cached"


def test_cpu_auto_races_nothing_and_touches_no_cache(tmp_path):
    table = resolve("auto", "cpu", cache_path=tmp_path / "d.json")
    assert table.dispatch is None and table.measured == {} and set(table.chosen.values()) == {"torch"}
    assert not (tmp_path / "d.json").exists()


# ------------------------------------------------------------------------------------------ a whole model

def _model_with(ckpt, tmp_path, timer):
    from qwen2vl_fast.config import load_config
    from qwen2vl_fast.model import load

    model = load(ckpt, device="cpu", dtype=torch.float32, backend="torch")
    cfg = load_config(ckpt)
    table = resolve("auto", "cpu", cfg, cache_path=tmp_path / "dispatch.json", timer=timer, interpreted=True)
    # the same weights on the raced table (the model composes ops: swapping the table swaps every op)
    for part in (model, model.visual, model.language_model):
        part.ops = table
    return model


def test_model_forward_measures_its_real_shapes_and_keeps_the_logits(tiny_checkpoints, tmp_path):
    from qwen2vl_fast.testing.inputs import image_prompt

    ckpt = tiny_checkpoints["tiny-qwen2.5-vl"]
    ref_model = qwen2vl_fast.load(ckpt, device="cpu", dtype=torch.float32, backend="torch")
    inputs = image_prompt(ref_model.config, 56, 84, text_tokens=9)
    expected = ref_model(**inputs).logits

    def triton_wins(op, args):  # our GEMMs win the narrow linears (not the LM head: slow under the interpreter)
        return op.startswith("linear") and args[1].shape[0] < 1000

    class NarrowLinearsOnTriton(Timings):  # ... the references win everything else
        def __call__(self, op, backend, fn, args):
            self.calls.append((op, backend))
            fast = "triton" if triton_wins(op, args) else "torch"
            return 1.0 if backend == fast else 2.0

    timer = NarrowLinearsOnTriton()
    model = _model_with(ckpt, tmp_path, timer)
    report = qwen2vl_fast.tune(model, inputs)
    got = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)
    winners = {(op, key): w for op, key, w, _ in report}
    measured_ops = {op for op, _ in winners}
    assert {"linear", "linear_swiglu", "rms_norm", "add_rms_norm", "varlen_attention", "merger"} <= measured_ops
    assert {w for (op, key), w in winners.items() if op == "linear" and " N151936 " not in key} == {"triton"}
    assert {w for (op, key), w in winners.items() if not op.startswith("linear") or " N151936 " in key} == {"torch"}
    cfg = model.config
    # the keys are the model's real widths: the decoder's qkv projection, the LM head
    t = cfg.text
    qkv_n = (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
    assert any(op == "linear" and f"N{qkv_n} K{t.hidden_size} bias" in key for op, key in winners)
    assert any(op == "linear" and f"N{t.vocab_size} K{t.hidden_size}" in key for op, key in winners)
    n_calls = len(timer.calls)
    model(**inputs)  # the same shapes again: nothing new to measure
    assert len(timer.calls) == n_calls


def test_engine_warmup_measures_prefill_and_decode_shapes(tiny_checkpoints, tmp_path):
    from qwen2vl_fast.engine import Engine

    timer = Timings(per_backend={"torch": 1.0, "triton": 2.0, "cuda": 3.0})  # the references run (fast here)
    model = _model_with(tiny_checkpoints["tiny-qwen2-vl"], tmp_path, timer)
    engine = Engine(model, max_batch=2, max_len=64, warmup=False)
    report = engine.warmup(prompt_lengths=(8,))
    keys = {(op, key) for op, key, _, _ in report}
    t = model.config.text
    assert ("linear", f"float32 M8 N{t.vocab_size} K{t.hidden_size}") not in keys  # only the last row's logits
    assert any(op == "linear" and key.startswith("float32 M1 ") for op, key in keys)  # decode, one row
    assert any(op == "rope_decode_attention" for op, _ in keys) and any(op == "prefill_attention" for op, _ in keys)
    assert (tmp_path / "dispatch.json").exists()


def test_tune_on_the_cpu_has_nothing_to_measure(tiny_checkpoints):
    model = qwen2vl_fast.load(tiny_checkpoints["tiny-qwen2-vl"], device="cpu", dtype=torch.float32)
    assert model.ops.dispatch is None and qwen2vl_fast.tune(model) == []


# ------------------------------------------------------------------------------------------ the CLI

def test_cli_ops_shows_measured_winners_with_times(tmp_path, capsys):
    table_with(tmp_path, Timings()).linear(*linear_args(5))
    assert cli(["ops", "--device", "cpu", "--cache", str(tmp_path / "dispatch.json")]) == 0
    out = capsys.readouterr().out
    assert "linear" in out and "float32 M8 N32 K64" in out and "-> triton" in out
    assert "torch 2000000.0" in out and "triton 1000000.0" in out
    assert cli(["ops", "--json", "--cache", str(tmp_path / "dispatch.json"), "--device", "cpu"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["linear"]["measured"]["float32 M8 N32 K64"]["winner"] == "triton"
    assert data["linear"]["auto"] == "torch" and data["rms_norm"]["measured"] == {}


def test_cli_tune_on_the_cpu(tiny_checkpoints, tmp_path, capsys):
    assert cli(["tune", "--model", str(tiny_checkpoints["tiny-qwen2-vl"]), "--device", "cpu",
                "--cache", str(tmp_path / "d.json")]) == 0
    assert "nothing to measure" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ the device timer

def test_cuda_timer_flushes_l2_and_times_only_the_call(monkeypatch):
    """The CUDA path's order of work, with torch.cuda faked (no GPU here): per repetition a flush of the L2
    buffer and the host's head-start spin come before the start event, the call between the two events, and
    the budget cuts the repetitions of a long call."""
    from qwen2vl_fast.ops import timing

    log, clock = [], {"t": 0.0}

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self, stream=None):
            log.append("event")
            self.t = clock["t"]

        def synchronize(self):
            pass

        def elapsed_time(self, other):  # milliseconds, as CUDA events
            return (other.t - self.t) * 1e3

    class FlushBuffer:
        def zero_(self):
            log.append("flush")

    dev = torch.device("cuda", 0)
    monkeypatch.setitem(timing._FLUSH, dev, FlushBuffer())
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: log.append("spin"))

    def call(seconds):
        def fn(x):
            log.append("call")
            clock["t"] += seconds
            x.add_(1)  # written in place: every repetition must get a fresh copy
        return fn

    x = torch.zeros(3)
    t = timing.time_call(call(1e-5), (x,), dev, mutated=(0,), warmup=1, reps=5, budget_s=1.0)
    assert t == pytest.approx(1e-5)
    assert log[:2] == ["call", "flush"]  # the warm-up call, then the first repetition
    assert log[1:] == ["flush", "spin", "event", "call", "event"] * 5
    assert torch.equal(x, torch.zeros(3))  # the caller's tensor is never written
    log.clear()
    timing.time_call(call(0.1), (x,), dev, warmup=0, reps=50, budget_s=0.5)
    assert log.count("call") == 3  # 3 x 0.1 s measured, 50 would exceed the 0.5 s budget


def test_nothing_is_measured_while_a_cuda_graph_is_captured(tmp_path, monkeypatch):
    """Inside a capture the winner (or the untuned default) is recorded into the graph, never a timing loop."""
    import qwen2vl_fast.ops.dispatch as dispatch_mod
    from qwen2vl_fast.ops.dispatch import Dispatch, MeasuredOp

    monkeypatch.setattr(dispatch_mod, "fingerprint", lambda dev: {**fingerprint("cpu"), "device": "fake-gpu"})
    timer = Timings()
    d = Dispatch("cuda", "measure", tmp_path / "d.json", timer)  # a CUDA dispatch, faked (no GPU here)
    ref = get_op("linear").reference
    op = MeasuredOp("linear", {"torch": ref, "triton": ref}, "torch", d, ref)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    op(*linear_args(4))
    assert timer.calls == [] and op.winners == {}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    op(*linear_args(4))
    assert len(timer.calls) == 2 and op.winners == {"float32 M4 N32 K64": "triton"}
