"""The engine thread: one scheduler owns the model, the KV cache, the CUDA graphs and the sampler state, and runs
every request that `Engine.generate` / `stream` / `submit` (and so the server) hands it. Callers never touch the
model: sharing one Engine between threads, or interleaving streams, gives each request its own tokens.

Continuous batching, at step boundaries:
1. cancelled requests leave (their KV slot is free at once);
2. waiting submissions are admitted in arrival order while free slots are left; each is prefilled on its own
   (vision tower, cached by content, then the packed prefill of its rows) and samples its first token;
3. one decode step is launched for every running sequence, then the previous step's tokens are read and
   emitted, and finished sequences leave.
A request's prefill is the same computation whatever else is running, and every sampled sequence draws
counter-based noise from its request's seed and its token index, so a seeded request gives the same tokens alone
or in a busy batch.

The decode step is device-resident (decode_state.py): sampling, the seen-token update, positions, counts and the
stop test run inside the step (one CUDA graph per bucket), so a step costs the host one graph replay and one
non-blocking copy of the tokens into pinned memory, fenced by an event. Step n+1 is launched before step n's
tokens are read; a sequence that stopped at step n is already done on the device, so step n+1 does nothing for it
and its token there is dropped. Stop strings are found on the host, one step later than the device would: the
extra token is dropped the same way. Only a change of the batch (admission, finish, cancel) uploads new rows.

The thread starts at the first submission and ends when nothing is waiting or running (the next submission
starts a new one): an idle engine holds no thread, and a dropped Engine is collected.

Under tensor parallelism (`sync`, step_sync.py) rank 0's scheduler decides every step boundary's admissions
(with their slots and sampling seeds) and cancellations and broadcasts them; the other ranks apply them, so all
ranks run the same steps and their collectives pair up.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import EngineClosedError, EngineError, QueueFullError, Qwen2VLFastError
from ..ops import VarlenMeta
from .graphs import DecodeGraphs
from .metrics import EngineMetrics
from .request import RequestHandle, TextStream


@dataclass
class Group:
    """One submission: the rows of a processed batch, prefilled together; one handle per row."""

    handles: list
    inputs: dict
    lengths: list  # exact prompt length per row
    params: object  # SamplingParams
    keys: dict = field(default_factory=dict)  # vision cache content keys
    arrival: float = field(default_factory=time.perf_counter)
    ordinal: int = -1  # the submission's number on this engine (tensor-parallel ranks match them)
    seeds: Optional[list] = None  # per row; None: drawn at admission (rank 0's, under tensor parallelism)
    cpu_inputs: Optional[dict] = None  # what rank 0 ships to led followers


@dataclass
class Sequence:
    handle: RequestHandle
    slot: int
    cache_len: int  # tokens in the cache (the prompt, then one more per decode step)
    delta: int  # M-RoPE id of cache position p is p + delta
    sampling: bool  # temperature > 0 (the step's graph draws noise only when a row samples)
    arrival: float
    prefill_start: float
    stop_text: Optional[TextStream]  # the engine's own view of the text, for stop strings
    key: tuple = ()  # (submission ordinal, row): how a tensor-parallel plan names it
    last_token: int = 0
    generated: int = 0
    first_time: float = 0.0
    last_time: float = 0.0
    finished: bool = False  # ended on the host: tokens of steps launched before that are dropped
    in_flight: int = 0  # steps launched for it whose tokens the host has not read (0 or 1)


@dataclass
class LaunchedStep:
    """A decode step in flight: its rows' sequences, the pinned buffer its tokens land in, the event after the
    copy (None off CUDA: the copy was synchronous)."""

    seqs: list
    tokens: torch.Tensor
    event: Optional[torch.cuda.Event]


class Scheduler:
    def __init__(self, model, cache, state, steps, vision_cache=None, max_queue: int = 256, decode_text=None,
                 sync=None):
        self.model, self.cache, self.state, self.steps = model, cache, state, steps
        self.cuda_graphs = isinstance(steps, DecodeGraphs)
        stop_token_ids = state.stop_ids.tolist()
        self.stop_token_ids = frozenset(stop_token_ids)
        self.vision_cache, self.max_queue, self.decode_text = vision_cache, int(max_queue), decode_text
        self.cond = threading.Condition()
        self.waiting: deque = deque()
        self.running: list = []
        self.free_slots = list(range(cache.max_batch))
        self.thread: Optional[threading.Thread] = None
        self.closed = False
        self.metrics = EngineMetrics()
        self.pending: Optional[LaunchedStep] = None  # the step launched last, its tokens not yet read
        self.batch_key: Optional[tuple] = None  # (slots, bucket) of the rows on the device
        n, self.on_cuda = cache.max_batch, state.device.type == "cuda"
        # Two pinned token buffers: step n+1 copies into one while the host reads step n's from the other.
        self.host_tokens = [torch.zeros(n, dtype=torch.long, pin_memory=self.on_cuda) for _ in range(2)]
        self.host_views = [{bs: buf[:bs] for bs in steps.buckets} for buf in self.host_tokens]
        self.events = [torch.cuda.Event() for _ in range(2)] if self.on_cuda else [None, None]  # one per buffer
        self.flip = 0
        self.sync = sync  # StepSync under tensor parallelism
        self.stopped = False  # a led follower's stop plan went out (rank 0) / came in
        self.cancelling = False  # close(cancel=True): every sequence ends, those in prefill now too
        self.ordinals = 0

    # -- the callers' side ----------------------------------------------------------------------------------
    def submit(self, group: Group) -> None:
        with self.cond:
            if self.closed:
                raise EngineClosedError("the engine is closed and takes no new requests")
            group.ordinal, self.ordinals = self.ordinals, self.ordinals + 1
            if self.sync is not None and not self.sync.is_leader:  # rank 0's plan says when it runs
                self.sync.register(group.ordinal, group)
                self._start()
                return
            if self.sync is not None and self.sync.ship:
                group.cpu_inputs = _cpu(group.inputs)
            queued = sum(len(g.handles) for g in self.waiting)
            if queued + len(group.handles) > self.max_queue:
                self.metrics.outcome("rejected", len(group.handles))
                raise QueueFullError(f"the engine's queue is full ({queued} sequences waiting, max_queue "
                                     f"{self.max_queue}): retry later")
            self.waiting.append(group)
            self._start()
            self.cond.notify_all()

    def _start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="qwen2vl_fast-engine", daemon=True)
            self.thread.start()

    def close(self, cancel: bool = True, timeout: Optional[float] = None) -> None:
        """No new requests; cancel=True ends the waiting and running ones as "cancelled", else they finish."""
        with self.cond:
            self.closed = True
            if cancel:
                self.cancelling = True
                while self.waiting:
                    self._end_group(self.waiting.popleft(), "cancelled")
                for seq in self.running:
                    seq.handle.cancel()
            thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if self.sync is not None and self.sync.is_leader and self.sync.ship and not self.stopped:
            with self.cond:  # led followers wait in follow(): tell them to stop (the thread is gone)
                if self.thread is None:
                    self.stopped = True
                    self.sync.exchange({"admit": [], "cancel": [], "idle": True, "stop": True})

    def snapshot(self) -> dict:
        with self.cond:
            state = {"queue_depth": sum(len(g.handles) for g in self.waiting), "running": len(self.running),
                     "kv_slots_in_use": self.cache.max_batch - len(self.free_slots),
                     "kv_slots_total": self.cache.max_batch}
        state.update(self.metrics.snapshot())
        return state

    # -- the engine thread ----------------------------------------------------------------------------------
    def _loop(self, follow: bool = False) -> None:
        """The engine thread (or, follow=True, a led tensor-parallel follower's `Engine.follow()` loop)."""
        with torch.inference_mode():
            while True:
                with self.cond:
                    admit = self._take_admissible() if self.sync is None or self.sync.is_leader else []
                    cancel = [s.key for s in self.running if s.handle.cancelled.is_set()]
                    idle = not admit and not self.running and self.pending is None
                    if idle and self.sync is None:
                        self.thread = None  # idle: the next submission starts a new thread
                        return
                if self.sync is not None:
                    admit, cancel, idle, stop = self._synchronise(admit, cancel, idle)
                    if stop or (idle and not follow):
                        with self.cond:
                            if not stop and (self.waiting or self.sync.local):
                                continue  # a submission arrived during the exchange: it needs this thread
                            if self.thread is threading.current_thread():
                                self.thread = None
                            self.stopped = self.stopped or stop
                        return
                    if idle:
                        continue
                try:
                    for group, slots in admit:
                        self._prefill(group, slots)
                    self._drop_cancelled(set(cancel))
                    if self.running or self.pending is not None:
                        self._decode_step()
                except BaseException as error:  # noqa: BLE001 - a bug must fail its requests, not hang them
                    self._fail_running(error if isinstance(error, Qwen2VLFastError) else
                                       EngineError(f"the engine failed a decode step: {error!r}"))

    def _synchronise(self, admit: list, cancel: list, idle: bool):
        """Tensor parallelism: rank 0 sends this boundary's plan, the others receive and apply it."""
        sync = self.sync
        if sync.is_leader:
            for group, _ in admit:
                if group.seeds is None:
                    group.seeds = [_seed(group.params) for _ in group.handles]
            plan = {"admit": [(g.ordinal, slots, g.seeds, g.cpu_inputs and (g.cpu_inputs, g.lengths, g.params))
                              for g, slots in admit],
                    "cancel": cancel, "idle": idle, "stop": self.closed and idle}
            sync.exchange(plan)
            return admit, cancel, idle, plan["stop"]
        plan = sync.exchange(None)
        admit = []
        for ordinal, slots, seeds, payload in plan["admit"]:
            if payload is not None:  # led: rank 0's request, nobody reads its handles here
                inputs, lengths, params = payload
                handles = [RequestHandle(f"tp-{ordinal}-{i}", i, params, self.decode_text or (lambda ids: ""))
                           for i in range(len(lengths))]
                group = Group(handles, inputs, lengths, params, ordinal=ordinal)
            else:
                group = sync.take(ordinal)
            group.seeds = seeds
            with self.cond:
                for s in slots:
                    self.free_slots.remove(s)
            admit.append((group, slots))
        return admit, plan["cancel"], plan["idle"], plan["stop"]

    def follow(self) -> None:
        """A led follower's loop: apply rank 0's plans until it closes (run on ranks > 0 beside a server)."""
        self._loop(follow=True)

    def _take_admissible(self) -> list:
        """Pop the waiting groups that fit the free slots, oldest first (no overtaking: a large group waits
        for room rather than starve). Called with the lock held."""
        admit = []
        while self.waiting:
            group = self.waiting[0]
            if all(h.cancelled.is_set() for h in group.handles):
                self._end_group(self.waiting.popleft(), "cancelled")
                continue
            if len(group.handles) > len(self.free_slots):
                break
            self.waiting.popleft()
            slots = sorted(self.free_slots)[:len(group.handles)]
            for s in slots:
                self.free_slots.remove(s)
            admit.append((group, slots))
        return admit

    def _end_group(self, group: Group, reason: str) -> None:
        for h in group.handles:
            h.timings.update(total_s=time.perf_counter() - group.arrival, generated_tokens=0)
            h._push_end(reason)
        self.metrics.outcome(reason, len(group.handles))

    def _free(self, seq: Sequence) -> None:
        with self.cond:
            self.free_slots.append(seq.slot)

    def _fail_running(self, error: BaseException) -> None:
        for seq in self.running:
            seq.finished = True
            seq.handle._push_error(error)
            self._free(seq)
        self.metrics.outcome("failed", len(self.running))
        self.running, self.pending, self.batch_key = [], None, None

    def _drop_cancelled(self, keys: set) -> None:
        keep = []
        for seq in self.running:
            if seq.key in keys or (self.cancelling and self.sync is None):
                self._finish(seq, "cancelled", push=True)
            else:
                keep.append(seq)
        self.running = keep

    # -- prefill --------------------------------------------------------------------------------------------
    def _prefill(self, group: Group, slots: list) -> None:
        start = time.perf_counter()
        p = group.params
        seeds = group.seeds if group.seeds is not None else [_seed(p) for _ in slots]
        try:
            logits, deltas, ids = self._prefill_rows(group, slots)
            first = self.state.admit(slots, group.lengths, deltas, p, seeds, ids, logits).tolist()
        except BaseException as error:  # noqa: BLE001 - the request fails, the engine serves the next
            with self.cond:
                self.free_slots.extend(slots)
            if isinstance(error, torch.OutOfMemoryError):
                error = EngineError(f"out of memory in the prefill of {len(slots)} prompt(s) "
                                    f"({sum(group.lengths)} tokens); send fewer or shorter prompts, or fewer "
                                    f"image pixels")
            elif not isinstance(error, Qwen2VLFastError):
                error = EngineError(f"the prefill failed: {error!r}")
            for h in group.handles:
                h._push_error(error)
            self.metrics.outcome("failed", len(group.handles))
            return
        seqs = []
        for i, (h, slot) in enumerate(zip(group.handles, slots)):
            stop_text = TextStream(self.decode_text, p.stop) if p.stop and self.decode_text else None
            seqs.append(Sequence(h, slot, group.lengths[i], deltas[i], p.temperature > 0, group.arrival, start,
                                 stop_text, key=(group.ordinal, i)))
        self.running.extend(seqs)
        self._emit(seqs, first)

    def _prefill_rows(self, group: Group, slots: list):
        model, dev = self.model, self.model.device
        inputs = group.inputs
        encode = self.vision_cache.encoder(model, group.keys) if self.vision_cache is not None else None
        ids, mask, embeds, position_ids, rope_deltas = model.prepare_inputs(
            inputs["input_ids"], inputs.get("attention_mask"), inputs.get("pixel_values"),
            inputs.get("image_grid_thw"), inputs.get("pixel_values_videos"), inputs.get("video_grid_thw"),
            inputs.get("second_per_grid_ts"), None, inputs.get("mm_token_type_ids"), inputs.get("pixel_frames"),
            encode=encode)
        b, L = ids.shape
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        flat = mask.reshape(-1)
        slot_ids = torch.tensor(slots, device=dev)
        token_slots = slot_ids.repeat_interleave(L)[flat]
        positions = (mask.long().cumsum(1) - 1).reshape(-1)[flat]
        meta = VarlenMeta.from_lengths(group.lengths, dev)
        hidden = model.language_model.prefill(embeds.reshape(b * L, -1)[flat], position_ids.reshape(3, -1)[:, flat],
                                              meta, self.cache, token_slots, positions)
        last = meta.cu_seqlens[1:].long() - 1
        logits = model.language_model.logits(hidden[last])
        # deltas in the cache's own (unpadded) coordinates: max M-RoPE id + 1 - prompt length
        deltas = (rope_deltas.view(-1).cpu() + (L - torch.tensor(group.lengths))).tolist()
        return logits, deltas, ids  # ids: the prompt, padding too, counts as seen (as transformers)

    # -- decode ---------------------------------------------------------------------------------------------
    def _decode_step(self) -> None:
        """Launch the step of the running sequences, then read and emit the previous step's tokens."""
        # A sequence whose token budget the step in flight exhausts is not launched again (no wasted step at the
        # end of every request); one ended by a stop token or string costs one dropped row.
        seqs = [s for s in self.running if s.generated + s.in_flight < s.handle.params.max_new_tokens]
        launched = self._launch(seqs) if seqs else None
        if self.pending is not None:
            self._collect(self.pending)
        self.pending = launched

    def _launch(self, seqs: list) -> LaunchedStep:
        """The host's part of a step: (when the batch changed) the new rows, one graph replay, one copy out."""
        b = len(seqs)
        bs = next(x for x in self.steps.buckets if x >= b)
        key = (tuple(s.slot for s in seqs), bs)
        if key != self.batch_key:  # admission, finish or cancel: rows change (padding rows on free slots)
            with self.cond:
                spare = sorted(self.free_slots)[:bs - b]
            self.state.set_rows(list(key[0]) + spare, b)
            self.batch_key = key
        out = self.steps.replay(bs, any(s.sampling for s in seqs))
        tokens, event = self.host_views[self.flip][bs], self.events[self.flip]
        self.flip ^= 1
        tokens.copy_(out, non_blocking=True)
        if event is not None:  # re-recorded only after the host has read this buffer's previous step
            event.record()
        for s in seqs:
            s.cache_len += 1
            s.in_flight += 1
        return LaunchedStep(seqs, tokens, event)

    def _collect(self, step: LaunchedStep) -> None:
        if step.event is not None:
            step.event.synchronize()
        tokens = step.tokens.tolist()
        for s in step.seqs:
            s.in_flight -= 1
        live = [(s, t) for s, t in zip(step.seqs, tokens) if not s.finished]
        if live:
            self._emit([s for s, _ in live], [t for _, t in live])

    def _emit(self, seqs: list, tokens: list) -> None:
        """Hand each sequence its new token; end those that stop (the device's own stop test agrees, except for
        stop strings, which only the host sees)."""
        now = time.perf_counter()
        gaps = []
        done = set()
        for s, tok in zip(seqs, tokens):
            s.last_token, s.generated = tok, s.generated + 1
            if s.generated == 1:
                s.first_time = now
                self.metrics.first_token(now - s.arrival, s.cache_len)
            else:
                gaps.append(now - s.last_time)
            s.last_time = now
            p = s.handle.params
            reason = None
            if not p.ignore_eos and tok in self.stop_token_ids:
                reason = "stop"
            elif s.stop_text is not None:
                s.stop_text.feed(tok, last=False)
                if s.stop_text.stopped:
                    reason = "stop"
            if reason is None and s.generated >= p.max_new_tokens:
                reason = "length"
            if reason is not None:
                self._finish(s, reason, push=False)
                done.add(id(s))
            s.handle._push_token(tok, reason is not None, reason)
        if gaps:
            self.metrics.next_tokens(gaps)
        if done:
            self.running = [s for s in self.running if id(s) not in done]

    def _finish(self, seq: Sequence, reason: str, push: bool) -> None:
        now = time.perf_counter()
        ttft = (seq.first_time or now) - seq.arrival
        decode_s = max(now - (seq.first_time or now), 1e-9)
        seq.handle.timings.update(
            ttft_s=ttft, prefill_s=ttft, queue_s=seq.prefill_start - seq.arrival, total_s=now - seq.arrival,
            prompt_tokens=seq.handle.prompt_tokens, generated_tokens=seq.generated,
            decode_tokens_per_s=(seq.generated - 1) / decode_s if seq.generated > 1 else 0.0,
            cuda_graphs=self.cuda_graphs)
        seq.finished = True
        self._free(seq)
        self.metrics.outcome("cancelled" if reason == "cancelled" else "finished")
        if push:
            seq.handle._push_end(reason)


def _seed(params) -> int:
    return params.seed if params.seed is not None else secrets.randbits(62)


def _cpu(inputs: dict) -> dict:
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
