"""kernels/gemv_splitk.py (the split-K decode GEMV, M <= 16) against the op references, on the CPU under the Triton
interpreter or on a GPU: odd shapes, real widths (one 2B layer whole, the longest K's with a few columns), M in
{1, 3, 16}, bias on / off, plain and SwiGLU (and one GELU), every split count the plan can choose (forced), both
reductions (last CTA of a tile; a second kernel), outputs and partial planes allocated NaN-filled.

Determinism: repeated runs are bitwise equal; the in-kernel and the two-pass reductions are bitwise equal; so is a
run where another CTA of each tile arrives last (REVERSE: the split order of the grid reversed); the ticket
counters are left zeroed. A split may change the rounding against split 1 (summation order): bounded by the dtype
tolerance. The plan (one wave of resident CTAs) is checked on its own, with given SM counts, at the real shapes.

Tolerances as tests/test_kernels_gemm.py: fp32 tight (rtol 1e-4), fp16 by the DESIGN rule (error against an fp32
reference within twice PyTorch's own fp16 error plus atol).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import TEST_DEVICE, float_dtypes
from helpers_triton import run_without_interpreter

from qwen2vl_fast.ops import get_op, resolve

gs = pytest.importorskip("qwen2vl_fast.kernels.gemv_splitk")

DTYPES = [pytest.param(d, atol, id=str(d).split(".")[-1]) for d, atol, _ in float_dtypes(TEST_DEVICE)]  # + bf16 on CUDA
# (M, K, N): K tails (17, 300, 1176 = 9 x 128 + 24, 70), N not a multiple of the tile (5, 37, 100)
ODD_SHAPES = [(1, 17, 5), (1, 1176, 37), (3, 300, 100), (16, 70, 37), (3, 1176, 5), (16, 1000, 100), (1, 300, 100)]
# Real widths: the 2B o_proj whole at M = 1; the longest reductions with a few columns (2B / 7B down, 7B gate_up)
REAL = [(1, 1536, 1536, "none"), (3, 1536, 64, "none"), (1, 8960, 128, "none"), (16, 8960, 64, "none"),
        (1, 18944, 64, "none"), (1, 3584, 96, "swiglu"), (16, 3584, 32, "swiglu")]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    def nan_empty(*shape, dtype=None, device=None):
        return torch.full(*shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(gs, "_empty", nan_empty)


def ref_fn(epilogue):
    if epilogue == "swiglu":
        return get_op("linear_swiglu").reference
    if epilogue == "none":
        return get_op("linear").reference
    return lambda x, w, b: get_op("linear_act").reference(x, w, b, epilogue)


def make(m, k, n, epilogue, dtype, device, bias=True):
    rows = 2 * n if epilogue == "swiglu" else n
    x = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(rows, k, device=device) * k ** -0.5).to(dtype)
    b = (torch.randn(rows, device=device) * 0.5).to(dtype) if bias else None
    return x, w, b


def check(out, x, w, b, epilogue, dtype, atol):
    """Shape, dtype, finiteness (no poisoned element left), then the tolerance of the dtype."""
    f = ref_fn(epilogue)
    assert out.shape == (*x.shape[:-1], w.shape[0] // 2 if epilogue == "swiglu" else w.shape[0])
    assert out.dtype == dtype and torch.isfinite(out).all()
    up = lambda t: None if t is None else t.float()
    ref32 = f(up(x), up(w), up(b))
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref32, rtol=1e-4, atol=1e-5)
        return
    ref_lp = f(x, w, b)
    err, torch_err = (out.float() - ref32).abs().max().item(), (ref_lp.float() - ref32).abs().max().item()
    assert err <= 2 * torch_err + atol, f"error {err:.3g} > 2 * torch's {torch_err:.3g} + {atol}"


def forced(m, n, k, dtype, epilogue, split, block_k=16):
    """A config forcing `split` K splits of BLOCK_K 16 steps (many small steps: every split count is cheap)."""
    cfg = gs.pick_config(m, n, k, dtype, epilogue)._replace(block_k=block_k, split_k=split)
    plan = gs.make_plan(m, n, k, dtype, epilogue, 132, cfg)
    assert plan.split == split and plan.k_split * (split - 1) < k <= plan.k_split * split
    return cfg


def counters_zero(device):
    buf = gs._COUNTERS.get(torch.device(device))
    return buf is None or not buf.any()


# ------------------------------------------------------------------------------------------ numerics

@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("epilogue", ["none", "swiglu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_odd_shapes(triton_device, shape, epilogue, bias, dtype, atol):
    m, k, n = shape
    x, w, b = make(m, k, n, epilogue, dtype, triton_device, bias)
    check(gs.gemv_splitk(x, w, b, epilogue), x, w, b, epilogue, dtype, atol)
    assert counters_zero(triton_device)


@pytest.mark.parametrize("case", REAL, ids=lambda c: "M{}xK{}xN{}-{}".format(*c))
@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_real_widths(triton_device, case, dtype, atol):
    """The plan's own split at the real K (and for the 2B o_proj its real N: 24 tiles x 6 splits)."""
    m, k, n, epilogue = case
    x, w, b = make(m, k, n, epilogue, dtype, triton_device, bias=m == 3)
    assert gs.make_plan(m, n, k, dtype, epilogue).split > 1  # these widths are split-K cases
    check(gs.gemv_splitk(x, w, b, epilogue), x, w, b, epilogue, dtype, atol)


