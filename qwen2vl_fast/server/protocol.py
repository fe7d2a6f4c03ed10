"""The OpenAI chat-completions request, checked field by field, and the response / stream-chunk shapes.

Every field of a request is either used, accepted because it holds its default (OpenAI fields this server
does not implement, e.g. `n=1`, `presence_penalty=0`, `logprobs=false`), or refused with a 400 naming it:
nothing is silently ignored.

Defaults: `temperature` 1.0 (OpenAI's; send 0 for greedy decoding), `top_p` 1.0, `top_k` off, no seed,
`max_tokens` min(the server's default_max_tokens (512), the tokens left in the KV cache after the prompt).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import bad_request
from .media import MediaFiles, MediaPolicy

DEFAULT_TEMPERATURE = 1.0
DEFAULT_MAX_TOKENS = 512

_USED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
         "stop", "repetition_penalty", "stream", "stream_options", "mm_processor_kwargs", "ignore_eos",
         "return_token_ids"}


def _none_or(*values):
    return lambda v: v is None or any(v == x and type(v) is type(x) for x in values)


def _number_zero(v):
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0)


# OpenAI fields accepted only with the value that means "off" / the default; anything else is refused
_DEFAULT_ONLY = {
    "n": (_none_or(1), "only n=1 is supported"),
    "frequency_penalty": (_number_zero, "only 0 is supported (repetition_penalty is)"),
    "presence_penalty": (_number_zero, "only 0 is supported (repetition_penalty is)"),
    "logprobs": (_none_or(False), "logprobs are not supported"),
    "top_logprobs": (_none_or(0), "logprobs are not supported"),
    "logit_bias": (lambda v: v is None or v == {}, "logit_bias is not supported"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, "only {\"type\": \"text\"} is supported"),
    "tools": (lambda v: v is None or v == [], "tool calling is not supported"),
    "tool_choice": (_none_or("none"), "tool calling is not supported"),
    "parallel_tool_calls": (_none_or(True, False), "must be a boolean"),
    "functions": (lambda v: v is None or v == [], "function calling is not supported"),
    "function_call": (_none_or("none"), "function calling is not supported"),
    "store": (_none_or(False), "stored completions are not supported"),
    "metadata": (lambda v: v is None or isinstance(v, dict), "must be an object"),
    "user": (lambda v: v is None or isinstance(v, str), "must be a string"),
    "safety_identifier": (lambda v: v is None or isinstance(v, str), "must be a string"),
    "prompt_cache_key": (lambda v: v is None or isinstance(v, str), "must be a string"),
    "service_tier": (_none_or("auto", "default"), "only 'auto' is supported"),
    "modalities": (lambda v: v is None or v == ["text"], "only text output is supported"),
    "audio": (_none_or(), "audio output is not supported"),
    "prediction": (_none_or(), "predicted outputs are not supported"),
    "reasoning_effort": (_none_or(), "reasoning_effort is not supported"),
    "web_search_options": (_none_or(), "web search is not supported"),
}

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_MESSAGE_DEFAULT_ONLY = {"tool_calls": lambda v: v is None or v == [], "refusal": lambda v: v is None,
                         "audio": lambda v: v is None, "function_call": lambda v: v is None}


@dataclass
class ChatRequest:
    model: str
    messages: list  # OpenAI messages, checked; media URLs not yet resolved
    stream: bool = False
    include_usage: bool = False
    max_tokens: Optional[int] = None  # None: as many as fit, at most the server default
    sampling: dict = field(default_factory=dict)  # keyword arguments of Engine.submit (without max_new_tokens)
    return_token_ids: bool = False  # vLLM's extension: the generated ids in each choice (and each chunk)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _tname(v) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__)


def parse_chat_request(body: Any) -> ChatRequest:
    """A decoded JSON body -> ChatRequest, or APIError(400) naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_tname(body)}")
    for key, value in body.items():
        if key in _USED:
            continue
        if key in _DEFAULT_ONLY:
            ok, why = _DEFAULT_ONLY[key]
            if not ok(value):
                raise bad_request(f"unsupported value for '{key}': {why}", key, "unsupported_parameter")
            continue
        raise bad_request(f"unknown or unsupported field '{key}'", key, "unsupported_parameter")

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a non-empty string", "model")
    messages = _check_messages(body.get("messages"))

    stream = _opt(body, "stream", bool, False)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object", "stream_options")
        for key, value in options.items():
            if key == "include_usage":
                if value is not None and not isinstance(value, bool):
                    raise bad_request("'stream_options.include_usage' must be a boolean",
                                      "stream_options.include_usage")
                include_usage = bool(value)
            elif key == "include_obfuscation" and value in (None, False):
                continue
            else:
                raise bad_request(f"unsupported field 'stream_options.{key}'", f"stream_options.{key}",
                                  "unsupported_parameter")

    max_tokens = _max_tokens(body)
    sampling: dict = {}
    t = body.get("temperature")
    if t is not None and (not _is_real(t) or t < 0):
        raise bad_request(f"'temperature' must be a number >= 0 (0: greedy), got {t!r}", "temperature")
    sampling["temperature"] = float(DEFAULT_TEMPERATURE if t is None else t)
    p = body.get("top_p")
    if p is not None and (not _is_real(p) or not 0 < p <= 1):
        raise bad_request(f"'top_p' must be a number in (0, 1], got {p!r}", "top_p")
    sampling["top_p"] = float(1.0 if p is None else p)
    k = body.get("top_k")
    if k is not None and (not _is_int(k) or k < -1):
        raise bad_request(f"'top_k' must be an integer >= 0 (0 or -1: off), got {k!r}", "top_k")
    sampling["top_k"] = 0 if k is None or k < 0 else k
    r = body.get("repetition_penalty")
    if r is not None and (not _is_real(r) or r <= 0):
        raise bad_request(f"'repetition_penalty' must be a number > 0 (1: off), got {r!r}", "repetition_penalty")
    sampling["repetition_penalty"] = float(1.0 if r is None else r)
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not -2**63 <= seed < 2**64):
        raise bad_request(f"'seed' must be a 64-bit integer, got {seed!r}", "seed")
    sampling["seed"] = seed
    sampling["stop"] = _stop(body.get("stop"))
    sampling["ignore_eos"] = _opt(body, "ignore_eos", bool, False)
    sampling.update(_mm_kwargs(body.get("mm_processor_kwargs")))
    return ChatRequest(model, messages, stream, include_usage, max_tokens, sampling,
                       _opt(body, "return_token_ids", bool, False))


