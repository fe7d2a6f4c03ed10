"""Import modules of `bench/` from tests, whether or not the repository root is on sys.path.

`pytest tests` (not `python -m pytest`) leaves the root off sys.path; it is put there only for the import, since
the root also holds `kernels/`, a name transformers probes for.
"""

import importlib
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])


def bench_module(name: str):
    """bench.<name>, imported with the repository root on sys.path for the duration of the import."""
    if _ROOT in sys.path:
        return importlib.import_module(f"bench.{name}")
    sys.path.insert(0, _ROOT)
    try:
        return importlib.import_module(f"bench.{name}")
    finally:
        sys.path.remove(_ROOT)
