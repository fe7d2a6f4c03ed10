"""Tensor-parallel test workers: `run_ranks` starts N processes of this file the way torchrun does (RANK,
WORLD_SIZE, MASTER_ADDR/PORT in the environment, gloo on 127.0.0.1), each runs the jobs of a job file and
writes what it saw to rank{r}.pt; the parent kills them all after a timeout, so no test can hang.

A job: {"name", "path", "dtype", "inputs": {case: forward kwargs}, "chats": [chat, ...] or None,
"max_new_tokens", "bad_path_on": rank or None}. Per job and rank the worker records the error (type, message)
or: the rank's config shares, weight bytes, checkpoint bytes read, logits of every case (rank 0 in full, every
rank a digest) and the engine's greedy token ids.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(n: int, jobs: list, workdir, timeout: float = 240.0, backend: str = "gloo") -> list:
    """Run `jobs` on n ranks; returns each rank's result dict (in rank order). Raises AssertionError when a
    worker crashes or when they do not all finish within `timeout` seconds (then every worker is killed).
    backend "nccl": rank r uses cuda:r."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.save(jobs, workdir / "jobs.pt")
    port = free_port()
    procs = []
    for r in range(n):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", QWEN2VL_FAST_DISPATCH="default",
                   TP_TEST_BACKEND=backend)
        log = open(workdir / f"rank{r}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(workdir)], env=env,
                                       stdout=log, stderr=subprocess.STDOUT, cwd=str(HERE.parent)), log))
    deadline = time.monotonic() + timeout
    try:
        for p, _ in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
        logs = "\n".join((workdir / f"rank{r}.log").read_text()[-2000:] for r in range(n))
        raise AssertionError(f"tensor-parallel workers still running after {timeout:.0f} s (killed):\n{logs}")
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    results = []
    for r, (p, _) in enumerate(procs):
        out = workdir / f"rank{r}.pt"
        if p.returncode != 0 or not out.exists():
            raise AssertionError(f"rank {r} exited with {p.returncode}:\n" + (workdir / f"rank{r}.log").read_text()[-4000:])
        results.append(torch.load(out, weights_only=False))
    return results


def run_cli(n: int, argv: list, timeout: float = 120.0) -> list:
    """`qwen2vl-fast *argv` on n ranks as torchrun starts it; [(returncode, stdout, stderr)] in rank order."""
    port = free_port()
    code = "import sys; from qwen2vl_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    procs = []
    for r in range(n):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", QWEN2VL_FAST_DISPATCH="default")
        procs.append(subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=str(HERE.parent)))
    deadline, out = time.monotonic() + timeout, []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def start_ranks(n: int, argv: list, logdir) -> list:
    """`python -m qwen2vl_fast.cli *argv` on n ranks as torchrun starts it, left running (stdout/stderr of rank r
    in logdir/cli{r}.log); the caller stops them (`stop_ranks`)."""
    port = free_port()
    procs = []
    for r in range(n):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", QWEN2VL_FAST_DISPATCH="default",
                   PYTHONUNBUFFERED="1")
        log = open(Path(logdir) / f"cli{r}.log", "w")  # noqa: SIM115 - closed by stop_ranks
        procs.append((subprocess.Popen([sys.executable, "-m", "qwen2vl_fast.cli", *argv], env=env, stdout=log,
                                       stderr=subprocess.STDOUT, cwd=str(HERE.parent)), log))
    return procs


