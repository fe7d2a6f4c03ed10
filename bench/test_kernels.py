"""Every op's microbenchmark as a pytest-benchmark test: `pytest bench --benchmark-only` (bench/conftest.py).

One test per (case, candidate): the case (bench/suites.py: op, real shape, dtype) is timed as a whole with the
harness's method the first time one of its tests runs; each test hands its candidate's samples to pytest-benchmark
and records TFLOP/s, GB/s, % of the measured roofline and the speedup over the best PyTorch alternative in
extra_info (bench/pytest_suite.py).
"""


def test_kernel(benchmark, bench_ctx, case_id, impl):
    bench_ctx.run(benchmark, case_id, impl)