@pytest.mark.parametrize("split", [1, 2, 3, 5, 7, 16, 32])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("epilogue", ["none", "swiglu"])
@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_every_split_count(triton_device, split, m, epilogue, dtype, atol):
    """Forced split counts up to MAX_SPLIT, the last split short (K = 3 steps x split - 5: a masked tail), both
    reductions; bias on for odd split counts."""
    k, n = 48 * split - 5, 37
    x, w, b = make(m, k, n, epilogue, dtype, triton_device, bias=split % 2 == 1)
    cfg = forced(m, n, k, dtype, epilogue, split)
    for reduce in ("kernel", "pass"):
        check(gs.gemv_splitk(x, w, b, epilogue, cfg, reduce=reduce), x, w, b, epilogue, dtype, atol)
    assert counters_zero(triton_device)


@pytest.mark.parametrize("m", [1, 16])
def test_gelu_epilogue_after_the_split_sum(triton_device, m):
    """A non-linear epilogue runs once on the whole sum (after all splits), not per split."""
    x, w, b = make(m, 1000, 40, "gelu", torch.float32, triton_device)
    cfg = forced(m, 40, 1000, torch.float32, "gelu", 7, block_k=32)
    for reduce in ("kernel", "pass"):
        check(gs.gemv_splitk(x, w, b, "gelu", cfg, reduce=reduce), x, w, b, "gelu", torch.float32, 0.0)


def test_mma_tile_at_one_row(triton_device):
    """M = 1 on the tensor-core tile (the config the benchmark also races) equals the reference."""
    x, w, b = make(1, 700, 50, "swiglu", torch.float16, triton_device)
    cfg = gs.pick_config(2, 50, 700, torch.float16, "swiglu")._replace(split_k=3)
    check(gs.gemv_splitk(x, w, b, "swiglu", cfg), x, w, b, "swiglu", torch.float16, 2e-3)
    with pytest.raises(ValueError, match="block_m 1"):
        gs.gemv_splitk(torch.randn(3, 700, device=triton_device), w.float(), None, "swiglu",
                       gs.pick_config(1, 50, 700, torch.float32, "swiglu"))


@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_leading_dims_and_strided_rows(triton_device, dtype, atol):
    big = torch.randn(2, 3, 77, device=triton_device).to(dtype)
    x = big[..., 3:67]  # (2, 3, 64), row stride 77: read in place
    w = (torch.randn(40, 64, device=triton_device) * 0.125).to(dtype)
    b = torch.randn(40, device=triton_device).to(dtype)
    cfg = forced(6, 40, 64, dtype, "none", 4)
    check(gs.gemv_splitk(x, w, b, "none", cfg), x, w, b, "none", dtype, atol)
    check(gs.gemv_splitk(x, w, b, "swiglu", forced(6, 20, 64, dtype, "swiglu", 2)), x, w, b, "swiglu", dtype, atol)
    empty = gs.gemv_splitk(torch.randn(0, 64, device=triton_device).to(dtype), w)
    assert empty.shape == (0, 40)


