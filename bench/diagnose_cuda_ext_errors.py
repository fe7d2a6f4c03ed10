"""Which bad-input calls of the CUDA extension crash instead of raising, and why: one GPU call of ~30 s.

The first H200 run (torch 2.11, _C built there) segfaulted in three GPU tests where a binding's TORCH_CHECK fails
(bench/results/gpu_check-nvidia-h200-20261130.md): `rotary_2d_(qkv[:, :-6], ...)` crashed, a wrong cos dtype on
a contiguous qkv raised. Two explanations fit that pair and the other two tests: the argument is a view, or the
failing check's message formats an integer (head_dim 79; frame size 50x56; 17 rows), where the raising one formats
only names and dtypes (an integer goes through the extension's inline iostream code, so a libstdc++ that differs
from the one the extension was compiled against would fault there). On the CPU (torch 2.13 / 2.14, the real _C on
storage-less CUDA tensors: tests/test_cuda_ext.py::test_cuda_kernels_reject_bad_input_without_a_gpu) every call
raises. Each case below runs in its own process (a crash loses only that case) and separates the two: views without
integers, integers without views, the Meta kernels (same checks, no CUDA), a libtorch error with integers.

Since then the bindings build every message with msg() (csrc/binding_utils.h: std::to_string, no iostreams), so
the integer explanation is answered in code: if every case now raises, that was it (or the crash went with it);
a view case that still crashes while its contiguous twin raises points at the views.

    python bench/diagnose_cuda_ext_errors.py            # the table, and a JSON with the environment ($OUT if set)
    python bench/diagnose_cuda_ext_errors.py --case NAME  # one case in this process (what the driver runs)

For a crashing case it also prints the native stack where gdb is installed (else the Python one, faulthandler).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cases(torch, ops, dev):
    """{name: zero-argument call} (what each separates: _WHAT); every call must raise RuntimeError."""
    bf16, f32, h, d, s = torch.bfloat16, torch.float32, 2, 80, 8
    qkv = torch.randn(s, 3 * h * d, device=dev).to(bf16)
    padded = torch.randn(s, 3 * h * d + 16, device=dev).to(bf16)[:, : 3 * h * d]  # a view, rows padded
    cos, sin = torch.randn(s, d, device=dev), torch.randn(s, d, device=dev)
    frames = torch.randint(0, 256, (3, 3, 56, 56), dtype=torch.uint8, device=dev)
    mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
    x17, qweight = torch.randn(17, 128, device=dev).to(bf16), torch.zeros(16, 72, dtype=torch.int32, device=dev)
    scales, counters = torch.ones(4, 72, device=dev).to(bf16), torch.zeros(8192, dtype=torch.int32, device=dev)
    return {
        "rotary-view-int": lambda: ops.rotary_2d_(qkv[:, :-6], cos, sin, h),
        "rotary-contiguous-int": lambda: ops.rotary_2d_(qkv[:, :-6].contiguous(), cos, sin, h),
        "rotary-view-dtype": lambda: ops.rotary_2d_(padded, cos.half(), sin, h),
        "rotary-contiguous-dtype": lambda: ops.rotary_2d_(qkv, cos.half(), sin, h),
        "rotary-meta-view-int": lambda: ops.rotary_2d_(qkv[:, :-6].to("meta"), cos.to("meta"), sin.to("meta"), h),
        "patch-view-int": lambda: ops.patch_gather(frames[:, :, :50], mean, std, 14, 2, 2, f32),
        "patch-contiguous-int": lambda: ops.patch_gather(frames[:, :, :50].contiguous(), mean, std, 14, 2, 2, f32),
        "patch-contiguous-dtype": lambda: ops.patch_gather(frames.float(), mean, std, 14, 2, 2, f32),
        "quant-rows-int": lambda: ops.quant_gemm_decode(x17, qweight, scales, scales, None, 4, 32, counters),
        "quant-dtype": lambda: ops.quant_gemm_decode(x17[:2].half(), qweight, scales, scales, None, 4, 32, counters),
        "torch-int": lambda: torch.empty(3, device=dev).view(4),
    }


def run_one(name: str, device: str) -> int:
    import faulthandler

    faulthandler.enable()
    import torch

    from qwen2vl_fast import _C  # noqa: F401

    try:
        call = _cases(torch, torch.ops.qwen2vl_fast, device)[name]
    except Exception as e:  # noqa: BLE001
        print(f"SETUP FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return 2
    try:
        call()
        if device == "cuda":
            torch.cuda.synchronize()
    except RuntimeError as e:
        print(f"RAISED RuntimeError: {str(e).splitlines()[0][:200]}")
        return 0
    except Exception as e:  # noqa: BLE001 -- what it raised instead is the finding
        print(f"RAISED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return 0
    print("NO ERROR")
    return 0


def _environment() -> dict:
    env = dict(python=platform.python_version(),
               TORCH_SHOW_CPP_STACKTRACES=os.environ.get("TORCH_SHOW_CPP_STACKTRACES"))
    probe = ("import torch, glob, qwen2vl_fast._C as c; print(torch.__version__, torch.version.cuda, "
             "torch.compiled_with_cxx11_abi(), c.__file__); "
             "print('\\n'.join(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libstdc++' in l "
             "or 'libgcc_s' in l})))")
    for key, cmd in (("torch_and_libs", [sys.executable, "-c", probe]), ("gxx", ["g++", "--version"]),
                     ("nvcc", ["nvcc", "--version"])):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120, cwd=ROOT)
            env[key] = (out.stdout + out.stderr).strip().splitlines()[:8]
        except (OSError, subprocess.TimeoutExpired) as e:
            env[key] = f"{type(e).__name__}: {e}"
    so = sorted((ROOT / "qwen2vl_fast").glob("_C*.so"))
    if so and shutil.which("ldd"):
        out = subprocess.run(["ldd", str(so[0])], capture_output=True, text=True, check=False, timeout=60)
        env["ldd_C"] = [ln.strip() for ln in out.stdout.splitlines() if any(k in ln for k in ("stdc++", "gcc", "c10"))]
    if so and shutil.which("strings"):
        out = subprocess.run(["strings", str(so[0])], capture_output=True, text=True, check=False, timeout=60)
        env["C_glibcxx_needed"] = sorted({w for w in out.stdout.split() if w.startswith("GLIBCXX_3.4.")})[-3:]
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", help="run one case in this process")
    p.add_argument("--device", default="cuda", help="cuda (the check), or meta (a CPU run of the Meta kernels)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results/_scratch"))
    args = p.parse_args(argv)
    if args.case:
        return run_one(args.case, args.device)
    import torch

    names = list(_WHAT)
    report = dict(environment=_environment(), cases={})
    gdb = shutil.which("gdb")
    print(f"{'case':26s} {'result':60s} separates")
    for name in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--case", name, "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120, cwd=ROOT)
        if out.returncode < 0:
            result = f"CRASHED: {signal.Signals(-out.returncode).name}"
        else:
            result = (out.stdout.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        entry = dict(result=result, returncode=out.returncode, stderr_tail=out.stderr[-3000:])
        if out.returncode < 0 and gdb:
            bt = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 40", "--args", *cmd], capture_output=True,
                                text=True, timeout=300, cwd=ROOT)
            entry["gdb_bt"] = bt.stdout[-6000:]
        report["cases"][name] = entry
        print(f"{name:26s} {result[:60]:60s} {_WHAT[name]}", flush=True)
    report["torch"] = torch.__version__
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "cuda_ext_errors.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"environment: {json.dumps(report['environment'])}\nreport: {path}")
    crashed = [n for n, e in report["cases"].items() if e["returncode"] < 0]
    return 1 if crashed else 0


_WHAT = {
    "rotary-view-int": "the failing test's call: view, integer in the message",
    "rotary-contiguous-int": "no view, integer in the message",
    "rotary-view-dtype": "view, no integer in the message",
    "rotary-contiguous-dtype": "no view, no integer (raised on the H200)",
    "rotary-meta-view-int": "the same check through the Meta kernel",
    "patch-view-int": "view, integers (frame size)",
    "patch-contiguous-int": "no view, integers",
    "patch-contiguous-dtype": "no view, no integer",
    "quant-rows-int": "no view, integer (17 rows)",
    "quant-dtype": "no view, no integer",
    "torch-int": "libtorch's own error with integers (the baseline)",
}


if __name__ == "__main__":
    sys.exit(main())
