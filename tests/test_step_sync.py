"""Lock-step scheduling across tensor-parallel ranks (engine/step_sync.py), on two gloo processes.

The ranks load the whole model here (no sharding), so nothing collective happens inside the model: what is tested
is the plan itself. Each rank logs every step it runs (the admissions with their slots, the decode batches by
sequence), and the logs must be identical even though the ranks submit at different moments, one rank cancels
a request and one request samples without a seed."""

import json
import os
import random
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

CHATS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chat(i):
    return [{"role": "user", "content": [{"type": "text", "text": f"step sync request {i} " * (1 + i % 3)}]}]


def _engine(path, rank, port, log):
    import torch.distributed as dist

    from qwen2vl_fast.engine import Engine
    from qwen2vl_fast.engine.step_sync import StepSync

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    engine = Engine.from_pretrained(path, dtype=torch.float32, max_batch=2, max_len=256)
    engine.scheduler.sync = StepSync()
    sched = engine.scheduler
    prefill, decode = sched._prefill, sched._decode_step

    def logged_prefill(group, slots):
        log.append(["prefill", group.ordinal, list(slots), group.seeds])
        return prefill(group, slots)

    def logged_decode():
        log.append(["decode", [list(s.key) for s in sched.running]])
        return decode()

    sched._prefill, sched._decode_step = logged_prefill, logged_decode
    return engine


def _mirrored(rank, path, port, out):
    log = []
    engine = _engine(path, rank, port, log)
    rng = random.Random(rank)
    handles = []
    for i in range(CHATS):
        time.sleep(rng.random() * 0.05)  # the ranks submit at different moments
        kw = dict(temperature=1.0) if i == 4 else {}  # unseeded sampling: rank 0's seed for every rank
        handles.append(engine.submit(_chat(i), max_new_tokens=6 + i, ignore_eos=True, **kw))
    if rank == 0:
        next(iter(handles[1]))
        handles[1].cancel()  # only rank 0 cancels: its plan cancels it everywhere
    results = []
    for h in handles:
        for _ in h:
            pass
        results.append([h.completion().token_ids, h.finish_reason])
    [alone] = engine.generate(_chat(0), max_new_tokens=6, ignore_eos=True)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"log": log, "results": results, "alone": alone.token_ids}, f)
    engine.close()
    torch.distributed.destroy_process_group()


def _led(rank, path, port, out):
    log = []
    engine = _engine(path, rank, port, log)
    results = []
    if rank == 0:
        engine.lead()
        handles = [engine.submit(_chat(i), max_new_tokens=5, ignore_eos=True) for i in range(3)]
        results = [h.result(timeout=60).token_ids for h in handles]
        engine.close(cancel=False)
    else:
        engine.follow()  # returns when rank 0 closes
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"log": log, "results": results}, f)
    torch.distributed.destroy_process_group()


def _spawn(fn, path, tmp_path):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=fn, args=(r, str(path), port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail("a rank hung")
    assert [p.exitcode for p in procs] == [0, 0]
    return [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]


def test_mirrored_ranks_run_identical_steps(tiny_checkpoints, tmp_path):
    r0, r1 = _spawn(_mirrored, tiny_checkpoints["tiny-qwen2-vl"], tmp_path)
    assert r0["log"] == r1["log"]
    assert r0["results"] == r1["results"]
    assert r0["results"][1][1] == "cancelled" and r1["results"][1][1] == "cancelled"
    assert [r[1] for i, r in enumerate(r0["results"]) if i != 1] == ["length"] * (CHATS - 1)
    assert r0["results"][0][0] == r0["alone"]
    assert any(entry[0] == "prefill" and entry[3] and entry[3][0] is not None for entry in r0["log"])


def test_led_followers_run_rank0_requests_and_stop_when_it_closes(tiny_checkpoints, tmp_path):
    r0, r1 = _spawn(_led, tiny_checkpoints["tiny-qwen2-vl"], tmp_path)
    assert r0["log"] == r1["log"] and len(r0["log"]) > 3
    assert [len(t) for t in r0["results"]] == [5, 5, 5]