# ------------------------------------------------------------------------------------------ determinism

@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("epilogue", ["none", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_bitwise_deterministic(triton_device, m, epilogue, dtype):
    """Three repeated runs, the two-pass reduction and a run where the tiles' CTAs arrive in the reverse split
    order (another CTA does the reduction): all bitwise equal. Split 1 agrees within the dtype's rounding."""
    k, n = 48 * 7 - 5, 37
    x, w, b = make(m, k, n, epilogue, dtype, triton_device)
    cfg = forced(m, n, k, dtype, epilogue, 7)
    runs = [gs.gemv_splitk(x, w, b, epilogue, cfg) for _ in range(3)]
    runs.append(gs.gemv_splitk(x, w, b, epilogue, cfg, reduce="pass"))
    runs.append(gs.gemv_splitk(x, w, b, epilogue, cfg, _reverse=True))
    runs.append(gs.gemv_splitk(x, w, b, epilogue, cfg, reduce="pass", _reverse=True))
    for other in runs[1:]:
        assert torch.equal(runs[0], other)
    assert counters_zero(triton_device)
    one = gs.gemv_splitk(x, w, b, epilogue, cfg._replace(split_k=1))
    if dtype == torch.float32:
        torch.testing.assert_close(runs[0], one, rtol=1e-5, atol=1e-6)
    else:  # one rounding of fp32 sums that differ in their last bits: at most one fp16 ulp apart
        ulp = torch.finfo(dtype).eps * one.float().abs().clamp_min(2 ** -14)
        assert ((runs[0].float() - one.float()).abs() <= ulp).all()


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k, epilogue, bias", [
    (1, 2048, 1536, "none", True), (1, 1536, 8960, "none", False), (1, 3584, 18944, "none", False),
    (16, 4608, 3584, "none", True), (4, 8960, 1536, "swiglu", False), (1, 8960, 1536, "swiglu", False)])
def test_gpu_deterministic_at_real_shapes_and_in_graph_replays(m, n, k, epilogue, bias):
    """On a GPU (real concurrency: the last CTA of a tile varies from run to run), bf16 at real shapes: 50 runs and
    20 CUDA-graph replays bitwise equal to the two-kernel reduction, within the bf16 tolerance, counters zeroed."""
    dev = torch.device("cuda")
    x, w, b = make(m, k, n, epilogue, torch.bfloat16, dev, bias)
    assert gs.make_plan(m, n, k, torch.bfloat16, epilogue, gs._num_sms(dev)).split > 1 or epilogue == "swiglu"
    ref = gs.gemv_splitk(x, w, b, epilogue, reduce="pass")
    check(ref, x, w, b, epilogue, torch.bfloat16, 1.6e-2)
    for _ in range(50):
        assert torch.equal(gs.gemv_splitk(x, w, b, epilogue), ref)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gs.gemv_splitk(x, w, b, epilogue)
    for _ in range(20):
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, ref)
    assert counters_zero(dev)


# ------------------------------------------------------------------------------------------ the plan

def test_plan_fills_one_wave_at_the_real_shapes():
    """M = 1 bf16 at 132 SMs: (tiles, split) per layer of the 2B and 7B models and the lm_heads."""
    bf16 = torch.bfloat16
    cases = {  # (N, K, epilogue): (tiles, split)
        (2048, 1536, "none"): (32, 6), (1536, 1536, "none"): (24, 6), (8960, 1536, "swiglu"): (280, 1),
        (1536, 8960, "none"): (24, 18), (4608, 3584, "none"): (72, 7), (3584, 3584, "none"): (56, 7),
        (18944, 3584, "swiglu"): (592, 1), (3584, 18944, "none"): (56, 9), (151936, 1536, "none"): (2374, 1),
        (152064, 3584, "none"): (2376, 1),
    }
    for (n, k, epi), expected in cases.items():
        p = gs.make_plan(1, n, k, bf16, epi, 132)
        assert (p.tiles, p.split) == expected, (n, k, epi, p)
        assert p.slots == 132 * 4 and (p.split == 1 or p.tiles * p.split <= p.slots)  # one wave
        assert p.k_split % p.config.block_k == 0 and p.k_split * (p.split - 1) < k <= p.k_split * p.split


