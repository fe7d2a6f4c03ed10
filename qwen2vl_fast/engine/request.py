"""What a caller holds while the engine thread works on its request: a handle to iterate (threads or asyncio),
cancel or wait on, and the text side of generation (incremental detokenization and stop strings).

The engine thread only pushes raw token ids into a `Sink`; the caller's side turns them into text, so the
scheduler's step loop never waits on a tokenizer (except for requests with stop strings, whose finish the engine
must know; it runs the same `TextStream` on its side for those).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from ..errors import RequestCancelledError


@dataclass
class Completion:
    token_ids: list
    text: str
    finish_reason: str  # "stop" (a stop token, included in token_ids, or a stop string), "length" or "cancelled"
    timings: dict = field(default_factory=dict)


@dataclass
class TokenEvent:
    index: int  # which prompt of the call (0 for a submitted request)
    token_id: Optional[int]  # None on a closing event that carries no token (a request cancelled between tokens)
    text: str  # the text this token adds ("" while a multi-byte character is incomplete or may start a stop string)
    finished: bool
    finish_reason: Optional[str] = None  # set on the last event: "stop", "length" or "cancelled"


# -- sinks: the engine thread pushes, one consumer pulls (blocking or awaiting) -----------------------------------

class Sink:
    """A thread-safe queue with one consumer that may wait in a thread or in an asyncio event loop."""

    def __init__(self):
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._waiters: list = []  # (loop, asyncio.Event) of consumers awaiting

    def push(self, item) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, ready in waiters:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # that loop is closed: nobody waits there any more
                pass

    def get(self, timeout: Optional[float] = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("no result from the engine within the timeout")
                self._cond.wait(left)
            return self._items.popleft()

    async def aget(self):
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._items:
                    return self._items.popleft()
                waiter = (loop, asyncio.Event())
                self._waiters.append(waiter)
            try:
                await waiter[1].wait()
            finally:
                with self._cond:
                    self._waiters.remove(waiter)


# -- text --------------------------------------------------------------------------------------------------------

class TextStream:
    """Token ids in, text deltas out. Decodes only the tokens since the last emitted boundary (not the whole
    sequence each step), holds back an incomplete UTF-8 character, and with stop strings holds back any tail
    that could still become one: text from a stop string on is never emitted and `stopped` turns True."""

    def __init__(self, decode, stop=()):
        self.decode, self.stop = decode, tuple(s for s in stop if s)
        self.tokens: list = []
        self._start = 0  # tokens before this index are fully emitted as text
        self.text = ""  # emitted so far
        self._pending = ""  # decoded but held back (may begin a stop string)
        self.stopped = False

    def feed(self, token_id: int, last: bool) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token_id)
        piece = self.decode(self.tokens[self._start:])
        if piece.endswith("\ufffd") and not last:
            return ""
        self._start = len(self.tokens)
        return self._release(self._pending + piece, last)

    def finish(self) -> str:
        """Flush what was held back (the request ended without completing a stop string)."""
        if self.stopped:
            return ""
        return self._release(self._pending, True)

    def _release(self, text: str, last: bool) -> str:
        if self.stop:
            hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.stopped, self._pending = True, ""
                return self._emit(text[:min(hits)])
            if not last:
                keep = _partial_stop_tail(text, self.stop)
                self._pending = text[len(text) - keep:] if keep else ""
                return self._emit(text[:len(text) - keep])
        self._pending = ""
        return self._emit(text)

    def _emit(self, text: str) -> str:
        self.text += text
        return text


def _partial_stop_tail(text: str, stops) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


# -- the handle --------------------------------------------------------------------------------------------------

class RequestHandle:
    """One sequence of a request. Iterate it (`for event in handle`, `async for event in handle`) for its
    TokenEvents, `result()` for the Completion, `cancel()` to stop it (its KV slot is freed at the next step).
    Errors that happen in the engine thread after submission are raised from the iteration / result()."""

    def __init__(self, request_id: str, index: int, params, decode, sink: Optional[Sink] = None):
        self.request_id, self.index, self.params = request_id, index, params
        self.sink = sink if sink is not None else Sink()
        self.prompt_tokens = 0
        self.cancelled = threading.Event()
        self.text_stream = TextStream(decode, params.stop)
        self.finish_reason: Optional[str] = None
        self.timings: dict = {}
        self.error: Optional[BaseException] = None

    # the engine side calls these (from its thread) ------------------------------------------------------------
    def _push_token(self, token_id: int, finished: bool, reason: Optional[str]) -> None:
        self.sink.push((self.index, token_id, finished, reason))

    def _push_end(self, reason: str) -> None:
        self.sink.push((self.index, None, True, reason))

    def _push_error(self, error: BaseException) -> None:
        self.sink.push((self.index, error, True, None))

    # the caller's side ----------------------------------------------------------------------------------------
    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def event(self, item) -> TokenEvent:
        """Turn a raw sink item of this handle into a TokenEvent (or raise the engine's error)."""
        _, token, finished, reason = item
        if isinstance(token, BaseException):
            self.error = token
            raise token
        text = ""
        if token is not None:
            text = self.text_stream.feed(token, finished)
        if finished:
            text += self.text_stream.finish()
            if self.text_stream.stopped and reason == "length":
                reason = "stop"  # the engine thread saw the stop string too, unless the length ended it first
            self.finish_reason = reason
        return TokenEvent(self.index, token, text, finished, reason if finished else None)

    def __iter__(self):
        while not self.done:
            yield self.event(self.sink.get())

    async def __aiter__(self):
        while not self.done:
            yield self.event(await self.sink.aget())

    def result(self, timeout: Optional[float] = None) -> Completion:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            self.event(self.sink.get(left))
        if self.error is not None:
            raise self.error
        if self.finish_reason == "cancelled" and not self.text_stream.tokens and self.params.max_new_tokens:
            raise RequestCancelledError(f"request {self.request_id} was cancelled before its first token")
        return self.completion()

    def completion(self) -> Completion:
        return Completion(list(self.text_stream.tokens), self.text_stream.text, self.finish_reason or "length",
                          dict(self.timings))
