"""The generation engine: continuous batching over a preallocated KV cache, with the vision tower, the packed
prefill and decode steps on CUDA graphs when the device has them.

    engine = Engine.from_pretrained(path, device="cuda", dtype="bfloat16")
    [c] = engine.generate([{"role": "user", "content": [{"type": "image", "image": "a.jpg"},
                                                         {"type": "text", "text": "Describe it."}]}])
    c.text, c.token_ids, c.timings
    for event in engine.stream(chat): print(event.text, end="")
    handle = engine.submit(chat, max_new_tokens=64)     # from any thread; `async for event in handle` too
    for event in handle: ...; handle.cancel(); handle.result()

Every entry point hands its prompts to one scheduler (scheduler.py), which owns the model, the cache and the
graphs and runs on its own thread: one Engine can be shared by threads, streams can be interleaved, and requests
join and leave the running batch at step boundaries. Each request gets the tokens it would get alone.

Positions follow the original release: prompt tokens get M-RoPE ids, decode positions are cache position +
rope delta on all three axes. A failed request (bad input, cache too small, out of memory) raises a typed
error and leaves the engine ready for the next one: the cache is only written, never resized.

Sizes are checked in the caller's thread before the expensive part: the number of prompts against max_batch,
then each prompt's length (+ max_new_tokens) against the KV cache, counted from the text and the media's sizes
alone (image headers and video container metadata, no pixel decoded; `Processor.count_tokens`), before any
image is resized or the vision tower runs; then exactly once the media are processed.

Defaults: the KV cache holds min(context, 8192) tokens per sequence, for max_batch (16) sequences; one image at
the checkpoints' own 12.8 MP budget is up to 16k tokens, and 16 x 16k tokens of cache would take 15 GiB for the
7B and 80 GiB for the 72B. Instead the image pixel budget is capped so that one image fills at most half the
cache: max_pixels = min(the checkpoint's max_pixels, max_len // 2 * 784), i.e. 4096 tokens (3.2 MP) with the
default cache. A 4000x3000 photo (15.3k tokens at 12.8 MP) is then resized to 2044x1540 (WxH, 4015 tokens) and
fits, instead of running the vision tower for tens of seconds and failing. The cap is the same on every device,
so a request gives the same tokens on the CPU and the GPU. For more, pass a larger `max_len` (the cap follows),
`max_pixels=` (the engine's budget for every image) or {"type": "image", "image": ..., "max_pixels": N}.
"""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Iterator, Optional

import torch

from ..errors import EngineError, InputError, PromptError, Qwen2VLFastError
from .cache import KVCache
from .decode_state import DecodeState
from .graphs import DecodeGraphs, EagerSteps
from .params import SamplingParams
from .request import Completion, RequestHandle, Sink, TokenEvent
from .scheduler import Group, Scheduler
from .step_sync import StepSync
from .vision_cache import VisionCache, maybe_keys

STOP_TOKEN_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>: the checkpoints' generation_config eos ids
DEFAULT_MAX_LEN = 8192
_SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "ignore_eos", "stop")

__all__ = ["Engine", "Completion", "TokenEvent", "RequestHandle"]


