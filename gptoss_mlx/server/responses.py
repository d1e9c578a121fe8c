"""/v1/responses: create (streamed and not), retrieve and delete stored responses.

A streamed response is, in the order openai-python's `responses.stream()` checks and Codex reads:
`response.created` (sent as soon as the request is queued, before prefill, so a client's idle
timer does not fire on a long prompt), `response.in_progress`, then per output item
`output_item.added`, `content_part.added`, `reasoning_text.delta`/`.done` or
`output_text.delta`/`.done` (or, for a function call, `function_call_arguments.delta`/`.done`),
`content_part.done`, `output_item.done`; and last `response.completed` with usage
(`response.incomplete` when max_output_tokens cut it; `response.failed` with `error.code` when it
failed, `context_length_exceeded` for a prompt that does not fit).
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
from .errors import APIError, from_gptoss_error
from .reasoning_blob import encode_reasoning
from .responses_request import ResponsesCall, build_responses_call
from .responses_types import (
    IncompleteDetails,
    InputTokensDetails,
    OutputTokensDetails,
    ReasoningText,
    ResponseCreateParams,
    ResponseDeleted,
    ResponseError,
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponseStreamEvent,
    ResponseUsage,
)
from .responses_types import (
    Response as ResponseObject,
)
from .security import require_api_key
from .sse import HEADERS, MEDIA_TYPE, ClientGone, typed_event, unless_disconnected
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


def usage_body(u: Usage) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=u.prompt_tokens,
        output_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=u.cached_tokens),
        output_tokens_details=OutputTokensDetails(reasoning_tokens=u.reasoning_tokens),
    )


class ResponseBuilder:
    """TurnEvents -> output items and the stream events that build them (one output item per
    harmony message: reasoning, commentary preamble, final answer, function call)."""

    def __init__(self, response: ResponseObject, include_encrypted: bool):
        self.response = response
        self.include_encrypted = include_encrypted
        self.seq = 0

    def event(self, type: str, **fields: Any) -> dict[str, Any]:
        """The next event, dumped now (later changes to the items do not reach it)."""
        ev = ResponseStreamEvent(type=type, sequence_number=self.seq, **fields)
        self.seq += 1
        return ev.dump()

    def lifecycle(self, type: str) -> dict[str, Any]:
        return self.event(type, response=self.response)

    def add(self, ev: TurnEvent) -> list[dict[str, Any]]:
        out = self.response.output
        if isinstance(ev, MessageOpened):
            if ev.kind == "reasoning":
                item = ResponseReasoningItem(id=new_id("rs_"))
                part = ReasoningText()
            else:
                phase = "commentary" if ev.kind == "preamble" else "final_answer"
                item = ResponseOutputMessage(id=new_id("msg_"), phase=phase)
                part = ResponseOutputText()
            out.append(item)
            return [
                self.event("response.output_item.added", output_index=len(out) - 1, item=item),
                self.event(
                    "response.content_part.added",
                    item_id=item.id,
                    output_index=len(out) - 1,
                    content_index=0,
                    part=part,
                ),
            ]
        if isinstance(ev, TextDelta):
            item, index = out[-1], len(out) - 1
            kind = "reasoning_text" if ev.kind == "reasoning" else "output_text"
            extra = {} if ev.kind == "reasoning" else {"logprobs": []}
            return [
                self.event(
                    f"response.{kind}.delta",
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    delta=ev.text,
                    **extra,
                )
            ]
        if isinstance(ev, MessageClosed):
            return self._close(ev)
        if isinstance(ev, ToolCallMade):
            item = ResponseFunctionToolCall(
                id=new_id("fc_"), call_id=ev.call_id, name=ev.name, arguments=""
            )
            out.append(item)
            index = len(out) - 1
            added = self.event("response.output_item.added", output_index=index, item=item)
            item.arguments, item.status = ev.arguments, "completed"
            return [
                added,
                self.event(
                    "response.function_call_arguments.delta",
                    item_id=item.id,
                    output_index=index,
                    delta=ev.arguments,
                ),
                self.event(
                    "response.function_call_arguments.done",
                    item_id=item.id,
                    output_index=index,
                    name=ev.name,
                    arguments=ev.arguments,
                ),
                self.event("response.output_item.done", output_index=index, item=item),
            ]
        return []

    def _close(self, ev: MessageClosed) -> list[dict[str, Any]]:
        item, index = self.response.output[-1], len(self.response.output) - 1
        item.status = "completed"
        if ev.kind == "reasoning":
            part = ReasoningText(text=ev.text)
            item.content = [part]
            if self.include_encrypted:
                item.encrypted_content = encode_reasoning(ev.text)
            done = self.event(
                "response.reasoning_text.done",
                item_id=item.id,
                output_index=index,
                content_index=0,
                text=ev.text,
            )
        else:
            part = ResponseOutputText(text=ev.text)
            item.content = [part]
            done = self.event(
                "response.output_text.done",
                item_id=item.id,
                output_index=index,
                content_index=0,
                text=ev.text,
                logprobs=[],
            )
        return [
            done,
            self.event(
                "response.content_part.done",
                item_id=item.id,
                output_index=index,
                content_index=0,
                part=part,
            ),
            self.event("response.output_item.done", output_index=index, item=item),
        ]

    def finish(self, finish_reason: str, usage: Usage) -> dict[str, Any]:
        """Set the final status and usage; the closing event."""
        self.response.usage = usage_body(usage)
        if finish_reason == "length":
            self.response.status = "incomplete"
            self.response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
            return self.lifecycle("response.incomplete")
        self.response.status = "completed"
        return self.lifecycle("response.completed")

    def fail(self, error: APIError) -> dict[str, Any]:
        self.response.status = "failed"
        self.response.error = ResponseError(
            code=error.code or "server_error", message=error.message
        )
        return self.lifecycle("response.failed")

    def assistant_message(self) -> dict[str, Any] | None:
        """The output as a chat-shaped assistant message, for the stored conversation."""
        reasoning, content, calls, visible = [], [], [], False
        for item in self.response.output:
            if isinstance(item, ResponseReasoningItem):
                reasoning.append("".join(p.text for p in item.content))
            elif isinstance(item, ResponseOutputMessage):
                visible = True
                content.append("".join(p.text for p in item.content))
            elif isinstance(item, ResponseFunctionToolCall):
                fn = {"name": item.name, "arguments": item.arguments}
                calls.append({"id": item.call_id, "type": "function", "function": fn})
        if not (reasoning or visible or calls):
            return None
        msg: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(content) if visible else None,
        }
        if reasoning:
            msg["reasoning_content"] = "\n".join(reasoning)
        if calls:
            msg["tool_calls"] = calls
        return msg


def _initial_response(
    body: ResponseCreateParams, call: ResponsesCall, model: str
) -> ResponseObject:
    return ResponseObject(
        id=new_id("resp_"),
        created_at=int(time.time()),
        model=model,
        status="in_progress",
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        metadata=body.metadata or {},
        parallel_tool_calls=body.parallel_tool_calls is not False,
        previous_response_id=body.previous_response_id,
        reasoning={"effort": call.effort, "summary": call.summary},
        store=call.store,
        temperature=call.spec.sampling.temperature,
        tool_choice=body.tool_choice if body.tool_choice is not None else "auto",
        tools=call.tools,
        top_p=call.spec.sampling.top_p,
        user=body.user,
    )


@router.post("/v1/responses")
async def create_response(body: ResponseCreateParams, request: Request) -> Response:
    """Responses (`client.responses.create` / `.stream`)."""
    from ..engine.scheduler import ContextLengthExceeded

    state = request.app.state.server
    model = state.check_model(body.model)
    call = await run_in_threadpool(build_responses_call, body, state)
    builder = ResponseBuilder(_initial_response(body, call, model), call.include_encrypted)
    gen = Generation(state, call.spec, builder.response.id, "responses")
    try:
        gen.start()
    except ContextLengthExceeded as e:
        if not call.stream:
            raise
        # Streamed: Codex reads this code from response.failed and compacts the conversation.
        return StreamingResponse(
            _failed_stream(builder, from_gptoss_error(e)), media_type=MEDIA_TYPE, headers=HEADERS
        )
    if call.stream:
        return StreamingResponse(
            _stream(gen, builder, call, state), media_type=MEDIA_TYPE, headers=HEADERS
        )
    try:
        out = await unless_disconnected(_complete(gen, builder, call, state), request)
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse(out)


async def _complete(gen: Generation, builder: ResponseBuilder, call: ResponsesCall, state) -> dict:
    async for ev in gen.events():
        builder.add(ev)
    builder.finish(gen.finish_reason, gen.usage)
    _store(builder, call, state)
    return builder.response.dump()


async def _stream(
    gen: Generation, builder: ResponseBuilder, call: ResponsesCall, state
) -> AsyncIterator[str]:
    yield typed_event(builder.lifecycle("response.created"))
    yield typed_event(builder.lifecycle("response.in_progress"))
    try:
        async for ev in gen.events():
            for out in builder.add(ev):
                yield typed_event(out)
        closing = builder.finish(gen.finish_reason, gen.usage)
        _store(builder, call, state)
        yield typed_event(closing)
    except GptOssError as e:
        yield typed_event(builder.fail(from_gptoss_error(e)))
    except Exception:
        log.exception("%s: the stream failed", gen.request_id)
        err = APIError(500, "internal server error (see the server log)", code="server_error")
        yield typed_event(builder.fail(err))


async def _failed_stream(builder: ResponseBuilder, error: APIError) -> AsyncIterator[str]:
    yield typed_event(builder.lifecycle("response.created"))
    yield typed_event(builder.fail(error))


def _store(builder: ResponseBuilder, call: ResponsesCall, state) -> None:
    if not call.store:
        return
    message = builder.assistant_message()
    history = call.history + ([message] if message is not None else [])
    state.store.put(builder.response.dump(), history)


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request) -> JSONResponse:
    stored = request.app.state.server.store.get(response_id)
    if stored is None:
        raise _not_found(response_id)
    return JSONResponse(stored.response)


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> JSONResponse:
    if not request.app.state.server.store.delete(response_id):
        raise _not_found(response_id)
    return JSONResponse(ResponseDeleted(id=response_id).dump())


def _not_found(response_id: str) -> APIError:
    shown = response_id if len(response_id) <= 100 else response_id[:100] + "..."
    return APIError(
        404,
        f"no stored response {shown!r} (never stored, deleted, evicted, or the server restarted)",
        param="response_id",
        code="not_found",
    )
