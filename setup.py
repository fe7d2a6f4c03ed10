"""Build qwen2vl_fast: the Python package, the Triton kernels (`kernels/` -> `qwen2vl_fast.kernels`) and,
where a CUDA build of torch and an nvcc of the same CUDA major are present, the CUDA C++ extension
`qwen2vl_fast._C` from `csrc/`.

The extension is optional: without a CUDA torch, without nvcc, with an nvcc of another CUDA major than torch's,
or when its compilation fails, setup prints one line "qwen2vl_fast: skipping the CUDA extension ... (reason)"
and installs everything else (the Triton kernels never need `_C`). Build it with
`pip install --no-build-isolation -e .` so the build sees the installed torch.
Environment: QWEN2VL_FAST_NO_CUDA=1 skips the extension; QWEN2VL_FAST_REQUIRE_CUDA_EXT=1 turns any skip into
an error (GPU machines, where a missing `_C` must not go unseen); QWEN2VL_FAST_CUDA_ARCHS (default "80;90a")
picks the SASS targets.
"""

import contextlib
import glob
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Optional

from setuptools import setup

EXTENSION = "qwen2vl_fast._C"

# No pins that fight torch: each torch release pins its own triton (2.13 -> 3.6, 2.14 -> 3.8), so [test] accepts
# any Triton 3. The CPU torch pulls none; .ci/run installs the one the interpreter tests are pinned to first.
SERVE = ["fastapi>=0.110", "uvicorn>=0.30"]
EXTRAS = {
    # [test] includes the server's dependencies and the openai client its tests drive it with
    "test": ["pytest>=7", "pytest-benchmark", "transformers==4.57.6", "triton>=3.0; platform_system == 'Linux'",
             *SERVE, "openai>=1.40", "httpx", "matplotlib"],
    # the kernel microbenchmark suites (`pytest bench --benchmark-only`) and their report (`python -m bench.report`)
    "bench": ["pytest>=7", "pytest-benchmark", "matplotlib"],
    "serve": SERVE,
    "triton": ["triton>=3.0"],
    "build": ["pybind11", "ninja"],
}


def skip_line(reason: str) -> str:
    return f"qwen2vl_fast: skipping the CUDA extension {EXTENSION} ({reason})"


def extension_required() -> bool:
    return os.environ.get("QWEN2VL_FAST_REQUIRE_CUDA_EXT") == "1"


@dataclass(frozen=True)
class CudaSituation:
    """What decides whether `_C` can be built here: torch's version and CUDA release (None: CPU-only, or torch
    missing), torch's CUDA_HOME nvcc (None: not found) and the release that nvcc reports."""

    no_cuda_env: bool = False
    torch_version: Optional[str] = None
    torch_cuda: Optional[str] = None
    nvcc: Optional[str] = None
    nvcc_release: Optional[str] = None


def _major(release: str) -> str:
    return release.split(".")[0]


def skip_reason(s: CudaSituation) -> Optional[str]:
    """Why `_C` cannot be built in situation `s`, or None when it should be. torch's BuildExtension raises on
    these instead (a CUDA major mismatch included), which would fail the whole install."""
    if s.no_cuda_env:
        return "QWEN2VL_FAST_NO_CUDA is set"
    if s.torch_version is None:
        return "torch is not importable in the build environment; use pip install --no-build-isolation"
    if s.torch_cuda is None:
        return f"torch {s.torch_version} is not a CUDA build"
    if s.nvcc is None:
        return f"no nvcc found for torch's CUDA {s.torch_cuda} (set CUDA_HOME or put nvcc on PATH)"
    if s.nvcc_release is None:
        return f"{s.nvcc} --version reports no CUDA release"
    if _major(s.nvcc_release) != _major(s.torch_cuda):
        return f"{s.nvcc} is CUDA {s.nvcc_release}, torch {s.torch_version} was built with CUDA {s.torch_cuda}"
    return None