def wait_for_line(logfile, prefix: str, procs, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path(logfile).read_text().splitlines():
            if line.startswith(prefix):
                return line
        if any(p.poll() is not None for p, _ in procs):
            break
        time.sleep(0.2)
    raise AssertionError(f"no line {prefix!r} in {logfile}:\n{Path(logfile).read_text()[-3000:]}")


def stop_ranks(procs, timeout: float = 60.0) -> list:
    """Wait for every rank to exit (killing what is left after `timeout`); their return codes (None: killed)."""
    deadline, codes = time.monotonic() + timeout, []
    for p, log in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for p, log in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()
    return codes


def digest(t: torch.Tensor) -> tuple:
    """Exact fingerprint of a tensor's values (bit-identical tensors give equal digests)."""
    a = t.detach().float().contiguous().cpu().numpy()
    return (tuple(a.shape), float(np.float64(a).sum()), a.view(np.int32).astype(np.int64).sum().item())


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> None:
    """Reset the kernel's peak resident size of this process (VmHWM) to its current size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _job(job: dict, rank: int) -> dict:
    import qwen2vl_fast
    from qwen2vl_fast.engine import Engine
    from qwen2vl_fast.parallel import weight_bytes

    out: dict = {}
    path = job["path"] if job.get("bad_path_on") != rank else job["path"] + "-missing"
    device, backend = job.get("device", "cpu"), job.get("backend", "torch")
    if job.get("graphs_tp1"):  # one GPU: a one-rank TensorParallel, so its collectives run (and are captured)
        return _graphs_tp1(job)
    import tqdm  # noqa: F401 - what the load imports, imported before its memory is measured

    from qwen2vl_fast.config import load_config
    from qwen2vl_fast.ops import resolve

    if job.get("bad_path_on") is None:
        resolve(backend, device, load_config(path))
    rss_before = _status_kib("VmRSS")
    _reset_peak()
    try:
        model = qwen2vl_fast.load(path, device=device, dtype=job["dtype"], backend=backend, tensor_parallel=True)
    except Exception as e:  # noqa: BLE001 - the test checks the type and message
        out["error"] = (type(e).__name__, str(e))
        return out
    # the load's peak host memory: the process's peak resident size during the load minus its size before
    out["load_peak_bytes"] = (_status_kib("VmHWM") - rss_before) * 1024
    t, tp = model.config.text, model.tensor_parallel
    out["text"] = dict(heads=t.num_attention_heads, kv_heads=t.num_key_value_heads, head_dim=t.head_dim,
                       intermediate=t.intermediate_size)
    out["weight_bytes"], out["bytes_read"] = weight_bytes(model.weights), tp.bytes_read
    out["gathered"] = sorted(tp.gathered)
    out["repr"] = repr(model)
    out["logits"], out["digests"] = {}, {}
    for case, inputs in job.get("inputs", {}).items():
        logits = model(**inputs).logits
        out["digests"][case] = digest(logits)
        if rank == 0:
            out["logits"][case] = logits.float().cpu()
    del model
    if job.get("chats"):
        engine = Engine.from_pretrained(job["path"], device=device, dtype=job["dtype"], backend=backend, max_batch=4,
                                        max_len=512, tensor_parallel=True)
        try:
            out["cache_kv_heads"] = engine.cache.k[0].shape[2]
            out["cuda_graphs"] = engine.graphs is not None
            done = engine.generate(job["chats"], max_new_tokens=job.get("max_new_tokens", 8))
            out["tokens"] = [list(c.token_ids) for c in done]
        finally:
            engine.close()
    return out


def _graphs_tp1(job: dict) -> dict:
    """A TensorParallel of one rank on one GPU (load() would skip it): the engine's decode CUDA graphs then
    capture the NCCL all-reduces and all-gathers; greedy tokens against an eager engine without tensor parallelism."""
    import qwen2vl_fast
    from qwen2vl_fast.config import load_config
    from qwen2vl_fast.engine import Engine
    from qwen2vl_fast.model import _load
    from qwen2vl_fast.parallel import TensorParallel
    from qwen2vl_fast.processing.processor import Processor

    path, dtype, dev = job["path"], getattr(torch, job["dtype"]), torch.device("cuda", 0)
    cfg = load_config(path)
    tp = TensorParallel(0, 1, cfg)
    model = _load(path, cfg, dev, dtype, job.get("backend", "auto"), False, "default", None, tp)
    processor = Processor.from_pretrained(path)
    engine = Engine(model, processor, max_batch=4, max_len=512, cuda_graphs=True)
    try:
        tokens = [list(c.token_ids) for c in engine.generate(job["chats"], max_new_tokens=job["max_new_tokens"])]
        graphs = sorted(engine.graphs.graphs) if engine.graphs is not None else []
    finally:
        engine.close()
    eager = Engine(qwen2vl_fast.load(path, device=dev, dtype=dtype, backend=job.get("backend", "auto"),
                                     dispatch="default"), processor, max_batch=4, max_len=512, cuda_graphs=False)
    try:
        ref = [list(c.token_ids) for c in eager.generate(job["chats"], max_new_tokens=job["max_new_tokens"])]
    finally:
        eager.close()
    return {"tokens": tokens, "eager_tokens": ref, "graphs": graphs}


def main(workdir: str) -> None:
    import torch.distributed as dist

    workdir = Path(workdir)
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    backend = os.environ.get("TP_TEST_BACKEND", "gloo")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, timeout=timedelta(seconds=90))
    results = {}
    try:
        for job in torch.load(workdir / "jobs.pt", weights_only=False):
            results[job["name"]] = _job(job, rank)
    finally:
        torch.save(results, workdir / f"rank{rank}.pt")
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
