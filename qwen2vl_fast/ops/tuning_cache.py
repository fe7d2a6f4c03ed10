"""The persistent record of measured dispatch choices: which implementation won, per op and shape, on which
device and software stack.

One JSON file (default `~/.cache/qwen2vl_fast/dispatch.json`; the directory is overridable with the environment
variable QWEN2VL_FAST_CACHE_DIR or an explicit path) holds one section per *environment*: the GPU name and compute
capability, the driver, CUDA, torch, triton and qwen2vl_fast versions. A measurement is only valid for the
environment it was taken in: a driver, compiler or kernel update can change every winner, so a section whose
fingerprint differs from the running one is never read (it stays in the file for the machine it belongs to).

    {"format": 1, "environments": {"<fingerprint key>": {"fingerprint": {...},
        "ops": {"linear": {"<shape key>": {"winner": "torch", "times_us": {"torch": 12.1, "triton": 14.9}}}}}}}

A file that is not valid JSON or not of this format (corrupt, or written by another version of this schema) is
ignored with one warning line and rewritten on the next save; when the file only has sections measured for the
same device under other versions (stale), one warning line says so. Writes are atomic (temp file + rename) and
merge with what another process may have written meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Optional

import torch

FORMAT = 1
CACHE_DIR_ENV = "QWEN2VL_FAST_CACHE_DIR"
FILE_NAME = "dispatch.json"


log = logging.getLogger("qwen2vl_fast.dispatch")


def default_cache_path() -> Path:
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "qwen2vl_fast")
    return Path(root) / FILE_NAME


def _driver_version() -> str:
    try:  # the NVIDIA kernel module reports its version here on Linux
        first = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
        return next((w for w in first.split() if w[:1].isdigit() and "." in w), first.strip())
    except (OSError, IndexError):
        pass
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    try:
        return str(get()) if get is not None else "unknown"
    except RuntimeError:
        return "unknown"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def fingerprint(device) -> dict:
    """What a measurement on `device` depends on, besides the op, dtype and shape."""
    from qwen2vl_fast import __version__

    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, capability = props.name, f"{props.major}.{props.minor}"
        cuda, driver = torch.version.cuda or "unknown", _driver_version()
    else:
        name, capability, cuda, driver = f"{device.type}:{platform.machine()}", "-", "-", "-"
    return {"device": name, "capability": capability, "driver": driver, "cuda": cuda,
            "torch": torch.__version__, "triton": _triton_version(), "qwen2vl_fast": __version__}


def fingerprint_key(fp: dict) -> str:
    return "|".join(f"{k}={fp[k]}" for k in sorted(fp))


class TuningCache:
    """The measured winners of one environment, loaded from and saved to one JSON file."""

    def __init__(self, path: Optional[os.PathLike], fp: dict):
        self.path = Path(path) if path is not None else default_cache_path()
        self.fingerprint, self.key = fp, fingerprint_key(fp)
        self.entries: dict = self._load()  # op -> shape key -> {"winner": ..., "times_us": {...}}
        self.dirty = False

    def get(self, op: str, shape_key: str) -> Optional[dict]:
        return self.entries.get(op, {}).get(shape_key)

    def put(self, op: str, shape_key: str, winner: str, times_s: dict) -> dict:
        record = {"winner": winner,
                  "times_us": {b: (None if t is None else round(t * 1e6, 3)) for b, t in times_s.items()}}
        self.entries.setdefault(op, {})[shape_key] = record
        self.dirty = True
        return record

    def _read_file(self) -> Optional[dict]:
        """The parsed file, {} when there is none, None (after one warning) when it is unusable."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as e:
            _warn(f"dispatch cache {self.path} is unreadable ({e}); ignoring it")
            return None
        try:
            data = json.loads(text)
        except ValueError as e:
            _warn(f"dispatch cache {self.path} is corrupt ({e}); ignoring it, it will be rewritten")
            return None
        if not (isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("environments"), dict)):
            _warn(f"dispatch cache {self.path} is not format {FORMAT}; ignoring it, it will be rewritten")
            return None
        return data

    def _load(self) -> dict:
        data = self._read_file()
        if not data:
            return {}
        section = data["environments"].get(self.key)
        if section is None:
            stale = [s.get("fingerprint", {}) for s in data["environments"].values() if isinstance(s, dict)]
            same_device = [f for f in stale if f.get("device") == self.fingerprint["device"]]
            if same_device:
                changed = sorted(k for k in self.fingerprint if same_device[0].get(k) != self.fingerprint[k])
                _warn(f"dispatch cache {self.path} was measured on this {self.fingerprint['device']} under other "
                      f"versions ({', '.join(changed)} changed); ignoring it until re-measured")
            return {}
        ops = section.get("ops") if isinstance(section, dict) else None
        if not isinstance(ops, dict) or not all(isinstance(v, dict) for v in ops.values()):
            _warn(f"dispatch cache {self.path} has a malformed section for this device; ignoring it")
            return {}
        return {op: {k: r for k, r in shapes.items() if isinstance(r, dict) and isinstance(r.get("winner"), str)}
                for op, shapes in ops.items()}

    def save(self) -> None:
        """Merge this environment's entries into the file (atomically). Entries another process saved for the
        same environment meanwhile are kept unless this one measured the same shape."""
        if not self.dirty:
            return
        data = self._read_file() or {"format": FORMAT, "environments": {}}
        section = data["environments"].setdefault(self.key, {"fingerprint": self.fingerprint, "ops": {}})
        if not isinstance(section.get("ops"), dict):
            section["ops"] = {}
        for op, shapes in self.entries.items():
            section["ops"].setdefault(op, {}).update(shapes)
        section["fingerprint"] = self.fingerprint
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".dispatch-", suffix=".json", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
        self.dirty = False


def _warn(message: str) -> None:
    log.warning("qwen2vl_fast: %s", message)  # one line on stderr (logging's last-resort handler) unless configured
