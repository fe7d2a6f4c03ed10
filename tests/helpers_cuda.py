"""Shared by the CUDA C++ tests: host replay of kernel files, and the Torch bindings to call on meta tensors.

Host replay: a host program that includes kernel files from csrc/ keeps what a thread does in __host__ __device__
functions; a replay program (written by the test) runs them thread by thread on the CPU with the launcher's own
geometry. nvcc compiles it with PTX only for the device side (ptxas is not needed to replay) and
-ffp-contract=off, so the host compiler fuses no a*b+c either (the kernels' device side never does).

Bindings (`binding_ops`): with a CUDA torch, the real nvcc-built extension qwen2vl_fast._C; with a CPU-only torch,
the binding .cpp files compiled here with g++ against launcher stubs. Either way torch.ops.qwen2vl_fast then has
the schemas, the Meta kernels and the Torch-side checks, which run on meta tensors without a GPU.
"""

import ctypes
import functools
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
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


# ---- the bindings ---------------------------------------------------------------------------------------------

@functools.cache
def setup_py():
    """The repository's setup.py as a module (setup() runs only as __main__): the build's own decision about _C."""
    spec = importlib.util.spec_from_file_location("qwen2vl_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_ops():
    """torch.ops.qwen2vl_fast after importing the built extension qwen2vl_fast._C.

    A missing _C skips the test only where setup.py would not build it (no CUDA torch, no nvcc, an nvcc of another
    CUDA major, QWEN2VL_FAST_NO_CUDA): anywhere else it is a failed build, and fails the test rather than turning
    it into a skip. With QWEN2VL_FAST_REQUIRE_CUDA_EXT=1 (GPU runs) every missing _C fails."""
    try:
        from qwen2vl_fast import _C  # noqa: F401
    except ImportError as e:
        build = setup_py()
        reason = build.skip_reason(build.probe())
        if reason is None or build.extension_required():
            pytest.fail(f"qwen2vl_fast._C is not importable ({e}) although "
                        f"{'QWEN2VL_FAST_REQUIRE_CUDA_EXT=1' if reason else 'torch and nvcc here can build it'}: "
                        "reinstall with `pip install --no-build-isolation -e .` and read its "
                        f"'skipping the CUDA extension' line{f' ({reason})' if reason else ''}")
        pytest.skip(f"the CUDA extension qwen2vl_fast._C is not built here: {reason}")
    return torch.ops.qwen2vl_fast


# Stand-ins for the launchers (the kernels cannot run on the CPU): with them, the binding files link against a
# CPU-only torch. Declared through kernels.h, so a signature drift between header and binding fails to link.
_LAUNCHER_STUBS = r"""
#include "kernels.h"
namespace qwen2vl_fast {
int qwen2vl_rotary_2d(void*, const float*, const float*, int64_t, int, int, int64_t, int, cudaStream_t) {
  return kLaunchFailed;
}
int qwen2vl_patch_gather(const uint8_t*, void*, int64_t, int, int64_t, int64_t, const float*, const float*, int, int,
                         int, int, cudaStream_t) {
  return kLaunchFailed;
}
int qwen2vl_quant_decode_workspace(int64_t, int64_t, int64_t, int, int64_t, int, int64_t*, int64_t*) {
  return kLaunchFailed;
}
int qwen2vl_quant_gemm_decode(const void*, int64_t, const int32_t*, const void*, const void*, const void*, void*,
                              float*, int64_t, int32_t*, int64_t, int64_t, int64_t, int64_t, int, int64_t, int,
                              cudaStream_t) {
  return kLaunchFailed;
}
int qwen2vl_quant_marlin_workspace(int64_t, int64_t, int64_t, int, int64_t, int, int64_t*, int64_t*) {
  return kLaunchFailed;
}
int qwen2vl_quant_gemm_marlin(const void*, int64_t, const int32_t*, const void*, const void*, const void*, void*,
                              float*, int64_t, int32_t*, int64_t, int64_t, int64_t, int64_t, int, int64_t, int,
                              cudaStream_t) {
  return kLaunchFailed;
}
}  // namespace qwen2vl_fast
"""

_CPU_BINDING = {}  # built once per test session: 20 s of g++ on torch's headers


def _build_cpu_binding(build: Path):
    """csrc/*.cpp but the module file bindings.cpp, compiled with g++ against this CPU-only torch and the stubs,
    loaded into torch.ops.qwen2vl_fast."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not on PATH (needed to build the bindings against a CPU-only torch)")
    from torch.utils.cpp_extension import include_paths

    (build / "stubs.cpp").write_text(_LAUNCHER_STUBS)
    lib = build / "libbindings_cpu.so"
    sources = [str(p) for p in sorted(CSRC.glob("*.cpp")) if p.name != "bindings.cpp"]
    torch_lib = Path(torch.__file__).parent / "lib"
    cmd = [gxx, "-std=c++17", "-O0", "-w", "-shared", "-fPIC", *[f"-I{p}" for p in include_paths()], f"-I{CSRC}",
           *sources, str(build / "stubs.cpp"), f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch",
           "-o", str(lib)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the bindings do not build against torch {torch.__version__}:\n{result.stderr}"
    torch.ops.load_library(str(lib))
    return torch.ops.qwen2vl_fast


def binding_ops(tmp_path_factory):
    """torch.ops.qwen2vl_fast with the bindings' schemas, Meta kernels and checks: the real extension where torch
    has CUDA (`extension_ops`), the g++-built bindings where it is CPU-only."""
    if torch.version.cuda is not None:
        return extension_ops()
    if "ops" not in _CPU_BINDING:
        _CPU_BINDING["ops"] = _build_cpu_binding(tmp_path_factory.mktemp("binding"))
    return _CPU_BINDING["ops"]


# ---- CUDA tensors without a GPU ---------------------------------------------------------------------------------

class StoragelessCuda(torch.Tensor):
    """A tensor on "cuda:0" with sizes, strides, offset and dtype but no storage, made without a GPU. An op on it
    goes straight to the op's CUDA kernel (the Autograd and ADInplaceOrView keys run first, as for a real CUDA
    tensor): the binding's Torch-side checks run as they do on the GPU, with the real device, views and strides,
    and a call that passes them fails at its first data_ptr(), before any CUDA call. Other ops are refused."""

    @staticmethod
    def __new__(cls, size, dtype, strides=None, offset=0):
        size = tuple(size)
        if strides is None:
            strides, acc = [], 1
            for s in reversed(size):
                strides.insert(0, acc)
                acc *= max(s, 1)
        return torch.Tensor._make_wrapper_subclass(cls, size, strides=tuple(strides), storage_offset=offset,
                                                   dtype=dtype, device="cuda:0")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func.namespace != "qwen2vl_fast":
            raise NotImplementedError(f"StoragelessCuda runs only the qwen2vl_fast ops, not {func}")
        return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args, **(kwargs or {}))
