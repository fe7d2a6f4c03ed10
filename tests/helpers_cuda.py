"""Host replay of CUDA C++ kernels: build a host program that includes kernel files from csrc/ and load it.

The kernel files keep what a thread does in __host__ __device__ functions; a replay program (written by the
test) runs them thread by thread on the CPU with the launcher's own geometry. nvcc compiles it with PTX only for
the device side (ptxas is not needed to replay) and -ffp-contract=off, so the host compiler fuses no a*b+c
either (the kernels' device side never does).
"""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")


def build_host_replay(source: str, build_dir: Path, name: str = "replay") -> ctypes.CDLL:
    """Compile `source` (C++/CUDA including csrc/ files) into a shared library under `build_dir` and load it.
    Skips the test when nvcc is missing; fails it with the compiler's message when the build fails."""
    if NVCC is None:
        pytest.skip("nvcc not on PATH")
    src, lib = build_dir / f"{name}.cu", build_dir / f"lib{name}.so"
    src.write_text(source)
    cmd = [NVCC, "-std=c++17", "-O2", "-gencode", "arch=compute_90,code=compute_90", "-shared",
           "-Xcompiler", "-fPIC,-ffp-contract=off", f"-I{CSRC}", str(src), "-o", str(lib)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{name} build failed:\n{result.stderr}"
    return ctypes.CDLL(str(lib))
