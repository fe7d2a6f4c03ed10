"""Every Triton kernel launch of the real presets, compiled ahead of time for Hopper (sm_90a) without a GPU.

The sweep (qwen2vl_fast/kernels/aot_sweep.py) calls each kernel family's launcher at the real presets' shapes
in bf16 and fp16, so the tile configs are the launchers' own picks, dedupes the resulting specialisations and
compiles each once with Triton's bundled LLVM and ptxas. The test fails on any kernel that does not compile,
spills, needs more than 227 KB of shared memory, or more registers than the register file holds for its
threads, and names every such kernel with the workloads that launch it. With -s it prints the worst cases;
the whole table is written to aot_sm90.json under the test's tmp dir.
"""

import json

import pytest

from helpers_triton import run_without_interpreter
from qwen2vl_fast.kernels.aot_sweep import REGISTER_FILE, SMEM_LIMIT, describe, worst_by_family


def _register_share(row) -> float:
    return row["regs"] * row["threads"] / REGISTER_FILE


def _top(rows, key, count):
    """The `count` largest rows by `key`, one per kernel and launch config across dtypes (bf16 / fp16 twins)."""
    seen, top = set(), []
    for row in sorted(rows, key=key, reverse=True):
        config = (row["kernel"], row["config"].split(" ", 1)[-1])
        if config not in seen and len(top) < count:
            seen.add(config)
            top.append(row)
    return top


def _print_worst(rows, count=8):
    compiled = [row for row in rows if "error" not in row]
    print(f"\n{len(rows)} kernels compiled for sm_90a; per family, the most registers and shared memory:")
    for family, (regs, smem) in sorted(worst_by_family(rows).items()):
        print(f"  {family:18s} {regs:3d} registers  {smem / 1024:6.1f} KB shared")
    print(f"largest register-file shares (registers x threads / {REGISTER_FILE}):")
    for row in _top(compiled, _register_share, count):
        print(f"  {_register_share(row):.2f}  " + describe(row))
    print(f"largest shared memory (limit {SMEM_LIMIT} B):")
    for row in _top(compiled, lambda r: r["shared"], count):
        print("  " + describe(row))


def test_every_kernel_launch_fits_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")
    table = tmp_path / "aot_sm90.json"
    run = run_without_interpreter(["-m", "qwen2vl_fast.kernels.aot_sweep", "--workers", "2", "--json", str(table)],
                                  tmp_path)
    assert table.exists(), f"the sweep did not finish (exit {run.returncode}):\n{run.stderr[-4000:]}"
    rows = json.loads(table.read_text())
    _print_worst(rows)
    failing = [row for row in rows if row["problems"]]
    assert not failing, (f"{len(failing)} of {len(rows)} sm_90a kernels break a limit (table: {table}):\n"
                         + "\n".join(describe(row) for row in failing))