def _opt(body, key, kind, default):
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, kind):
        raise bad_request(f"'{key}' must be {_tname(kind())}, got {_tname(v)}", key)
    return v


def _max_tokens(body) -> Optional[int]:
    given = {k: body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None}
    for key, v in given.items():
        if not _is_int(v) or v < 1:
            raise bad_request(f"'{key}' must be an integer >= 1, got {v!r}", key)
    if len(set(given.values())) > 1:
        raise bad_request("'max_tokens' and 'max_completion_tokens' disagree; send one of them", "max_tokens")
    return next(iter(given.values()), None)


def _stop(stop) -> tuple:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad_request("'stop' must be a string or an array of strings", "stop")
    if any(not s for s in items):
        raise bad_request("'stop' strings must not be empty", "stop")
    if len(items) > 16:
        raise bad_request(f"'stop' holds {len(items)} strings; at most 16 are supported", "stop")
    return tuple(items)


def _mm_kwargs(kwargs) -> dict:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise bad_request("'mm_processor_kwargs' must be an object", "mm_processor_kwargs")
    out = {}
    for key, v in kwargs.items():
        param = f"mm_processor_kwargs.{key}"
        if key not in ("min_pixels", "max_pixels"):
            raise bad_request(f"unsupported field '{param}' (supported: min_pixels, max_pixels)", param,
                              "unsupported_parameter")
        if v is None:
            continue
        if not _is_int(v) or v < (0 if key == "min_pixels" else 1):
            raise bad_request(f"'{param}' must be a positive integer (pixels), got {v!r}", param)
        out[key] = v
    if out.get("min_pixels", 0) > out.get("max_pixels", math.inf):
        raise bad_request("'mm_processor_kwargs.min_pixels' is larger than max_pixels", "mm_processor_kwargs")
    return out