class Engine:
    def __init__(self, model, processor=None, max_batch: int = 16, max_len: Optional[int] = None,
                 cuda_graphs: bool = True, stop_token_ids=STOP_TOKEN_IDS, warmup: Optional[bool] = None,
                 max_pixels: Optional[int] = None, min_pixels: Optional[int] = None, vision_cache_mb: float = 256,
                 max_queue: int = 256):
        """max_len: KV cache tokens per sequence (default min(context, 8192)). max_pixels / min_pixels: the image
        pixel budget of every request (per-request and per-image options still override it); default max: the
        processor's, capped at max_len // 2 * 784 so that one image fits in half the cache (see the module
        docstring). vision_cache_mb: the byte budget of the vision-tower output cache (0: off). max_queue: how many
        sequences may wait for a slot before submissions are refused (QueueFullError)."""
        self.model, self.processor = model, processor
        cfg = model.config.text
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise InputError(f"max_batch={max_batch!r} must be an integer >= 1")
        self.max_len = int(max_len or min(cfg.max_position_embeddings, DEFAULT_MAX_LEN))
        self.max_pixels, self.min_pixels = max_pixels, min_pixels
        self.cache = KVCache.allocate(cfg, max_batch, self.max_len, model.dtype, model.device)
        self.stop_token_ids = tuple(stop_token_ids)
        self.last_timings: Optional[dict] = None  # of the last finished generate / stream
        self.vision_cache = VisionCache(vision_cache_mb)
        tp = getattr(model, "tensor_parallel", None)
        sync = StepSync(tp.group) if tp is not None else None  # ranks run the same steps (step_sync.py)
        state = DecodeState(model.language_model, self.cache, self.stop_token_ids, model.ops)
        self.graphs = DecodeGraphs(state) if cuda_graphs and model.device.type == "cuda" else None
        self.scheduler = Scheduler(model, self.cache, state, self.graphs or EagerSteps(state), self.vision_cache,
                                   max_queue, decode_text=self._decode if processor is not None else None, sync=sync)
        self._ids = itertools.count()
        if warmup if warmup is not None else model.device.type == "cuda":
            self.warmup()

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None, cuda_graphs: bool = True, backend: str = "auto",
                        max_batch: int = 16, max_len: Optional[int] = None, warmup: Optional[bool] = None,
                        dispatch: str = "measure", dispatch_cache=None, max_pixels: Optional[int] = None,
                        min_pixels: Optional[int] = None, vision_cache_mb: float = 256,
                        max_queue: int = 256, tensor_parallel=False) -> "Engine":
        """tensor_parallel: see `qwen2vl_fast.load`; every rank builds the engine and submits the same requests
        in the same order (the ranks' schedulers then run the same steps, whose collectives pair up)."""
        import qwen2vl_fast
        from ..processing.processor import Processor

        model = qwen2vl_fast.load(path, device=device, dtype=dtype, backend=backend, dispatch=dispatch,
                                  dispatch_cache=dispatch_cache, tensor_parallel=tensor_parallel)
        try:
            processor = Processor.from_pretrained(path)
        except PromptError:  # no tokenizer: the engine still takes processed dicts (texts stay empty)
            processor = None
        return cls(model, processor, max_batch=max_batch, max_len=max_len, cuda_graphs=cuda_graphs, warmup=warmup,
                   max_pixels=max_pixels, min_pixels=min_pixels, vision_cache_mb=vision_cache_mb,
                   max_queue=max_queue)

    def warmup(self, prompt_lengths=(64, 1024)) -> list:
        """Before the first request (by default on CUDA): measure the dispatch candidates of every raced op at
        this engine's prefill shapes (text prompts of `prompt_lengths` tokens) and decode shapes (every batch
        bucket of the CUDA graphs, measured in the eager step before each capture), and capture the graphs.
        Image shapes are measured on their first request. Returns the dispatch report."""
        from ..testing.inputs import text_prompt
        from ..tuning import measuring

        lengths = sorted({min(int(n), self.max_len - 2) for n in prompt_lengths if self.max_len > 2})
        with measuring(self.model.ops):
            for n in lengths:
                if n > 0:
                    self.generate(text_prompt(n), max_new_tokens=2, ignore_eos=True)
            if self.graphs is not None and not self.graphs.graphs:  # capture the greedy and the sampling graphs
                self.submit(text_prompt(1), max_new_tokens=2, ignore_eos=True).result()
                self.submit(text_prompt(1), max_new_tokens=2, ignore_eos=True, temperature=1.0, seed=0).result()
        return self.model.ops.dispatch_report()

    # -- public API ---------------------------------------------------------------------------------------

    def generate(self, prompts, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, seed: Optional[int] = None,
                 ignore_eos: bool = False, stop=(), min_pixels: Optional[int] = None,
                 max_pixels: Optional[int] = None) -> list:
        """prompts: one chat (list of messages), a list of chats, or a processed dict (input_ids,
        attention_mask, pixel_values, image_grid_thw, ...). Returns one Completion per prompt. The prompts are
        prefilled together and decode in the running batch with whatever else the engine serves."""
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, ignore_eos,
                                stop)
        handles = self._submit(prompts, params, Sink(), min_pixels, max_pixels)
        for _ in self._drain(handles):
            pass
        return [h.completion() for h in handles]

    def stream(self, prompts, **kwargs) -> Iterator[TokenEvent]:
        """Yields a TokenEvent per generated token, as it comes (same arguments as generate). Closing the
        iterator early cancels the prompts still running."""
        media = {k: kwargs.pop(k) for k in ("min_pixels", "max_pixels") if k in kwargs}
        params = SamplingParams(**kwargs)
        handles = self._submit(prompts, params, Sink(), media.get("min_pixels"), media.get("max_pixels"))
        yield from self._drain(handles)

    def submit(self, prompt, **kwargs) -> RequestHandle:
        """Queue one prompt (a chat, or a processed dict of one row) and return its handle at once (after the
        size checks and the media preprocessing, which run in this thread and raise typed errors here). Takes
        generate's sampling arguments and min_pixels / max_pixels."""
        unknown = set(kwargs) - set(_SAMPLING) - {"min_pixels", "max_pixels"}
        if unknown:
            raise InputError(f"unknown submit arguments {sorted(unknown)}; sampling: {', '.join(_SAMPLING)}; "
                             f"media: min_pixels, max_pixels")
        params = SamplingParams(**{k: v for k, v in kwargs.items() if k in _SAMPLING})
        if isinstance(prompt, dict) and "input_ids" in prompt and torch.as_tensor(prompt["input_ids"]).dim() == 2 \
                and torch.as_tensor(prompt["input_ids"]).shape[0] != 1:
            raise PromptError("submit takes one prompt: a processed dict must have one row (use generate for a "
                              "batch)")
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (list, tuple)):
            raise PromptError("submit takes one prompt (a chat); use generate or stream for several")
        [handle] = self._submit(prompt, params, None, kwargs.get("min_pixels"), kwargs.get("max_pixels"))
        return handle

    def metrics(self) -> dict:
        """Counters and histograms for monitoring (the server's /metrics): requests by outcome, queue depth,
        running sequences, KV slots in use, prompt/generated tokens, TTFT and inter-token latency, vision cache."""
        state = self.scheduler.snapshot()
        state["vision_cache"] = self.vision_cache.stats()
        return state

    def follow(self) -> None:
        """Tensor parallelism, led mode (the server): on ranks > 0, run rank 0's requests until it closes. Rank 0
        (which takes the requests) must have called `lead()`."""
        sync = self.scheduler.sync
        if sync is None or sync.is_leader:
            raise EngineError("follow() is for tensor-parallel ranks > 0 (rank 0 takes the requests)")
        sync.ship = True
        self.scheduler.follow()

    def lead(self) -> None:
        """Tensor parallelism, led mode: rank 0 ships every admitted request's inputs to the ranks in follow()."""
        sync = self.scheduler.sync
        if sync is None or not sync.is_leader:
            raise EngineError("lead() is for tensor-parallel rank 0")
        sync.ship = True

    def close(self, cancel: bool = True, timeout: Optional[float] = None) -> None:
        """Take no new requests; cancel=True ends the waiting and running ones as "cancelled", cancel=False lets
        them finish. Waits for the engine thread."""
        self.scheduler.close(cancel, timeout)

    # -- submission -----------------------------------------------------------------------------------------

    def _submit(self, prompts, params: SamplingParams, sink: Optional[Sink], min_pixels, max_pixels) -> list:
        try:
            inputs, lengths = self._inputs(prompts, params, min_pixels, max_pixels)
            keys = maybe_keys(self.vision_cache, inputs)
            dev = self.model.device
            inputs = {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                      for k, v in inputs.items()}
        except Qwen2VLFastError:
            self.scheduler.metrics.outcome("rejected", 1)
            raise
        request_id = f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        handles = []
        for i, n in enumerate(lengths):
            h = RequestHandle(request_id if len(lengths) == 1 else f"{request_id}-{i}", i, params, self._decode,
                              sink)
            h.prompt_tokens = n
            handles.append(h)
        self.scheduler.submit(Group(handles, inputs, lengths, params, keys))
        return handles

    def _drain(self, handles: list) -> Iterator[TokenEvent]:
        """The events of handles sharing one sink, as they come; cancels the unfinished ones if abandoned."""
        sink = handles[0].sink
        t0 = time.perf_counter()
        try:
            while not all(h.done for h in handles):
                item = sink.get()
                handle = handles[item[0]]
                try:
                    yield handle.event(item)
                except Qwen2VLFastError:
                    for h in handles:  # the group failed together (its prefill is shared)
                        h.cancel()
                    raise
        finally:
            for h in handles:
                if not h.done:
                    h.cancel()
        self.last_timings = _group_timings(handles, time.perf_counter() - t0, self.graphs is not None)

    def image_max_pixels(self) -> Optional[int]:
        """The pixel budget this engine gives images that set none themselves (see the module docstring)."""
        if self.max_pixels is not None or self.processor is None:
            return self.max_pixels
        ip = self.processor.image_processor
        return min(ip.max_pixels, max(ip.min_pixels, self.max_len // 2 * ip.factor ** 2))

    def _inputs(self, prompts, params: SamplingParams, min_pixels=None, max_pixels=None):
        """The processed batch (tensors on the CPU for chats) and each row's exact length, after checking from
        the sizes alone (before any pixel work) that it fits."""
        if isinstance(prompts, dict):
            if "input_ids" not in prompts:
                raise PromptError("a processed prompt dict needs input_ids")
            lengths = _dict_lengths(prompts)
            if lengths is None:
                raise PromptError("a processed prompt dict needs input_ids of shape (batch, length) and an "
                                  "attention_mask of the same shape (or none)")
            self._check_fits(lengths, params)
            return dict(prompts), lengths
        if self.processor is None:
            raise PromptError("this checkpoint has no tokenizer.json: pass processed dicts (input_ids, ...)")
        if isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], dict):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise PromptError("prompts must be a chat, a list of chats or a processed dict")
        prompts = list(prompts)
        self._check_batch(len(prompts))
        kwargs = {}
        budget = max_pixels if max_pixels is not None else self.image_max_pixels()
        if budget is not None:
            kwargs["max_pixels"] = budget
        floor = min_pixels if min_pixels is not None else self.min_pixels
        if floor is not None:
            kwargs["min_pixels"] = floor
        self._check_fits(self.processor.count_tokens(prompts, **kwargs), params, exact=False)
        inputs = self.processor(prompts, **kwargs)
        lengths = inputs["attention_mask"].sum(1).tolist()
        self._check_fits(lengths, params)  # exact now (what count_tokens could not know)
        return inputs, lengths

    def _check_batch(self, b: int):
        if b > self.cache.max_batch:
            raise EngineError(f"{b} prompts exceed the engine's max_batch {self.cache.max_batch}: send at most "
                              f"{self.cache.max_batch} per call, or build the engine with max_batch={b}")

    def _check_fits(self, lengths: list, params: SamplingParams, exact: bool = True):
        """lengths: each prompt's token count (exact=False: a lower bound where a medium could not be counted)."""
        self._check_batch(len(lengths))
        if exact and min(lengths) == 0:
            raise PromptError("empty prompt: a row of the batch has no tokens")
        i = max(range(len(lengths)), key=lengths.__getitem__)
        longest = lengths[i] + params.max_new_tokens
        if longest > self.max_len:
            which = f"prompt {i + 1} of {len(lengths)}" if len(lengths) > 1 else "prompt"
            budget = self.image_max_pixels()
            raise PromptError(
                f"{which} ({lengths[i]} tokens) + max_new_tokens ({params.max_new_tokens}) = {longest} exceeds the "
                f"KV cache length {self.max_len}: shorten the prompt or max_new_tokens, give images a lower "
                f"max_pixels (an image resized to HxW costs H*W/784 tokens"
                + (f"; this engine's default is {budget} pixels" if budget is not None else "")
                + "), or build the engine with a larger max_len (--max-len)")

    def _decode(self, token_ids) -> str:
        return self.processor.decode(token_ids) if self.processor is not None else ""


