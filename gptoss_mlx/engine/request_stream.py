"""What a submitted request hands back: its events, read by a thread or by an asyncio task.

The engine thread pushes events (`TokenEvent`s, then one `Finished` or `Failed`) into a
`RequestHandle`; the server reads them with `async for` on its event loop (woken through
`loop.call_soon_threadsafe`, so the loop never blocks on the engine) and tests or scripts with a
plain `for`. One buffer serves both, so a handle may be read either way.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from ..errors import GptOssError


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token, in order (the stop token, when one ends the sequence, included)."""

    token: int


@dataclass(frozen=True)
class Finished:
    """The sequence ended. `finish_reason`: "stop" (a stop id, the last TokenEvent), "length"
    (max_tokens or the context limit) or "cancelled" (`cancel()` was called). The server derives
    "tool_calls" from the harmony parse. `ttft_s`: from `submit` to the first token (queueing
    and prefill included); `decode_tps`: tokens per second after the first one."""

    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float
    decode_tps: float

    def summary(self) -> str:
        """The figures of the server's per-request log line, e.g.
        `prompt=812 cached=790 completion=41 ttft=0.213s tps=38.5 finish=stop`."""
        return (
            f"prompt={self.prompt_tokens} cached={self.cached_tokens} "
            f"completion={self.completion_tokens} ttft={self.ttft_s:.3f}s "
            f"tps={self.decode_tps:.1f} finish={self.finish_reason}"
        )


@dataclass(frozen=True)
class Failed:
    """The request failed: `error` says why (e.g. `NonFiniteLogitsError` for this sequence
    only, `EngineFailure`, `SchedulerClosed`). Tokens streamed before it stand."""

    error: GptOssError


Event = TokenEvent | Finished | Failed


class RequestHandle:
    """The stream of one request's events. Iterate it (blocking) or `async for` it; either way
    it ends after the `Finished` or `Failed` event. `cancel()` is thread-safe and idempotent.

    Asynchronous reading wakes the event loop that called `submit` (or, if there was none, the
    loop that first iterates it). Leaving an `async for` early (a client disconnects and its
    task is cancelled) cancels the request.
    """

    def __init__(self, id: str, on_cancel: Callable[[RequestHandle], None]):
        self.id = id
        self._on_cancel = on_cancel
        self._cond = threading.Condition()
        self._events: deque[Event] = deque()
        self._ended = False  # the final event has been pushed
        self._cancelled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        try:
            self._bind(asyncio.get_running_loop())
        except RuntimeError:
            pass  # no loop in this thread: bound on the first `async for`, if any

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def done(self) -> bool:
        """Whether the final event has been pushed (it may not have been read yet)."""
        return self._ended

    def cancel(self) -> None:
        """Stop generating: a queued request leaves the queue, a running one leaves the batch
        before its next forward pass. The stream then ends with Finished("cancelled") (or with
        whatever final event came first)."""
        if self._cancelled or self._ended:
            return
        self._cancelled = True
        self._on_cancel(self)

    # ------------------------------------------------------------------ engine side

    def push(self, event: Event) -> None:
        """Hand `event` to the reader (called on the engine thread). Nothing after a final one."""
        with self._cond:
            if self._ended:
                return
            self._ended = not isinstance(event, TokenEvent)
            self._events.append(event)
            self._cond.notify_all()
            loop, wake = self._loop, self._wake
        if loop is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:
                pass  # the loop is closed: nobody is reading any more

    # ------------------------------------------------------------------ reader side

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._cond:
            if self._loop is not None and self._loop is not loop:
                raise RuntimeError(f"request {self.id} is already read on another event loop")
            if self._loop is None:
                self._loop, self._wake = loop, asyncio.Event()

    def __iter__(self) -> Iterator[Event]:
        while True:
            with self._cond:
                while not self._events:
                    self._cond.wait()
                event = self._events.popleft()
            yield event
            if not isinstance(event, TokenEvent):
                return

    async def __aiter__(self) -> AsyncIterator[Event]:
        self._bind(asyncio.get_running_loop())
        finished = False
        try:
            while True:
                with self._cond:
                    event = self._events.popleft() if self._events else None
                    if event is None:
                        self._wake.clear()  # under the lock: a push after this sets it again
                if event is None:
                    await self._wake.wait()
                    continue
                finished = not isinstance(event, TokenEvent)
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self.cancel()