def _check_messages(messages) -> list:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' is required and must be a non-empty array", "messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"'{where}' must be an object", where)
        role = m.get("role")
        if role in ("tool", "function"):
            raise bad_request(f"'{where}.role' {role!r}: tool messages are not supported", f"{where}.role")
        if role not in _ROLES:
            raise bad_request(f"'{where}.role' must be one of {sorted(_ROLES)}, got {role!r}", f"{where}.role")
        for key, value in m.items():
            if key in ("role", "content"):
                continue
            if key in _MESSAGE_DEFAULT_ONLY and _MESSAGE_DEFAULT_ONLY[key](value):
                continue
            raise bad_request(f"unsupported field '{where}.{key}'", f"{where}.{key}", "unsupported_parameter")
        if "content" not in m:
            raise bad_request(f"'{where}.content' is required", f"{where}.content")
        content = m["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise bad_request(f"'{where}.content' must be a string or an array of content parts", f"{where}.content")
        for j, part in enumerate(content):
            _check_part(part, f"{where}.content[{j}]", role)
    return messages


_PARTS = {"text": "text", "image_url": "image", "video_url": "video", "image": "image", "video": "video"}


def _check_part(part, where: str, role: str):
    if not isinstance(part, dict):
        raise bad_request(f"'{where}' must be an object", where)
    kind = part.get("type")
    if kind not in _PARTS:
        raise bad_request(f"'{where}.type' {kind!r} is not supported (supported: text, image_url, video_url)",
                          f"{where}.type")
    if _PARTS[kind] != "text" and role != "user":
        raise bad_request(f"'{where}': images and videos are only allowed in user messages", where)
    extra = set(part) - {"type", kind}
    if extra:
        key = sorted(extra)[0]
        raise bad_request(f"unsupported field '{where}.{key}'", f"{where}.{key}", "unsupported_parameter")
    if kind not in part:
        raise bad_request(f"'{where}.{kind}' is required for a part of type {kind!r}", f"{where}.{kind}")
    value = part[kind]
    if kind == "text":
        if not isinstance(value, str):
            raise bad_request(f"'{where}.text' must be a string", f"{where}.text")
    elif kind in ("image_url", "video_url"):
        if isinstance(value, dict):
            for key, v in value.items():
                if key == "url" or (key == "detail" and v in (None, "auto")):
                    continue
                why = "only 'auto' is supported (use mm_processor_kwargs max_pixels)" if key == "detail" else \
                    "unsupported field"
                raise bad_request(f"'{where}.{kind}.{key}': {why}", f"{where}.{kind}.{key}", "unsupported_parameter")
            if not isinstance(value.get("url"), str):
                raise bad_request(f"'{where}.{kind}.url' is required and must be a string", f"{where}.{kind}.url")
        elif not isinstance(value, str):
            raise bad_request(f"'{where}.{kind}' must be an object with a 'url'", f"{where}.{kind}")
    elif not isinstance(value, str):
        raise bad_request(f"'{where}.{kind}' must be a string (a data: URI or a local path)", f"{where}.{kind}")


def count_media(messages: list) -> int:
    return sum(1 for m in messages if isinstance(m["content"], list)
               for p in m["content"] if _PARTS[p["type"]] != "text")


def to_engine_chat(messages: list, policy: MediaPolicy, files: MediaFiles) -> list:
    """Checked OpenAI messages -> the engine's chat format, each media URL resolved by the media policy (a 400
    for a refused or missing source). Blocking (data URIs of videos are written to files): run it in a thread."""
    chat = []
    for i, m in enumerate(messages):
        role, content = _ROLES[m["role"]], m["content"]
        if isinstance(content, str):
            chat.append({"role": role, "content": content})
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part["type"]
            if kind == "text":
                parts.append({"type": "text", "text": part["text"]})
                continue
            value = part[kind]
            url = value["url"] if isinstance(value, dict) else value
            media = _PARTS[kind]
            param = f"messages[{i}].content[{j}].{kind}" + (".url" if isinstance(value, dict) else "")
            parts.append({"type": media, media: policy.resolve(url, media, param, files)})
        chat.append({"role": role, "content": parts})
    return chat


# -- responses --------------------------------------------------------------------------------------------

def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, created: int, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int, token_ids: Optional[list] = None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(rid: str, created: int, model: str, delta: Optional[dict], finish_reason: Optional[str] = None,
          with_usage_field: bool = False, usage_value: Optional[dict] = None,
          token_ids: Optional[list] = None) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [] if delta is None else
           [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if token_ids is not None and out["choices"]:
        out["choices"][0]["token_ids"] = token_ids
    if with_usage_field:  # stream_options.include_usage: null in every chunk but the last
        out["usage"] = usage_value
    return out


def now() -> int:
    return int(time.time())
