"""setup.py: the CUDA extension is optional and never breaks an install; the [test] extra resolves next to torch.

The decision (`skip_reason`) is fed fake torch / nvcc situations directly; setup.py itself then runs end to end
(`setup.py build_ext`, in a subprocess) on a fake torch package and a fake nvcc: a missing nvcc, an nvcc of
another CUDA major, a failing build. Each must finish with one "skipping the CUDA extension" line and no `_C`,
and fail only under QWEN2VL_FAST_REQUIRE_CUDA_EXT=1. Also: no extra pins triton against torch's own pin, and
the Triton kernels import without `_C`. CPU only, offline (pip's resolution itself is checked by hand:
`pip install --dry-run -e ".[test]" torch==2.14.1`, which needs an index).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from helpers_cuda import ROOT, setup_py
from packaging.requirements import Requirement

SKIP = "qwen2vl_fast: skipping the CUDA extension qwen2vl_fast._C ("
NVCC_12_4 = "Cuda compilation tools, release 12.4, V12.4.131"  # what `nvcc --version` ends with
NVCC_13_0 = "Cuda compilation tools, release 13.0, V13.0.88"


# ---- the decision ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("situation, expected", [
    (dict(), "torch is not importable"),
    (dict(no_cuda_env=True, torch_version="2.14.1", torch_cuda="13.0"), "QWEN2VL_FAST_NO_CUDA is set"),
    (dict(torch_version="2.13.0+cpu"), "torch 2.13.0+cpu is not a CUDA build"),
    (dict(torch_version="2.14.1", torch_cuda="13.0"), "no nvcc found for torch's CUDA 13.0"),
    (dict(torch_version="2.14.1", torch_cuda="13.0", nvcc="/x/nvcc"), "/x/nvcc --version reports no CUDA release"),
    (dict(torch_version="2.14.1", torch_cuda="13.0", nvcc="/x/nvcc", nvcc_release="12.8"),
     "/x/nvcc is CUDA 12.8, torch 2.14.1 was built with CUDA 13.0"),
    (dict(torch_version="2.14.1", torch_cuda="13.0", nvcc="/x/nvcc", nvcc_release="13.2"), None),  # minor: a warning
    (dict(torch_version="2.14.1", torch_cuda="13.0", nvcc="/x/nvcc", nvcc_release="13.0"), None),
])
def test_skip_reason(situation, expected):
    build = setup_py()
    reason = build.skip_reason(build.CudaSituation(**situation))
    assert reason is None if expected is None else reason.startswith(expected), reason


def _fake_nvcc(directory, output):
    nvcc = directory / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho '{output}'\n")
    nvcc.chmod(0o755)
    return str(nvcc)


def test_nvcc_release(tmp_path):
    read = setup_py().nvcc_release
    assert read(_fake_nvcc(tmp_path / "a", NVCC_12_4)) == "12.4"
    assert read(_fake_nvcc(tmp_path / "b", "not a compiler")) is None
    assert read(str(tmp_path / "missing" / "nvcc")) is None


class _FailingBuild:
    """Stands in for torch's BuildExtension: fails the way it does."""

    def __init__(self, where):
        self.where = where

    def build_extensions(self):
        if self.where == "checks":  # torch's CUDA / compiler version checks, before any extension
            raise RuntimeError("\nThe detected CUDA version (12.8) mismatches the version that was used to compile\n")
        self.build_extension("qwen2vl_fast._C")

    def build_extension(self, ext):
        raise subprocess.CalledProcessError(1, ["ninja", "-v"])


@pytest.mark.parametrize("where", ["checks", "extension"])
def test_a_failed_build_is_one_line(where, capsys, monkeypatch):
    monkeypatch.delenv("QWEN2VL_FAST_REQUIRE_CUDA_EXT", raising=False)
    builder = setup_py().optional_build_ext(_FailingBuild)(where)
    builder.build_extensions()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(SKIP + "the build failed: "), lines
    assert ("RuntimeError: The detected CUDA version (12.8)" if where == "checks" else "CalledProcessError") in lines[0]
    monkeypatch.setenv("QWEN2VL_FAST_REQUIRE_CUDA_EXT", "1")
    with pytest.raises((RuntimeError, subprocess.CalledProcessError)):
        builder.build_extensions()


# ---- setup.py end to end, on a fake torch ---------------------------------------------------------------------

_FAKE_TORCH = {
    "torch/__init__.py": """
        import os
        __version__ = "2.14.1+fake"
        class version:
            cuda = os.environ.get("FAKE_TORCH_CUDA") or None
        """,
    "torch/utils/__init__.py": "",
    "torch/utils/cpp_extension.py": """
        import os
        from setuptools import Extension
        from setuptools.command.build_ext import build_ext
        CUDA_HOME = os.environ.get("FAKE_CUDA_HOME") or None

        def CUDAExtension(name, sources, extra_compile_args=None, **kwargs):
            return Extension(name, sources, language="c++", **kwargs)

        class BuildExtension(build_ext):
            def build_extension(self, ext):  # what torch raises when ninja fails
                raise RuntimeError("Error compiling objects for extension")
        """,
}


