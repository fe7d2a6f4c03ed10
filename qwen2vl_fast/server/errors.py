"""HTTP errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, and the mapping from the
engine's exceptions to statuses (bad input 400, queue full 429, engine closed 503, anything else 500)."""

from __future__ import annotations

from typing import Optional

from ..errors import InputError, Qwen2VLFastError

# status -> OpenAI's error "type"
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error answered with `status` and OpenAI's error JSON; `param` names the offending request field."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _names(exc: BaseException) -> set:
    return {cls.__name__ for cls in type(exc).__mro__}


def from_engine_error(exc: BaseException) -> APIError:
    """The HTTP error for an exception raised by Engine.submit or a request's iterator.

    QueueFullError and EngineClosedError are matched by class name, so the mapping holds wherever the engine
    defines them."""
    names = _names(exc)
    message = str(exc) or type(exc).__name__
    if "EngineClosedError" in names:
        return APIError(503, f"the server is shutting down: {message}", code="shutting_down")
    if "QueueFullError" in names:
        return APIError(429, f"the server is busy, retry later: {message}", code="queue_full")
    if isinstance(exc, InputError):
        return APIError(400, message, code=type(exc).__name__)
    if isinstance(exc, Qwen2VLFastError):
        return APIError(500, message, code=type(exc).__name__)
    return APIError(500, f"internal error: {type(exc).__name__}: {message}", code="internal_error")