def _group_timings(handles: list, wall_s: float, cuda_graphs: bool) -> dict:
    """A call's timings over its prompts: first token when the slowest prompt had its first, tokens summed."""
    timings = [h.timings for h in handles]
    n_gen = sum(t.get("generated_tokens", 0) for t in timings)
    prefill = max((t.get("prefill_s", 0.0) for t in timings), default=0.0)
    decode_s = max(wall_s - prefill, 1e-9)
    return {"prefill_s": prefill, "total_s": wall_s, "generated_tokens": n_gen,
            "decode_tokens_per_s": (n_gen - len(handles)) / decode_s if n_gen > len(handles) else 0.0,
            "cuda_graphs": cuda_graphs}


def _dict_lengths(inputs: dict) -> Optional[list]:
    """Each row's token count of a processed dict, from input_ids / attention_mask alone; None if malformed."""
    try:
        ids = torch.as_tensor(inputs["input_ids"])
        mask = inputs.get("attention_mask")
        if ids.dim() != 2 or ids.shape[0] == 0:
            return None
        if mask is None:
            return [ids.shape[1]] * ids.shape[0]
        mask = torch.as_tensor(mask)
        return mask.bool().sum(1).tolist() if mask.shape == ids.shape else None
    except (TypeError, ValueError, RuntimeError):
        return None
