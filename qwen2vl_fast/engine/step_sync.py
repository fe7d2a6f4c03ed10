"""Lock-step scheduling across tensor-parallel ranks.

Under tensor parallelism every rank's scheduler must run the same steps: the same prefills in the same order,
the same decode batches (same sequences, same slots), or their collectives would pair with the wrong ones and
hang or mix activations. Admission and cancellation depend on timing (what has arrived by a step boundary), so
ranks cannot decide them independently. Rank 0 leads: at every step boundary its scheduler broadcasts a plan
over a CPU (gloo) group, and the other ranks' schedulers apply exactly that plan:

    {"admit": [(ordinal, seeds, payload-or-None), ...], "cancel": [(ordinal, row), ...], "idle": bool}

`ordinal` is the submission's number on its rank (the n-th `generate`/`stream`/`submit` call). Two ways to run:
- mirrored (`torchrun` scripts, the tests): every rank makes the same calls in the same order; a follower waits
  for its own n-th submission and attaches its handles, so every rank returns the results.
- led (the server): only rank 0 takes requests; the others call `Engine.follow()`, and rank 0 ships each
  admitted submission's processed inputs (CPU tensors) in the plan.
Seeds of sampled requests come from rank 0, so unseeded sampling also draws the same tokens on every rank.
A plan with "idle" ends every rank's engine thread together; "stop" ends `follow()`.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch


class StepSync:
    def __init__(self, group=None):
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.leader = dist.get_global_rank(group, 0) if group is not None else 0
        # objects travel on the CPU: a gloo group beside an NCCL one (every rank creates it, collectively)
        self.cpu_group = group if dist.get_backend(group) == "gloo" else dist.new_group(
            ranks=dist.get_process_group_ranks(group) if group is not None else None, backend="gloo")
        self.ship = False  # led mode: rank 0 sends the inputs (set on every rank by Engine.follow / serve)
        self.local = {}  # followers: ordinal -> Group submitted on this rank (mirrored mode)
        self.cond = threading.Condition()

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def exchange(self, plan: Optional[dict]) -> dict:
        """Rank 0 passes its plan and gets it back; the others pass None and get rank 0's."""
        box = [plan]
        self.dist.broadcast_object_list(box, src=self.leader, group=self.cpu_group)
        return box[0]

    # followers, mirrored mode: the local submission an ordinal names
    def register(self, ordinal: int, group) -> None:
        with self.cond:
            self.local[ordinal] = group
            self.cond.notify_all()

    def take(self, ordinal: int, timeout: float = 600.0):
        with self.cond:
            if not self.cond.wait_for(lambda: ordinal in self.local, timeout):
                raise RuntimeError(f"tensor-parallel rank {self.rank}: rank 0 admitted submission {ordinal}, "
                                   f"which this rank never made (ranks must make the same calls in the same "
                                   f"order, or run Engine.follow())")
            return self.local.pop(ordinal)


def cpu_inputs(inputs: dict) -> dict:
    """A processed dict with its tensors on the CPU (what a plan ships)."""
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