@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("sms", [1, 8, 78, 114, 132, 144])
@pytest.mark.parametrize("n, k, epi", [(2048, 1536, "none"), (1536, 8960, "none"), (3584, 18944, "none"),
                                       (8960, 1536, "swiglu"), (100, 300, "none"), (37, 17, "none")])
def test_plan_rules(m, sms, n, k, epi):
    """The plan's rules for any SM count: one wave, >= 2 steps per split, partial traffic <= half the weight
    bytes, <= MAX_SPLIT, no empty split, and the fewest splits giving the shortest critical path."""
    dtype = torch.float16
    p = gs.make_plan(m, n, k, dtype, epi, sms)
    cfg = p.config
    assert p.slots == sms * cfg.blocks_per_sm
    assert 1 <= p.split <= gs.MAX_SPLIT and p.k_split * (p.split - 1) < k  # no empty split
    if p.split > 1:
        assert p.tiles * p.split <= p.slots  # one wave
        assert p.k_split // cfg.block_k >= gs.MIN_BLOCKS_PER_SPLIT
        assert 8 * p.split * m * n <= 2 * n * k / 2  # partials written + read <= half the weight bytes
    steps = p.k_split // cfg.block_k
    cap = max(1, min(p.slots // p.tiles, p.k_blocks // gs.MIN_BLOCKS_PER_SPLIT, 2 * k // (16 * m), gs.MAX_SPLIT))
    assert steps == -(-p.k_blocks // cap)  # as short a critical path as the caps allow ...
    assert p.split == -(-p.k_blocks // steps)  # ... with the fewest splits


def test_plan_scales_with_the_sm_count():
    small, big = (gs.make_plan(1, 3584, 18944, torch.bfloat16, "none", s) for s in (66, 132))
    assert small.split < big.split and small.tiles == big.tiles


def test_config_table():
    bf16 = torch.bfloat16
    assert gs.pick_config(1, 3584, 3584, bf16)[:4] == (1, 64, 128, 4)
    assert gs.pick_config(1, 18944, 3584, bf16, "swiglu")[:4] == (1, 32, 128, 4)
    assert gs.pick_config(16, 3584, 3584, bf16)[:4] == (16, 64, 128, 4)
    assert gs.pick_config(4, 18944, 3584, bf16, "swiglu")[:4] == (16, 64, 128, 8)
    assert gs.pick_config(3, 5, 17, torch.float32)[:3] == (16, 16, 32)  # shrunk to the problem
    with pytest.raises(ValueError, match="M <= 16|1 <= M"):
        gs.pick_config(17, 64, 64, bf16)
    assert gs.resident_blocks(128, 256, 4) == 4 and gs.resident_blocks(129, 256, 4) == 3
    assert gs.resident_blocks(64, 61440, 4) == 3 and gs.resident_blocks(60, 110592, 8) == 2


# ------------------------------------------------------------------------------------------ arguments, op, dispatch

def test_bad_arguments(triton_device):
    x = torch.randn(3, 8, device=triton_device)
    w = torch.randn(5, 8, device=triton_device)
    with pytest.raises(ValueError, match="M <= 16"):
        gs.gemv_splitk(torch.randn(17, 8, device=triton_device), w)
    with pytest.raises(ValueError, match="epilogue must be one of"):
        gs.gemv_splitk(x, w, None, "relu")
    with pytest.raises(ValueError, match="reduce must be"):
        gs.gemv_splitk(x, w, reduce="atomic")
    with pytest.raises(ValueError, match="even row count"):
        gs.gemv_splitk(x, w, None, "swiglu")
    with pytest.raises(TypeError, match="share a dtype"):
        gs.gemv_splitk(x, w.half())
    with pytest.raises(ValueError, match="do not match"):
        gs.gemv_splitk(x, torch.randn(5, 9, device=triton_device))
    with pytest.raises(ValueError, match="bias of shape"):
        gs.gemv_splitk(x, w, torch.randn(4, device=triton_device))


def test_custom_op_traces_as_one_node(triton_device):
    x, w, b = make(4, 32, 24, "swiglu", torch.float32, triton_device)
    compiled = torch.compile(lambda x, w, b: gs.linear_swiglu(x, w, b) + 1, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b), gs.linear_swiglu(x, w, b) + 1)
    torch.library.opcheck(torch.ops.qwen2vl_fast.gemv_splitk.default, (x, w, b, "none", "kernel"),
                          test_utils=("test_schema", "test_faketensor"))


def test_registered_as_a_raced_candidate_on_cuda_only():
    """A variant of linear and linear_swiglu: raced by `auto` on CUDA next to cuBLAS and the Triton GEMM, never a
    backend picked by name, never the untuned default."""
    for op in ("linear", "linear_swiglu"):
        assert {"triton-splitk", "triton-splitk-2pass"} <= set(get_op(op).variants)
        cuda = get_op(op).candidates(torch.device("cuda"))
        assert {"torch", "triton", "triton-splitk", "triton-splitk-2pass"} <= set(cuda)
        assert get_op(op).untuned(cuda) == "torch"
        for name in ("triton-splitk", "triton-splitk-2pass"):
            assert name not in get_op(op).candidates(torch.device("cpu"), interpreted=True)
            assert name not in get_op(op).implementations()


@pytest.mark.parametrize("epilogue", ["none", "swiglu"])
def test_the_two_candidates_reduce_in_one_and_two_launches(triton_device, monkeypatch, epilogue):
    """triton-splitk: one kernel (the decode layer's budget); triton-splitk-2pass: two; equal results."""
    import triton.runtime.interpreter as interpreter

    if not hasattr(interpreter, "InterpretedFunction") or triton_device.type != "cpu":
        pytest.skip("counts launches at the Triton interpreter's entry")
    launches = []
    real = interpreter.InterpretedFunction.run
    monkeypatch.setattr(interpreter.InterpretedFunction, "run",
                        lambda fn, *a, **k: (launches.append(fn.fn.__name__), real(fn, *a, **k))[1])
    op = "linear_swiglu" if epilogue == "swiglu" else "linear"
    x, w, b = make(1, 4096, 64, epilogue, torch.float32, triton_device)
    one = get_op(op).variants["triton-splitk"][0](x, w, b)
    n_one, launches[:] = len(launches), []
    two = get_op(op).variants["triton-splitk-2pass"][0](x, w, b)
    assert (n_one, len(launches)) == (1, 2)
    torch.testing.assert_close(one, two, rtol=0, atol=0)


def test_dispatch_races_it_per_shape(triton_device, tmp_path, monkeypatch):
    """Under the interpreter (admitted here by hand): the split-K candidate wins the decode shape it is fastest
    at and computes the result; at M > 16 it raises, so it cannot win and the race goes on without it."""
    for op in ("linear", "linear_swiglu"):
        fn, _ = get_op(op).variants["triton-splitk"]
        monkeypatch.setitem(get_op(op).variants, "triton-splitk", (fn, lambda dev, interpreted: True))

    def timer(op, backend, fn, args):
        fn(*args)  # each candidate runs (the split-K one raises beyond 16 rows)
        return {"torch": 2.0, "triton": 1.5, "triton-splitk": 1.0}.get(backend, 3.0)

    table = resolve("auto", "cpu", dispatch="measure", cache_path=tmp_path / "d.json", timer=timer, interpreted=True)
    x, w, b = make(4, 64, 32, "swiglu", torch.float32, triton_device)
    torch.testing.assert_close(table.linear_swiglu(x, w, b), get_op("linear_swiglu").reference(x, w, b),
                               rtol=1e-4, atol=1e-5)
    x, w, b = make(1, 64, 32, "none", torch.float32, triton_device)
    torch.testing.assert_close(table.linear(x, w, b), x @ w.T + b, rtol=1e-4, atol=1e-5)
    table.linear(*make(40, 64, 32, "none", torch.float32, triton_device))
    report = {(op, key): (winner, times) for op, key, winner, times in table.dispatch_report()}
    assert report[("linear_swiglu", "float32 M4 N64 K64 bias")][0] == "triton-splitk"
    assert report[("linear", "float32 M1 N32 K64 bias")][0] == "triton-splitk"
    winner, times = report[("linear", "float32 M64 N32 K64 bias")]
    assert winner == "triton" and times["triton-splitk"] is None


@pytest.mark.parametrize("m, act", [(1, "none"), (1, "swiglu"), (4, "swiglu"), (40, "none")])
def test_benchmark_races_it(triton_device, m, act):
    """bench/bench_gemm.py's decode cases carry the split-K candidates (on CUDA; here admitted under the
    interpreter), each computing the op's result; none beyond 16 rows."""
    from helpers_bench import bench_module

    bench_gemm = bench_module("bench_gemm")
    shape = bench_gemm.GemmShape(m, 96 if act == "swiglu" else 40, 300, act, bias=True)
    make = bench_gemm._make_args(shape, torch.float32, triton_device)
    assert bench_gemm.splitk_candidates(shape, torch.float32, triton_device, make) == {} or \
        triton_device.type == "cuda"  # on the CPU only when asked for (interpreted)
    cands = bench_gemm.splitk_candidates(shape, torch.float32, triton_device, make, interpreted=True)
    if m > 16:
        assert cands == {}
        return
    expected = {"ours-splitk", "ours-splitk-2pass"} | ({"ours-splitk-mma"} if m == 1 else set())
    assert set(cands) == expected and all(c.side == "ours" for c in cands.values())
    x, w, b = make()
    for cand in cands.values():
        check(cand.fn(x, w, b), x, w, b, act, torch.float32, 0.0)


# ------------------------------------------------------------------------------------------ sm_90a, ahead of time

@pytest.mark.slow
def test_sm90_no_spills_and_the_residency_the_plan_assumes(tmp_path):
    """The sweep's gemv_splitk family (every decoder linear and lm_head of the 2B and 7B models, M in {1, 2, 4, 8,
    16}, bf16 and fp16, both reductions) compiled for sm_90a: no spills, and each config's blocks_per_sm within the
    occupancy its registers and shared memory allow (else a 'one wave' plan would run as two)."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")
    table = tmp_path / "gemv.json"
    run = run_without_interpreter(["-m", "qwen2vl_fast.kernels.aot_sweep", "--families", "gemv_splitk", "--presets",
                                   "qwen2-vl-2b", "qwen2-vl-7b", "--workers", "2", "--json", str(table)], tmp_path)
    assert table.exists(), f"the sweep did not finish (exit {run.returncode}):\n{run.stderr[-4000:]}"
    rows = json.loads(table.read_text())
    assert rows and not [r for r in rows if r["problems"]], [r["problems"] for r in rows if r["problems"]]
    configs = {(1, False): gs._GEMV, (1, True): gs._GEMV_DUAL, (16, False): gs._MMA, (16, True): gs._MMA_DUAL}
    seen = set()
    for row in rows:
        if row["kernel"] != "_gemv_splitk_kernel":
            continue
        c = row["config"]
        key = (int(re.search(r"BLOCK_M=(\d+)", c).group(1)), "ACT=3" in c)
        cfg = configs[key]
        assert f"warps={cfg.num_warps} " in c
        seen.add(key)
        allowed = gs.resident_blocks(row["regs"], row["shared"], cfg.num_warps)
        assert cfg.blocks_per_sm <= allowed, (c, row["regs"], row["shared"], allowed)
    assert seen == set(configs)
