"""The generation engine: prefill a packed batch of prompts (vision tower + text in one pass), then decode one
token per step per sequence from a preallocated KV cache, on CUDA graphs when the device has them.

    engine = Engine.from_pretrained(path, device="cuda", dtype="bfloat16")
    [c] = engine.generate([{"role": "user", "content": [{"type": "image", "image": "a.jpg"},
                                                         {"type": "text", "text": "Describe it."}]}])
    c.text, c.token_ids, c.timings
    for event in engine.stream(chat): print(event.text, end="")

Positions follow the original release: prompt tokens get M-RoPE ids, decode positions are cache position +
rope delta on all three axes. A failed request (bad input, cache too small, out of memory) raises a typed
error and leaves the engine ready for the next one: the cache is only written, never resized.

Sizes are checked before the expensive part: the number of prompts against max_batch, then each prompt's length
(+ max_new_tokens) against the KV cache, counted from the text and the images' sizes alone (headers, no pixel
decoded; `Processor.count_tokens`), before any image is resized or the vision tower runs. Videos are counted
when they have been processed (their frame count needs the container), so a prompt too long because of a video
is refused after preprocessing but still before the decoder.

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

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from ..errors import EngineError, PromptError
from ..ops import VarlenMeta
from ..ops.sampling import greedy
from .cache import KVCache
from .graphs import DecodeGraphs
from .params import SamplingParams

STOP_TOKEN_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>: the checkpoints' generation_config eos ids
DEFAULT_MAX_LEN = 8192


@dataclass
class Completion:
    token_ids: list
    text: str
    finish_reason: str  # "stop" (a stop token, included in token_ids) or "length"
    timings: dict = field(default_factory=dict)


@dataclass
class TokenEvent:
    index: int  # which prompt of the batch
    token_id: int
    text: str  # the text this token adds (may be "" while a multi-byte character is incomplete)
    finished: bool


class Engine:
    def __init__(self, model, processor=None, max_batch: int = 16, max_len: Optional[int] = None,
                 cuda_graphs: bool = True, stop_token_ids=STOP_TOKEN_IDS, warmup: Optional[bool] = None,
                 max_pixels: Optional[int] = None):
        """max_len: KV cache tokens per sequence (default min(context, 8192)). max_pixels: the image pixel budget
        of every request (per-image options still override it); default: the processor's, capped at
        max_len // 2 * 784 so that one image fits in half the cache (see the module docstring)."""
        self.model, self.processor = model, processor
        cfg = model.config.text
        self.max_len = int(max_len or min(cfg.max_position_embeddings, DEFAULT_MAX_LEN))
        self.max_pixels = max_pixels
        self.cache = KVCache.allocate(cfg, max_batch, self.max_len, model.dtype, model.device)
        self.stop_token_ids = tuple(stop_token_ids)
        self.last_timings: Optional[dict] = None  # of the last finished generate / stream
        self.graphs = None
        if cuda_graphs and model.device.type == "cuda":
            self.graphs = DecodeGraphs(model.language_model, self.cache)
        if warmup if warmup is not None else model.device.type == "cuda":
            self.warmup()

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None, cuda_graphs: bool = True, backend: str = "auto",
                        max_batch: int = 16, max_len: Optional[int] = None, warmup: Optional[bool] = None,
                        dispatch: str = "measure", dispatch_cache=None, max_pixels: Optional[int] = None) -> "Engine":
        import qwen2vl_fast
        from ..processing.processor import Processor

        model = qwen2vl_fast.load(path, device=device, dtype=dtype, backend=backend, dispatch=dispatch,
                                  dispatch_cache=dispatch_cache)
        try:
            processor = Processor.from_pretrained(path)
        except PromptError:  # no tokenizer: the engine still takes processed dicts (texts stay empty)
            processor = None
        return cls(model, processor, max_batch=max_batch, max_len=max_len, cuda_graphs=cuda_graphs, warmup=warmup,
                   max_pixels=max_pixels)

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
            if self.graphs is not None and not self.graphs.graphs:
                self.graphs.capture()
        return self.model.ops.dispatch_report()

    # -- public API ---------------------------------------------------------------------------------------

    def generate(self, prompts, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, seed: Optional[int] = None,
                 ignore_eos: bool = False) -> list:
        """prompts: one chat (list of messages), a list of chats, or a processed dict (input_ids,
        attention_mask, pixel_values, image_grid_thw, ...). Returns one Completion per prompt."""
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, ignore_eos)
        report: dict = {}
        for _ in self._run(prompts, params, report):
            pass
        self.last_timings = report["timings"]
        return [Completion(t, self._decode(t), r, dict(report["timings"]))
                for t, r in zip(report["tokens"], report["reasons"])]

    def stream(self, prompts, **kwargs) -> Iterator[TokenEvent]:
        """Yields a TokenEvent per generated token, as it comes (same arguments as generate)."""
        params = SamplingParams(**kwargs)
        emitted: dict = {}
        report: dict = {}
        for index, token_id, finished, so_far in self._run(prompts, params, report):
            text = self._decode(so_far)
            delta = text[len(emitted.get(index, "")):] if not text.endswith("\ufffd") else ""
            if delta:
                emitted[index] = text
            yield TokenEvent(index, token_id, delta, finished)
        self.last_timings = report.get("timings")

    # -- the loop -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _run(self, prompts, params: SamplingParams, report: dict):
        """Yields (prompt index, token id, finished, tokens so far) per generated token; fills `report` with
        the tokens, finish reasons and timings at the end."""
        t0 = time.perf_counter()
        inputs = self._inputs(prompts, params)
        batch = self._prefill(inputs, params)
        b, lengths, deltas, logits = batch
        dev = self.model.device
        gen = torch.Generator(device=dev)
        gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        seen = torch.zeros(b, logits.shape[-1], dtype=torch.bool, device=dev)
        seen.scatter_(1, inputs["input_ids"].to(dev), True)  # the prompt counts, padding too (as transformers)
        knobs = _knobs(params, b, dev)
        stop = set() if params.ignore_eos else set(self.stop_token_ids)
        out_tokens = [[] for _ in range(b)]
        finished = [False] * b
        reasons = ["length"] * b
        slots = torch.arange(b, device=dev)
        ttft = None
        for step in range(params.max_new_tokens):
            if params.temperature == 0:  # greedy: no noise, no vocabulary sort
                nxt = greedy(logits, knobs[3], seen)
            else:
                noise = torch.empty_like(logits, dtype=torch.float32).exponential_(generator=gen)
                nxt = self.model.ops.sample(logits, *knobs, seen, noise)
            seen.scatter_(1, nxt.view(-1, 1), True)
            host = nxt.tolist()  # the one sync per step: tokens must reach the caller (streaming, stop)
            if ttft is None:
                ttft = time.perf_counter() - t0
            for i, tok in enumerate(host):
                if finished[i]:
                    continue
                out_tokens[i].append(tok)
                if tok in stop:
                    finished[i], reasons[i] = True, "stop"
                elif len(out_tokens[i]) >= params.max_new_tokens:
                    finished[i] = True
                yield i, tok, finished[i], out_tokens[i]
            if all(finished):
                break
            positions = lengths + step  # cache position of the token just sampled
            logits = self._decode_step(nxt, positions + deltas, slots, positions + 1)
        total = time.perf_counter() - t0
        n_gen = sum(len(t) for t in out_tokens)
        decode_s = max(total - (ttft or total), 1e-9)
        report.update(tokens=out_tokens, reasons=reasons, timings={
            "prefill_s": ttft, "total_s": total, "generated_tokens": n_gen,
            "decode_tokens_per_s": (n_gen - b) / decode_s if n_gen > b else 0.0,
            "cuda_graphs": self.graphs is not None})

    def image_max_pixels(self) -> Optional[int]:
        """The pixel budget this engine gives images that set none themselves (see the module docstring)."""
        if self.max_pixels is not None or self.processor is None:
            return self.max_pixels
        ip = self.processor.image_processor
        return min(ip.max_pixels, max(ip.min_pixels, self.max_len // 2 * ip.factor ** 2))

    def _inputs(self, prompts, params: SamplingParams) -> dict:
        """The processed batch, after checking from the sizes alone (before any pixel work) that it fits."""
        if isinstance(prompts, dict):
            if "input_ids" not in prompts:
                raise PromptError("a processed prompt dict needs input_ids")
            lengths = _dict_lengths(prompts)
            if lengths is not None:  # else prepare_inputs says what is wrong with the dict
                self._check_fits(lengths, params)
            return dict(prompts)
        if self.processor is None:
            raise PromptError("this checkpoint has no tokenizer.json: pass processed dicts (input_ids, ...)")
        if isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], dict):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise PromptError("prompts must be a chat, a list of chats or a processed dict")
        prompts = list(prompts)
        self._check_batch(len(prompts))
        budget = self.image_max_pixels()
        kwargs = {} if budget is None else {"max_pixels": budget}
        self._check_fits(self.processor.count_tokens(prompts, **kwargs), params, exact=False)
        return self.processor(prompts, device=self.model.device, **kwargs)

    def _check_batch(self, b: int):
        if b > self.cache.max_batch:
            raise EngineError(f"{b} prompts exceed the engine's max_batch {self.cache.max_batch}: send at most "
                              f"{self.cache.max_batch} per call, or build the engine with max_batch={b}")

    def _check_fits(self, lengths: list, params: SamplingParams, exact: bool = True):
        """lengths: each prompt's token count (exact=False: a lower bound, videos not yet counted)."""
        self._check_batch(len(lengths))
        if exact and min(lengths) == 0:
            raise PromptError("empty prompt: a row of the batch has no tokens")
        i = max(range(len(lengths)), key=lengths.__getitem__)
        longest = lengths[i] + params.max_new_tokens
        if longest > self.max_len:
            which = f"prompt {i} of {len(lengths)}" if len(lengths) > 1 else "prompt"
            budget = self.image_max_pixels()
            raise PromptError(
                f"{which} ({lengths[i]} tokens) + max_new_tokens ({params.max_new_tokens}) = {longest} exceeds the "
                f"KV cache length {self.max_len}: shorten the prompt or max_new_tokens, give images a lower "
                f"max_pixels (an image resized to HxW costs H*W/784 tokens"
                + (f"; this engine's default is {budget} pixels" if budget is not None else "")
                + "), or build the engine with a larger max_len (--max-len)")

    def _prefill(self, inputs: dict, params: SamplingParams):
        model, dev = self.model, self.model.device
        ids, mask, embeds, position_ids, rope_deltas = model.prepare_inputs(
            inputs["input_ids"], inputs.get("attention_mask"), inputs.get("pixel_values"),
            inputs.get("image_grid_thw"), inputs.get("pixel_values_videos"), inputs.get("video_grid_thw"),
            inputs.get("second_per_grid_ts"), None, inputs.get("mm_token_type_ids"), inputs.get("pixel_frames"))
        b, L = ids.shape
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        host_lengths = mask.sum(1).tolist()
        self._check_fits(host_lengths, params)  # again, exact now: videos are counted (and dicts validated)
        flat = mask.reshape(-1)
        slots = torch.arange(b, device=dev).repeat_interleave(L)[flat]
        positions = (mask.long().cumsum(1) - 1).reshape(-1)[flat]
        meta = VarlenMeta.from_lengths(host_lengths, dev)
        try:
            hidden = model.language_model.prefill(embeds.reshape(b * L, -1)[flat], position_ids.reshape(3, -1)[:, flat],
                                                  meta, self.cache, slots, positions)
        except torch.OutOfMemoryError:
            raise EngineError(f"out of memory in the prefill of {b} prompts ({sum(host_lengths)} tokens); send "
                              f"fewer or shorter prompts, or fewer image pixels") from None
        last = meta.cu_seqlens[1:].long() - 1
        logits = model.language_model.logits(hidden[last])
        lengths = torch.tensor(host_lengths, device=dev)
        # deltas in the cache's own (unpadded) coordinates: max M-RoPE id + 1 - prompt length
        deltas = rope_deltas.view(-1).to(dev) + (L - lengths)
        return b, lengths, deltas, logits

    def _decode_step(self, tokens, rope_positions, slots, lengths):
        if self.graphs is not None:
            return self.graphs.run(tokens, rope_positions, slots, lengths)
        lm = self.model.language_model
        hidden = lm.decode(lm.embed(tokens), rope_positions, self.cache, slots, lengths)
        return lm.logits(hidden)

    def _decode(self, token_ids) -> str:
        return self.processor.decode(token_ids) if self.processor is not None else ""


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


def _knobs(params: SamplingParams, b: int, dev):
    def full(value, dtype):
        return torch.full((b,), value, dtype=dtype, device=dev)
    return (full(float(params.temperature), torch.float32), full(int(params.top_k), torch.int64),
            full(float(params.top_p), torch.float32), full(float(params.repetition_penalty), torch.float32))

