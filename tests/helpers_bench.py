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


class FakeCuda:
    """A simulated CUDA device for testing the harness's timing logic on the CPU (the subset of `torch.cuda` the
    harness uses). Time is simulated, in milliseconds: the host clock advances by `launch_ms` per launch and
    `event_ms` per event record; the device runs work in order, each item starting once the device is free and
    the host has enqueued it. So per-call events on an idle queue include the host's launch cost, as on a real
    GPU, and a pre-filled queue or a graph replay does not.

    A timed callable launches simulated kernels with `kernel(ms)`; `kernel(ms, capturable=False)` raises while a
    graph is being captured, as a host sync or a pageable copy does on a real device.
    """

    def __init__(self, launch_ms=0.02, event_ms=0.002, l2_bytes=4096, cycles_per_ms=2e6):
        self.launch_ms, self.event_ms, self.l2_bytes, self.cycles_per_ms = launch_ms, event_ms, l2_bytes, cycles_per_ms
        self.host, self.device_free = 0.0, 0.0
        self.capturing = None  # the kernel list of the graph being captured
        self.sleeps = []  # spin lengths in ms, in launch order

    # -- what the timed callables and the test use
    def now_ms(self) -> float:
        return self.host

    def _enqueue(self, ms: float) -> float:
        start = max(self.device_free, self.host)
        self.device_free = start + ms
        return start

    def kernel(self, ms: float, capturable: bool = True) -> None:
        if self.capturing is not None:
            if not capturable:
                raise RuntimeError("operation not permitted when stream is capturing")
            self.capturing.append(ms)
            self.host += self.launch_ms
            return
        self.host += self.launch_ms
        self._enqueue(ms)

    # -- the torch.cuda subset
    def Event(self, enable_timing=False, **_):
        return _FakeEvent(self)

    def synchronize(self, device=None):
        self.host = max(self.host, self.device_free)

    def _sleep(self, cycles):
        self.host += self.launch_ms
        self.sleeps.append(cycles / self.cycles_per_ms)
        self._enqueue(cycles / self.cycles_per_ms)

    def CUDAGraph(self):
        return _FakeGraph(self)

    def graph(self, g, **_):
        import contextlib

        @contextlib.contextmanager
        def capture():
            self.capturing = g.kernels
            try:
                yield
            finally:
                self.capturing = None
        return capture()

    def Stream(self):
        return _FakeStream()

    def stream(self, s):
        import contextlib

        return contextlib.nullcontext()

    def current_stream(self, device=None):
        return _FakeStream()

    def set_stream(self, s):
        pass

    def device(self, d):
        import contextlib

        return contextlib.nullcontext()

    def current_device(self):
        return 0

    def get_device_properties(self, d):
        from types import SimpleNamespace

        return SimpleNamespace(L2_cache_size=self.l2_bytes)

    def empty_cache(self):
        pass


class _FakeStream:
    def wait_stream(self, other):
        pass


class _FakeEvent:
    def __init__(self, fake: FakeCuda):
        self.fake, self.t = fake, None

    def record(self, stream=None):
        self.fake.host += self.fake.event_ms
        self.t = self.fake._enqueue(0.0)

    def elapsed_time(self, end) -> float:
        return end.t - self.t

    def query(self) -> bool:
        return self.t <= self.fake.host


class _FakeGraph:
    def __init__(self, fake: FakeCuda):
        self.fake, self.kernels = fake, []

    def replay(self):
        self.fake.host += self.fake.launch_ms
        self.fake._enqueue(sum(self.kernels))
