"""POST /v1/chat/completions, streamed and not.

Wire rules (what openai-python, Open WebUI, opencode and the Vercel AI SDK rely on):
- the first chunk carries `role` (and `content: ""`), no later one does;
- reasoning goes out as both `reasoning` and `reasoning_content`, in deltas and in the message;
- a tool call is one chunk with `index`, `id`, `type` and `function.name` + `arguments` (calls are
  reported only once complete, see turn.py); no empty `tool_calls` list is ever sent;
- the last choice chunk has `finish_reason` (`stop`, `length` or `tool_calls`), then the usage
  chunk if `stream_options.include_usage`, then `data: [DONE]`;
- an error after the stream began is an `{"error": {...}}` chunk (openai-python raises it as an
  APIError), then `[DONE]`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import GptOssError
from .chat_request import ChatCall, build_chat_call
from .chat_types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
    Choice,
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
    ChunkChoice,
    CompletionCreateParams,
    CompletionTokensDetails,
    CompletionUsage,
    Function,
    PromptTokensDetails,
)
from .errors import APIError, from_gptoss_error
from .security import require_api_key
from .sse import DONE, HEADERS, MEDIA_TYPE, ClientGone, data_line, unless_disconnected
from .turn import (
    Generation,
    MessageClosed,
    MessageOpened,
    TextDelta,
    ToolCallMade,
    TurnEvent,
    Usage,
    new_id,
)

log = logging.getLogger("gptoss_mlx.server")
router = APIRouter(dependencies=[Depends(require_api_key)])


def usage_body(u: Usage) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_tokens),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=u.reasoning_tokens),
    )


class ChatAccumulator:
    """TurnEvents -> the pieces of a chat message, and the deltas that stream them.

    Several messages of one kind join as the harmony library joins them: reasoning with a newline,
    visible text (preambles, then the answer) as written."""

    def __init__(self, show_reasoning: bool):
        self.show_reasoning = show_reasoning
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.saw_visible = False
        self.saw_reasoning = False
        self.tool_calls: list[ToolCallMade] = []

    def add(self, ev: TurnEvent) -> ChoiceDelta | None:
        """Record `ev`; return the delta to stream for it, if any."""
        if isinstance(ev, MessageOpened):
            if ev.kind == "reasoning":
                sep = "\n" if self.saw_reasoning else ""
                self.saw_reasoning = True
                return self._reasoning(sep) if sep else None
            self.saw_visible = True
        elif isinstance(ev, TextDelta):
            if ev.kind == "reasoning":
                return self._reasoning(ev.text)
            self.content.append(ev.text)
            return ChoiceDelta(content=ev.text)
        elif isinstance(ev, ToolCallMade):
            index = len(self.tool_calls)
            self.tool_calls.append(ev)
            fn = ChoiceDeltaToolCallFunction(name=ev.name, arguments=ev.arguments)
            call = ChoiceDeltaToolCall(index=index, id=ev.call_id, type="function", function=fn)
            return ChoiceDelta(tool_calls=[call])
        elif isinstance(ev, MessageClosed):
            return None
        return None

    def _reasoning(self, text: str) -> ChoiceDelta | None:
        self.reasoning.append(text)
        if not self.show_reasoning:
            return None
        return ChoiceDelta(reasoning=text, reasoning_content=text)

    def message(self) -> ChatCompletionMessage:
        reasoning = "".join(self.reasoning) if self.show_reasoning and self.saw_reasoning else None
        calls = [
            ChatCompletionMessageToolCall(
                id=c.call_id, function=Function(name=c.name, arguments=c.arguments)
            )
            for c in self.tool_calls
        ]
        return ChatCompletionMessage(
            content="".join(self.content) if self.saw_visible else None,
            reasoning=reasoning,
            reasoning_content=reasoning,
            tool_calls=calls or None,
        )


@router.post("/v1/chat/completions")
async def create_chat_completion(body: CompletionCreateParams, request: Request) -> Response:
    """Chat Completions (`client.chat.completions.create`), streamed with `stream: true`."""
    state = request.app.state.server
    model = state.check_model(body.model)
    call = await run_in_threadpool(build_chat_call, body, state)
    gen = Generation(state, call.spec, new_id("chatcmpl-"), "chat.completions")
    gen.start()  # Busy (503) and ContextLengthExceeded (400) surface here, before any byte
    created = int(time.time())
    if call.stream:
        return StreamingResponse(
            _stream(gen, call, model, created), media_type=MEDIA_TYPE, headers=HEADERS
        )
    try:
        body_out = await unless_disconnected(_complete(gen, call, model, created), request)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; the engine slot is already free
    return JSONResponse(body_out)


async def _complete(gen: Generation, call: ChatCall, model: str, created: int) -> dict[str, Any]:
    acc = ChatAccumulator(call.show_reasoning)
    async for ev in gen.events():
        acc.add(ev)
    return ChatCompletion(
        id=gen.request_id,
        created=created,
        model=model,
        choices=[Choice(message=acc.message(), finish_reason=gen.finish_reason)],
        usage=usage_body(gen.usage),
    ).dump()


async def _stream(gen: Generation, call: ChatCall, model: str, created: int) -> AsyncIterator[str]:
    def chunk(delta: ChoiceDelta | None, finish: str | None = None, usage=None) -> str:
        choices = [] if delta is None else [ChunkChoice(delta=delta, finish_reason=finish)]
        return data_line(
            ChatCompletionChunk(
                id=gen.request_id, created=created, model=model, choices=choices, usage=usage
            ).dump()
        )

    acc = ChatAccumulator(call.show_reasoning)
    yield chunk(ChoiceDelta(role="assistant", content=""))
    try:
        async for ev in gen.events():
            delta = acc.add(ev)
            if delta is not None:
                yield chunk(delta)
        yield chunk(ChoiceDelta(), gen.finish_reason)
        if call.include_usage:
            yield chunk(None, usage=usage_body(gen.usage))
    except GptOssError as e:
        yield data_line(from_gptoss_error(e).body())
    except Exception:
        log.exception("%s: the stream failed", gen.request_id)
        err = APIError(500, "internal server error (see the server log)", type="server_error")
        yield data_line(err.body())
    yield DONE
