"""Build qwen2vl_fast: the Python package, the Triton kernels (`kernels/` -> `qwen2vl_fast.kernels`) and,
where a CUDA build of torch and nvcc are present, the CUDA C++ extension `qwen2vl_fast._C` from `csrc/`.

On a CPU-only machine the extension is skipped with one line and everything else installs. Build the
extension with `pip install --no-build-isolation -e .` so the build sees the installed torch.
Environment: QWEN2VL_FAST_NO_CUDA=1 skips the extension; QWEN2VL_FAST_CUDA_ARCHS (default "80;90a") picks
the SASS targets.
"""

import glob
import os
import shutil

from setuptools import setup


def _skip(reason):
    print(f"qwen2vl_fast: skipping the CUDA extension qwen2vl_fast._C ({reason})")
    return [], {}


def cuda_extension():
    if os.environ.get("QWEN2VL_FAST_NO_CUDA"):
        return _skip("QWEN2VL_FAST_NO_CUDA is set")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return _skip("torch is not importable in the build environment; use pip install --no-build-isolation")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is a CPU-only build")
    if CUDA_HOME is None or not (shutil.which("nvcc") or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))):
        return _skip("nvcc / CUDA_HOME not found")
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True))
    archs = os.environ.get("QWEN2VL_FAST_CUDA_ARCHS", "80;90a").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    ext = CUDAExtension(
        name="qwen2vl_fast._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3"],  # the C++ standard: whatever torch builds with
                            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", *gencode]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()

setup(
    name="qwen2vl_fast",
    version="0.1.0",
    description="A custom-kernel inference engine for Qwen2-VL and Qwen2.5-VL",
    python_requires=">=3.10",
    # `kernels` must never be importable at the top level: a PyPI package of that name exists and
    # transformers imports it when found. It installs as the subpackage qwen2vl_fast.kernels.
    packages=["qwen2vl_fast", "qwen2vl_fast.engine", "qwen2vl_fast.ops", "qwen2vl_fast.processing", "qwen2vl_fast.quant",
              "qwen2vl_fast.testing", "qwen2vl_fast.kernels"],
    package_dir={"qwen2vl_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "safetensors>=0.4", "numpy", "tokenizers>=0.19", "tqdm", "pillow", "av"],
    extras_require={"test": ["pytest>=7", "pytest-benchmark", "transformers==4.57.6",
                             "triton==3.6.0; platform_system == 'Linux'"],
                    "triton": ["triton>=3.0"], "build": ["pybind11", "ninja"]},
    entry_points={"console_scripts": ["qwen2vl-fast=qwen2vl_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