def _run_setup(tmp_path, torch_cuda, nvcc_output=None, require=False):
    """`setup.py build_ext` from the repository root with the fake torch first on the path; outputs in tmp_path."""
    fake = tmp_path / "fake"
    for name, text in _FAKE_TORCH.items():
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text(textwrap.dedent(text))
    cuda_home = tmp_path / "cuda"
    if nvcc_output is not None:
        _fake_nvcc(cuda_home, nvcc_output)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QWEN2VL_FAST_", "CUDA_"))}
    env.update(PYTHONPATH=str(fake), FAKE_TORCH_CUDA=torch_cuda or "", FAKE_CUDA_HOME=str(cuda_home))
    if require:
        env["QWEN2VL_FAST_REQUIRE_CUDA_EXT"] = "1"
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp",
           str(tmp_path / "tmp")]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("torch_cuda, nvcc_output, reason", [
    (None, None, "torch 2.14.1+fake is not a CUDA build"),
    ("13.0", None, "no nvcc found for torch's CUDA 13.0"),
    ("13.0", NVCC_12_4, "is CUDA 12.4, torch 2.14.1+fake was built with CUDA 13.0"),
    ("13.0", NVCC_13_0, "the build failed: RuntimeError: Error compiling objects"),
], ids=["cpu-torch", "no-nvcc", "nvcc-major-mismatch", "failing-build"])
def test_setup_finishes_without_the_extension(tmp_path, torch_cuda, nvcc_output, reason):
    run = _run_setup(tmp_path, torch_cuda, nvcc_output)
    assert run.returncode == 0, run.stderr[-3000:]
    skips = [line for line in run.stdout.splitlines() if line.startswith(SKIP)]
    assert len(skips) == 1 and reason in skips[0], run.stdout
    assert not list(tmp_path.glob("lib/**/_C*")), "no extension may be left behind"


def test_setup_fails_where_the_extension_is_required(tmp_path):
    run = _run_setup(tmp_path, "13.0", NVCC_13_0, require=True)
    assert run.returncode != 0 and "Error compiling objects for extension" in run.stderr
    run = _run_setup(tmp_path, None, require=True)
    assert run.returncode != 0 and "QWEN2VL_FAST_REQUIRE_CUDA_EXT=1 but" in run.stderr


# ---- what installs next to torch --------------------------------------------------------------------------------

def test_test_extra_admits_the_triton_each_torch_pins():
    """[test] must resolve next to any supported torch: each pins its own triton (torch 2.13 -> 3.6.0, the CI's;
    torch 2.14 -> 3.8.0), so no extra may pin triton or torch."""
    extras = setup_py().EXTRAS
    for extra, requirements in extras.items():
        for req in map(Requirement, requirements):
            if req.name in ("triton", "torch"):
                assert not any(s.operator in ("==", "===", "~=") for s in req.specifier), (extra, str(req))
    (triton,) = [r for r in map(Requirement, extras["test"]) if r.name == "triton"]
    assert all(triton.specifier.contains(v) for v in ("3.6.0", "3.8.0")), str(triton)


def test_triton_kernels_import_without_the_extension():
    """Every kernels/ module and the op registry import while qwen2vl_fast._C cannot be imported (as in CPU CI, and
    even where it is built: the import is blocked here)."""
    code = textwrap.dedent("""
        import importlib, json, pkgutil, sys
        sys.modules["qwen2vl_fast._C"] = None  # any `import qwen2vl_fast._C` now raises ImportError
        import qwen2vl_fast.kernels as kernels
        names = [m.name for m in pkgutil.iter_modules(kernels.__path__)]
        for name in names:
            importlib.import_module(f"qwen2vl_fast.kernels.{name}")
        import qwen2vl_fast.ops as ops
        ops.resolve("triton", "cpu")
        print(json.dumps(names))
        """)
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert {"gemm", "quant_gemm", "varlen_attention"} <= set(json.loads(run.stdout.splitlines()[-1]))


def test_setup_lists_every_subpackage():
    """setup.py names its packages explicitly (kernels/ installs as qwen2vl_fast.kernels): a new subpackage
    missing from the list would be absent from a wheel, though an editable install still finds it."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "setup.py").read_text()
    listed = set(re.findall(r'"(qwen2vl_fast(?:\.\w+)*)"', text.split("packages=", 1)[1].split("]", 1)[0]))
    found = {"qwen2vl_fast." + p.parent.name for p in (root / "qwen2vl_fast").glob("*/__init__.py")}
    assert found | {"qwen2vl_fast", "qwen2vl_fast.kernels"} <= listed, sorted(found - listed)