def nvcc_release(nvcc: str) -> Optional[str]:
    """'13.0' from `nvcc --version`, or None when it cannot be run or read."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def probe() -> CudaSituation:
    """This environment's situation. The nvcc that counts is the one torch's build uses: CUDA_HOME/bin/nvcc."""
    if os.environ.get("QWEN2VL_FAST_NO_CUDA"):
        return CudaSituation(no_cuda_env=True)
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return CudaSituation()
    if torch.version.cuda is None:
        return CudaSituation(torch_version=torch.__version__)
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if nvcc is None or not os.path.exists(nvcc):
        return CudaSituation(torch_version=torch.__version__, torch_cuda=torch.version.cuda)
    return CudaSituation(torch_version=torch.__version__, torch_cuda=torch.version.cuda, nvcc=nvcc,
                         nvcc_release=nvcc_release(nvcc))


def skip(reason: str):
    """No extension: one line, or an error where the extension is required."""
    if extension_required():
        raise SystemExit(f"qwen2vl_fast: QWEN2VL_FAST_REQUIRE_CUDA_EXT=1 but {skip_line(reason)}")
    print(skip_line(reason), flush=True)
    return [], {}


@contextlib.contextmanager
def _failures_skip_the_extension():
    """Any error of the build, whichever layer raised it, means the same here: no _C, and the install goes on."""
    try:
        yield
    except Exception as e:
        if extension_required():
            raise
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        print(skip_line(f"the build failed: {type(e).__name__}: {first[:160]}; the compiler's output is above"),
              flush=True)


def optional_build_ext(base):
    """`base` (torch's BuildExtension) whose failures skip the extension instead of failing the install.
    setuptools' `optional=True` alone is not enough: torch raises RuntimeError, FileNotFoundError or
    CalledProcessError (its CUDA and compiler version checks before any extension, ninja per extension), which
    setuptools does not filter."""

    class OptionalBuildExt(base):
        def build_extensions(self):  # torch's version checks run here, before the per-extension loop
            with _failures_skip_the_extension():
                super().build_extensions()

        def build_extension(self, ext):
            with _failures_skip_the_extension():
                super().build_extension(ext)

    return OptionalBuildExt


def cuda_extension():
    """(ext_modules, cmdclass) for setup(): the extension where it can be built, nothing otherwise."""
    reason = skip_reason(probe())
    if reason is not None:
        return skip(reason)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True))
    archs = os.environ.get("QWEN2VL_FAST_CUDA_ARCHS", "80;90a").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    ext = CUDAExtension(
        name=EXTENSION,
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3"],  # the C++ standard: whatever torch builds with
                            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", *gencode]},
        optional=True,  # an editable install then copies no missing .so into the package
    )
    return [ext], {"build_ext": optional_build_ext(BuildExtension)}


# setuptools runs this file as __main__ (pip's build backend and `python setup.py`); tests import it for the
# functions above without running setup().
if __name__ == "__main__":
    ext_modules, cmdclass = cuda_extension()
    setup(
        name="qwen2vl_fast",
        version="0.1.0",
        description="A custom-kernel inference engine for Qwen2-VL and Qwen2.5-VL",
        python_requires=">=3.10",
        # `kernels` must never be importable at the top level: a PyPI package of that name exists and
        # transformers imports it when found. It installs as the subpackage qwen2vl_fast.kernels.
        packages=["qwen2vl_fast", "qwen2vl_fast.engine", "qwen2vl_fast.ops", "qwen2vl_fast.processing",
                  "qwen2vl_fast.quant", "qwen2vl_fast.server", "qwen2vl_fast.hf_patch", "qwen2vl_fast.testing",
                  "qwen2vl_fast.kernels"],
        package_dir={"qwen2vl_fast.kernels": "kernels"},
        install_requires=["torch>=2.4", "safetensors>=0.4", "numpy", "tokenizers>=0.19", "tqdm", "pillow", "av"],
        extras_require=EXTRAS,
        entry_points={"console_scripts": ["qwen2vl-fast=qwen2vl_fast.cli:main"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
