"""Server-sent events, and noticing a client that left.

Chat Completions streams `data: {chunk}` lines ending with `data: [DONE]`; the Responses API
streams `event: {type}` + `data: {event}` and no [DONE] (each as OpenAI sends them). Streaming
responses are Starlette's StreamingResponse, which cancels the stream's task when the client
disconnects; the stream's `finally` then cancels the request in the engine.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request

T = TypeVar("T")

DONE = "data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MEDIA_TYPE = "text/event-stream"


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def data_line(obj: Any) -> str:
    """A Chat Completions event: `data: {json}`."""
    return f"data: {_json(obj)}\n\n"


def typed_event(obj: dict[str, Any]) -> str:
    """A Responses API event: `event: {type}` then `data: {json}`."""
    return f"event: {obj['type']}\ndata: {_json(obj)}\n\n"


class ClientGone(Exception):
    """The client disconnected before a non-streamed answer was ready."""


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(work: Awaitable[T], request: Request) -> T:
    """Await `work` (a non-streamed generation), cancelling it if the client leaves first, so
    that its slot in the engine frees at once rather than when the answer is done."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        raise ClientGone
    return task.result()
