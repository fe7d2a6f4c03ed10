"""pytest-benchmark suites of the kernel microbenchmarks: `pytest bench --benchmark-only` (bench/README.md).

Every op of the registry at the released models' real shapes and per dtype, ours against the best PyTorch
alternatives, timed with the project's harness (bench/pytest_suite.py). Without a CUDA device the same command runs
every case at tiny shapes on the CPU, as a smoke run (marked as such in the output and the JSON).

Options (besides pytest-benchmark's own): --bench-suites gemm,vision,llm,quant,ops; --bench-dtypes bfloat16,float16
(default bfloat16 on CUDA, float32 on the CPU); --bench-smoke (tiny shapes on a GPU too); --bench-reps N (samples per
candidate: 30 on CUDA, 3 on the CPU); --bench-warmup N; --bench-no-compile; --bench-no-auto; --bench-device;
--bench-budget-s (the run's; default $QWEN2VL_FAST_BENCH_BUDGET_S) and --bench-case-budget-s.
Each suite is a marker as well (`-m gemm`).

This conftest only governs bench/: `pytest tests` (the default, pyproject's testpaths) never loads it.
"""

import os

import torch

# Without CUDA, Triton kernels run under the interpreter; it must be set before any kernel module is imported
# (as tests/conftest.py does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from bench import suites  # noqa: E402
from bench.pytest_suite import BenchContext  # noqa: E402

_CTX_KEY = pytest.StashKey[BenchContext]()


def pytest_addoption(parser):
    g = parser.getgroup("qwen2vl_fast bench", "qwen2vl_fast kernel microbenchmarks (bench/)")
    g.addoption("--bench-suites", default=None, help=f"comma-separated, of {','.join(suites.SUITES)} (default all)")
    g.addoption("--bench-dtypes", default=None,
                help="comma-separated, of bfloat16,float16,float32 (default bfloat16 on CUDA, float32 on the CPU)")
    g.addoption("--bench-smoke", action="store_true", help="tiny shapes on a GPU too (always so without one)")
    g.addoption("--bench-reps", type=int, default=None, help="harness samples per candidate (30 CUDA, 3 CPU)")
    g.addoption("--bench-warmup", type=int, default=None, help="untimed calls per candidate (5 CUDA, 1 CPU)")
    g.addoption("--bench-no-compile", action="store_true", help="leave out the torch.compile alternatives")
    g.addoption("--bench-no-auto", action="store_true", help="leave out the measured dispatch ('auto')")
    g.addoption("--bench-device", default=None, help="default: cuda when there is one, else cpu")
    g.addoption("--bench-budget-s", type=float, default=None,
                help="seconds for the whole run: cases that come up later are skipped, the JSON still written "
                     "(default: $QWEN2VL_FAST_BENCH_BUDGET_S, else none)")
    g.addoption("--bench-case-budget-s", type=float, default=None,
                help="seconds per case: its candidates that come up later are skipped (default: none)")


def pytest_configure(config):
    for suite in suites.SUITES:
        config.addinivalue_line("markers", f"{suite}: the {suite} microbenchmark suite (bench/suites.py)")
    config.stash[_CTX_KEY] = BenchContext.from_config(config)


def bench_context(config) -> BenchContext:
    return config.stash[_CTX_KEY]


def pytest_report_header(config):
    return bench_context(config).banner()


def pytest_generate_tests(metafunc):
    if {"case_id", "impl"} <= set(metafunc.fixturenames):
        params = [pytest.param(cid, impl, id=f"{cid}-{impl}", marks=getattr(pytest.mark, suite))
                  for cid, impl, suite in bench_context(metafunc.config).params()]
        metafunc.parametrize(("case_id", "impl"), params)


@pytest.fixture(scope="session")
def bench_ctx(request) -> BenchContext:
    return bench_context(request.config)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["qwen2vl_fast"] = bench_context(config).machine_info()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    ctx = bench_context(config)
    output_json["qwen2vl_fast"] = dict(smoke=ctx.smoke, smoke_reason=ctx.why_smoke or None,
                                       note=ctx.banner())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_line(bench_context(config).banner(), yellow=bench_context(config).smoke, bold=True)
