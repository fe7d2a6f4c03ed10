"""Result files: one JSON per benchmark run, with the environment that produced it.

Absolute times hold only for the GPU that measured them (DESIGN.md "Performance method"), so every result
carries the GPU name, the library versions and the repository commit (plus a dirty flag: uncommitted changes
mean the commit alone does not name the code). Nothing host-identifying is recorded.

Files go to `bench/results/<name>-<gpu-slug>-<YYYYmmdd-HHMMSS>.json` (UTC). Besides its own payload ("result"),
every file carries "benchmarks": the same results as pytest-benchmark entries (bench/records.py), the shape the
kernel suites write, so bench/report.py reads every benchmark alike. A benchmark with many cases writes its
file as it goes (`ResultFile.update` after each case, "complete": false, then `finish`), so a run stopped by a
timeout still leaves every finished case. Where the copies go as well:
- QWEN2VL_FAST_BENCH_OUT names a folder: each file is copied there;
- QWEN2VL_FAST_BENCH_BUNDLE names one JSON file: each result is stored in it under its file name
  ({"files": {name: document}}), rewritten atomically on every update. On the lent GPU machine only files under
  `$OUT` come back, at most 8 of them, so `bench/gpu_check.sh` bundles every result of a run into one file there;
  `python bench/results.py unbundle FILE` writes the documents back out as bench/results/<name>.json.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_ENV = "QWEN2VL_FAST_BENCH_OUT"
BUNDLE_ENV = "QWEN2VL_FAST_BENCH_BUNDLE"
# Where the tree was copied without its .git (the lent GPU machine), the caller can name the commit.
COMMIT_ENV, DIRTY_ENV = "QWEN2VL_FAST_GIT_COMMIT", "QWEN2VL_FAST_GIT_DIRTY"


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state() -> dict:
    """{git_commit, git_dirty}: HEAD of this repository and whether the work tree differs from it.

    Dirty counts untracked, non-ignored files too (new code that is not in the commit). The
    QWEN2VL_FAST_GIT_COMMIT / QWEN2VL_FAST_GIT_DIRTY variables come first when set: a copied tree (the GPU
    machine's) may hold a stale .git whose HEAD is not the code that runs (the first H200 run recorded one).
    """
    if os.environ.get(COMMIT_ENV):
        dirty = os.environ.get(DIRTY_ENV)
        return dict(git_commit=os.environ[COMMIT_ENV],
                    git_dirty=None if dirty is None else dirty.strip().lower() in ("1", "true", "yes"))
    head = _git("rev-parse", "HEAD")
    if head is not None:
        status = _git("status", "--porcelain")
        return dict(git_commit=head.strip(), git_dirty=None if status is None else bool(status.strip()))
    dirty = os.environ.get(DIRTY_ENV)
    return dict(git_commit=os.environ.get(COMMIT_ENV) or None,
                git_dirty=None if dirty is None else dirty.strip().lower() in ("1", "true", "yes"))


def gpu_name() -> str:
    """The name of CUDA device 0, or "cpu" where there is none."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def slug(text: str) -> str:
    """Lower case, each run of other than letters and digits made one '-'.

    'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'.
    """
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def environment_info() -> dict:
    """What produced a result: GPU, library versions, Python, OS, repository commit. No host name."""
    cuda = torch.cuda.is_available()
    info = dict(
        gpu=gpu_name(),
        gpu_count=torch.cuda.device_count() if cuda else 0,
        compute_capability="%d.%d" % torch.cuda.get_device_capability(0) if cuda else None,
        gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=_version("triton"),
        transformers=_version("transformers"),
        qwen2vl_fast=_version("qwen2vl_fast") or _version("qwen2vl-fast"),
        python=platform.python_version(),
        os=f"{platform.system()} {platform.machine()}",
        cpu_count=os.cpu_count(),
    )
    info.update(git_state())
    return info


def to_jsonable(obj):
    """Plain JSON types for results: tensors become numbers or lists, dtypes and devices strings, and NaN / inf
    the strings "nan" / "inf" (JSON has no such numbers, and a NaN in a result is worth keeping)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj).removeprefix("torch.")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "item"):  # numpy scalars
        return to_jsonable(obj.item())
    return str(obj)


def _write_json_atomically(path: Path, doc: dict) -> None:
    """Write to a temporary file beside `path`, then rename: a run killed mid-write never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(doc), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def add_to_bundle(bundle: str | os.PathLike, file_name: str, doc: dict) -> None:
    """Store `doc` under `file_name` in the bundle file ({"files": {...}}), creating it if need be."""
    bundle = Path(bundle)
    bundle.parent.mkdir(parents=True, exist_ok=True)
    files = json.loads(bundle.read_text(encoding="utf-8"))["files"] if bundle.exists() else {}
    files[file_name] = doc
    _write_json_atomically(bundle, dict(files=files))


def unbundle(bundle: str | os.PathLike, out_dir: str | os.PathLike = "bench/results") -> list[Path]:
    """Write every document of a bundle file to `<out_dir>/<its file name>`; returns the paths written."""
    out = Path(out_dir)
    out = out if out.is_absolute() else REPO_ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, doc in json.loads(Path(bundle).read_text(encoding="utf-8"))["files"].items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+\.json", name):
            raise ValueError(f"bundle entry {name!r} is not a result file name")
        _write_json_atomically(out / name, doc)
        paths.append(out / name)
    return paths


def _records():
    """bench/records.py (the entries every result also carries, in pytest-benchmark's shape), imported as
    `bench.records` or, when this file runs as a script, from beside it."""
    try:
        from . import records
    except ImportError:
        import records
    return records


class ResultFile:
    """One result file, rewritten whole on every `update` (with "complete": false) and closed by `finish`.

    The path is fixed at construction: `<out_dir>/<name>-<gpu-slug>-<stamp>.json`, never overwriting an earlier
    file. Each write is also copied to $QWEN2VL_FAST_BENCH_OUT and stored in $QWEN2VL_FAST_BENCH_BUNDLE if set.
    """

    def __init__(self, name: str, out_dir: str | os.PathLike = "bench/results", *, env: Optional[dict] = None):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"result name {name!r} must be letters, digits, '_', '.', '-'")
        self.name = name
        self.env = environment_info() if env is None else env
        now = _dt.datetime.now(_dt.timezone.utc)
        self.created = now.isoformat(timespec="seconds")
        out = Path(out_dir)
        out = out if out.is_absolute() else REPO_ROOT / out
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{name}-{slug(str(self.env.get('gpu', 'cpu')))}-{now.strftime('%Y%m%d-%H%M%S')}"
        path, k = out / f"{stem}.json", 0
        while path.exists():  # two results in one second: never overwrite
            k += 1
            path = out / f"{stem}-{k}.json"
        self.path = path
        self.update({})  # claims the name at once, and says the run started even if no case finishes

    def update(self, payload: dict, complete: bool = False) -> Path:
        doc = dict(name=self.name, created_utc=self.created, complete=complete, environment=self.env, result=payload,
                   benchmarks=_records().entries_for(self.name, payload))
        _write_json_atomically(self.path, doc)
        extra = os.environ.get(OUT_ENV)
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            if Path(extra).resolve() != self.path.parent.resolve():
                shutil.copy2(self.path, Path(extra) / self.path.name)
        bundle = os.environ.get(BUNDLE_ENV)
        if bundle:
            add_to_bundle(bundle, self.path.name, json.loads(self.path.read_text(encoding="utf-8")))
        return self.path

    def finish(self, payload: dict) -> Path:
        return self.update(payload, complete=True)


def write_result(name: str, payload: dict, out_dir: str | os.PathLike = "bench/results", *,
                 env: Optional[dict] = None) -> Path:
    """Write {name, created_utc, complete: true, environment, result: payload} to
    `<out_dir>/<name>-<gpu-slug>-<stamp>.json` at once (see ResultFile for results written case by case).

    A relative out_dir is taken from the repository root, so results land in bench/results wherever the
    script is started. Returns the path written; also copies it to $QWEN2VL_FAST_BENCH_OUT and the bundle.
    """
    return ResultFile(name, out_dir, env=env).finish(payload)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Result files: unbundle a bundle that bench/gpu_check.sh brought back.")
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("unbundle", help="write each document of a bundle file to bench/results/")
    u.add_argument("bundle")
    u.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    for path in unbundle(args.bundle, args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
