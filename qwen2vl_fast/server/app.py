"""The FastAPI app: OpenAI chat completions over the engine, /v1/models, /health and /metrics.

Each chat request is checked (protocol.py), its media resolved under the media policy (media.py) and submitted
to the engine in a worker thread (submit() tokenizes and preprocesses: blocking CPU work); the event loop then
awaits the request's tokens. A client that disconnects has its request cancelled (its KV slot is freed at the
engine's next step): for streams when the disconnect message arrives or a send fails, for plain requests while
waiting for the answer. `ServerState.begin_shutdown` (on SIGINT / SIGTERM in `qwen2vl-fast serve`) answers new
requests 503 and closes the engine, which ends the requests in flight as cancelled.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import Qwen2VLFastError
from . import metrics as prom
from .errors import APIError, bad_request, from_engine_error
from .media import MediaFiles, MediaPolicy
from .protocol import (DEFAULT_MAX_TOKENS, ChatRequest, chunk, completion, count_media, new_id, now,
                       parse_chat_request, to_engine_chat, usage)

log = logging.getLogger("qwen2vl_fast.server")

DEFAULT_MAX_MEDIA = 16
DEFAULT_MAX_REQUEST_BYTES = 256 * 2**20
_ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")


class ServerState:
    def __init__(self, engine, served_model_name: str, api_key: Optional[str], policy: MediaPolicy,
                 default_max_tokens: int, max_media_per_request: int, max_request_bytes: int):
        self.engine, self.model_name, self.api_key, self.policy = engine, served_model_name, api_key, policy
        self.default_max_tokens, self.max_media = default_max_tokens, max_media_per_request
        self.max_request_bytes = max_request_bytes
        self.created = now()
        self.http = prom.HTTPCounters()
        self.shutting_down = False
        self._closer: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def begin_shutdown(self) -> threading.Thread:
        """Refuse new requests (503) and close the engine in a thread (in-flight requests end cancelled).
        Safe to call from a signal handler and more than once; returns the closing thread."""
        with self._lock:
            self.shutting_down = True
            if self._closer is None:
                self._closer = threading.Thread(target=self._close, name="qwen2vl-fast-close", daemon=True)
                self._closer.start()
            return self._closer

    def _close(self):
        try:
            self.engine.close(cancel=True)
        except Exception:  # pragma: no cover - logged, the process is exiting anyway
            log.exception("closing the engine failed")


def _error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


_DONE = b"data: [DONE]\n\n"


async def _watch_disconnect(receive, handle, flag: dict):
    """Cancel `handle` when the client disconnects (the request body has been read: the next message the
    server gives is the disconnect)."""
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                flag["disconnected"] = True
                handle.cancel()
                return
    except Exception:  # a receive that fails: the connection is gone
        flag["disconnected"] = True
        handle.cancel()


class _EventStream(Response):
    """Server-sent events from an async iterator of bytes; cancels the engine request when the client goes."""

    media_type = "text/event-stream"

    def __init__(self, chunks, handle, state: dict):
        self.status_code, self.background = 200, None  # no body: no Content-Length (as StreamingResponse)
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.chunks, self.handle, self.state = chunks, handle, state

    async def __call__(self, scope, receive, send):
        watcher = asyncio.ensure_future(_watch_disconnect(receive, self.handle, self.state))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for data in self.chunks:
                if self.state.get("disconnected"):
                    break
                await send({"type": "http.response.body", "body": data, "more_body": True})
            if not self.state.get("disconnected"):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away (ASGI 2.4 servers raise from send)
            self.state["disconnected"] = True
        finally:
            watcher.cancel()
            if not self.state.get("finished"):
                self.handle.cancel()
            await self.chunks.aclose()


class _CountResponses:
    """ASGI middleware: count responses by route and status for /metrics."""

    def __init__(self, app, counters: prom.HTTPCounters):
        self.app, self.counters = app, counters

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = next((r for r in _ROUTES if path == r or path.startswith(r + "/")), "other")
        seen = {}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            seen.setdefault("status", 500)  # answered by the outer error middleware
            raise
        finally:
            self.counters.add(route, seen.get("status", 499))


def create_app(engine, *, served_model_name: str, api_key: Optional[str] = None,
               allowed_local_media_path: Optional[str] = None, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               max_media_per_request: int = DEFAULT_MAX_MEDIA, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               close_engine_on_shutdown: bool = False) -> FastAPI:
    """The server app over `engine` (an Engine, or any object with its submit / metrics / close API).

    served_model_name: the model id clients send (another is a 404). api_key: require `Authorization: Bearer
    KEY` on /v1/* (/health and /metrics stay open). allowed_local_media_path: the folder local image / video
    paths may come from (default: none, only data: URIs). default_max_tokens: the cap on max_tokens when a
    request sets none (as many as fit in the KV cache, at most this). max_media_per_request: images + videos per
    request. max_request_bytes: the largest request body (413 beyond; base64 media count 4/3 of their size).
    close_engine_on_shutdown: close the engine when the app's lifespan ends (the `serve` command)."""
    if not isinstance(served_model_name, str) or not served_model_name:
        raise ValueError("served_model_name must be a non-empty string")
    state = ServerState(engine, served_model_name, api_key, MediaPolicy(allowed_local_media_path),
                        int(default_max_tokens), int(max_media_per_request), int(max_request_bytes))

    @asynccontextmanager
    async def lifespan(app):
        yield
        if close_engine_on_shutdown:
            await run_in_threadpool(state.begin_shutdown().join)

    app = FastAPI(title="qwen2vl_fast", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(_CountResponses, counters=state.http)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error_response(bad_request(f"invalid request: {first.get('msg', 'malformed')}", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return _error_response(APIError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}", code="internal_error"))

    async def authorized(request: Request):
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def model_card() -> dict:
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "qwen2vl_fast"}
        max_len = getattr(engine, "max_len", None)
        if max_len is not None:
            card["max_model_len"] = int(max_len)
        return card

    @app.get("/health")
    async def health():
        if state.shutting_down:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        try:
            engine_metrics = engine.metrics()
        except Exception:  # a closed or broken engine: the server's own counters still come
            log.exception("engine.metrics() failed")
            engine_metrics = {}
        return Response(prom.render(engine_metrics, state.http.snapshot(), state.shutting_down),
                        media_type=prom.CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}", dependencies=[Depends(authorized)])
    async def model(model: str):
        if model != state.model_name:
            raise _unknown_model(model)
        return model_card()

    def _unknown_model(name) -> APIError:
        return APIError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                        param="model", code="model_not_found")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: Request):
        if state.shutting_down:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        raw = await _read_body(request)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nesting too deep
            raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"] != state.model_name:
            raise _unknown_model(body["model"])
        req = parse_chat_request(body)
        n = count_media(req.messages)
        if n > state.max_media:
            raise bad_request(f"the request holds {n} images/videos; this server takes at most {state.max_media} "
                              f"per request", "messages", "too_many_media")
        if getattr(engine, "processor", True) is None:
            raise APIError(500, "this model has no tokenizer (no tokenizer.json in its checkpoint): the server "
                                "cannot render chat requests", code="no_tokenizer")
        handle = await run_in_threadpool(_submit, req)
        rid, created = new_id(), now()
        if req.stream:
            flags: dict = {}
            return _EventStream(_stream(handle, req, rid, created, flags), handle, flags)
        return await _complete(request, handle, req, rid, created)

    async def _read_body(request: Request) -> bytes:
        limit = state.max_request_bytes
        too_large = APIError(413, f"the request body exceeds this server's limit of {limit} bytes",
                             code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        async for data in request.stream():
            size += len(data)
            if size > limit:
                raise too_large
            chunks.append(data)
        return b"".join(chunks)

    def _submit(req: ChatRequest):
        files = MediaFiles()
        try:
            chat = to_engine_chat(req.messages, state.policy, files)
            max_new = req.max_tokens or _fitting_max_tokens(chat, req.sampling)
            try:
                return engine.submit(chat, max_new_tokens=max_new, **req.sampling)
            except Exception as e:
                raise _engine_error(e) from None
        finally:
            files.close()  # submit has preprocessed the media

    def _fitting_max_tokens(chat, sampling) -> int:
        """min(default_max_tokens, the KV cache left after the prompt), the prompt counted as the engine does
        before preprocessing (a lower bound with videos: submit then refuses what does not fit)."""
        max_len = getattr(engine, "max_len", None)
        processor = getattr(engine, "processor", None)
        if max_len is None or processor is None or not hasattr(processor, "count_tokens"):
            return state.default_max_tokens
        kwargs = {k: sampling[k] for k in ("min_pixels", "max_pixels") if sampling.get(k) is not None}
        if "max_pixels" not in kwargs and callable(getattr(engine, "image_max_pixels", None)):
            budget = engine.image_max_pixels()
            if budget is not None:
                kwargs["max_pixels"] = budget
        try:
            prompt = processor.count_tokens([chat], **kwargs)[0]
        except Exception:  # submit says what is wrong with the prompt
            return min(state.default_max_tokens, max(1, int(max_len) - 1))
        return max(1, min(state.default_max_tokens, int(max_len) - prompt))

    def _engine_error(e: Exception) -> APIError:
        err = from_engine_error(e)
        if err.status >= 500 and err.status != 503:
            log.error("request failed in the engine: %s: %s", type(e).__name__, e)
        return err

    async def _complete(request: Request, handle, req: ChatRequest, rid: str, created: int):
        flags: dict = {}
        watcher = asyncio.ensure_future(_watch_disconnect(request.receive, handle, flags))
        parts, ids, n, reason = [], [], 0, None
        try:
            async for event in handle:
                n += event.token_id is not None  # a closing event (cancelled between tokens) carries none
                if event.token_id is not None:
                    ids.append(event.token_id)
                parts.append(event.text)
                if event.finished:
                    reason = event.finish_reason
            flags["finished"] = True
        except Qwen2VLFastError as e:
            flags["finished"] = True
            raise _engine_error(e) from None
        finally:
            watcher.cancel()
            if not flags.get("finished"):
                handle.cancel()  # this coroutine was cancelled (server stopping)
        if flags.get("disconnected"):
            return Response(status_code=499)  # nobody reads it; counted in /metrics as 499
        if reason == "cancelled" or reason is None:
            raise APIError(503, "the request was cancelled: the server is shutting down", code="cancelled")
        return JSONResponse(completion(rid, created, state.model_name, "".join(parts), reason,
                                       int(handle.prompt_tokens), n, ids if req.return_token_ids else None))

    async def _stream(handle, req: ChatRequest, rid: str, created: int, flags: dict):
        model_name, with_usage = state.model_name, req.include_usage

        def event_chunk(delta, finish_reason=None, ids=None):
            return _sse(chunk(rid, created, model_name, delta, finish_reason, with_usage,
                              token_ids=ids if req.return_token_ids else None))

        yield event_chunk({"role": "assistant", "content": ""})
        n, reason, pending = 0, None, []
        try:
            async for event in handle:
                n += event.token_id is not None
                if event.token_id is not None:
                    pending.append(event.token_id)
                if event.finished:
                    reason = event.finish_reason
                if event.text or (req.return_token_ids and pending and not event.finished):
                    yield event_chunk({"content": event.text}, ids=pending)
                    pending = []
            flags["finished"] = True
        except Qwen2VLFastError as e:
            flags["finished"] = True
            yield _sse(_engine_error(e).body())
            yield _DONE
            return
        if reason == "cancelled" or reason is None:
            if not flags.get("disconnected"):
                yield _sse(APIError(503, "the request was cancelled: the server is shutting down",
                                    code="cancelled").body())
                yield _DONE
            return
        yield event_chunk({}, reason, ids=pending)
        if with_usage:
            yield _sse(chunk(rid, created, model_name, None, None, True, usage(int(handle.prompt_tokens), n)))
        yield _DONE

    return app
