"""Shared by the Triton kernel tests: cross-compiling kernels for sm_90 without a GPU."""

import json
import os
import subprocess
import sys

import pytest

_SM90_COMPILER = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
jobs, ptx = json.load(open(sys.argv[1])), []
for module, kernel, signature, constexprs, num_warps, aligned in jobs:
    fn = getattr(importlib.import_module(module), kernel)
    names = list(signature)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                    attrs={(names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    ptx.append(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"])
json.dump(ptx, open(sys.argv[1], "w"))
"""


def ptx_for_sm90(jobs, tmp_path):
    """Cross-compile kernels for sm_90 with Triton's bundled LLVM and ptxas (no GPU needed) and return their PTX:
    catches what the interpreter cannot (compile errors, lost vectorisation). Each job is (module, kernel,
    signature, constexprs, num_warps, aligned): `aligned` names the arguments Triton sees as multiples of 16 at
    a real launch. Runs in a subprocess without TRITON_INTERPRET (under it, tl.sum and friends are interpreter
    functions); uses Triton internals (ASTSource), as of the pinned 3.6."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(jobs))
    run = subprocess.run([sys.executable, "-c", _SM90_COMPILER, str(path)], env=_compiling_env(), capture_output=True,
                         text=True, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(path.read_text())


def _compiling_env() -> dict:
    """This process's environment without TRITON_INTERPRET: Triton picks the interpreter or the compiler when a
    kernel module is imported, so compiling needs a fresh process."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run_without_interpreter(args, tmp_path, timeout=1800):
    """`python *args` in a subprocess with compiled Triton kernels and a Triton cache of its own under tmp_path
    (the user's cache is left alone)."""
    env = dict(_compiling_env(), TRITON_CACHE_DIR=str(tmp_path / "triton_cache"))
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
