"""One generation for an API request: submit the prompt to the engine, parse the tokens that come
back as harmony, and hand the routers what to stream: messages opening and closing, their text,
and complete tool calls.

Both APIs stream the same model output, so both read it from here:
- analysis-channel messages are "reasoning"; commentary messages without a recipient are
  "preamble" (text the model writes to the user before calling a tool); everything else the model
  writes as the assistant is "final" (headerless text included: model output is never dropped);
- calls follow the library's one rule (harmony/calls.py, harmony/turn.py): only a `<|call|>` to a
  declared `functions.NAME` is a tool call, reported once, complete; a call cut off by the token
  limit is not a call (the turn finishes with "length"); a call to anything else (gpt-oss's
  built-in `browser.*` / `python`, an undeclared function) is answered inside the turn with "not
  available" and the model goes on, in a new segment submitted to the engine with the same
  budget. Under a grammar (settings.py: structured outputs, tool_choice "none" / "required" /
  named, strict tools) the model can only make the calls it allows;
- `stop` sequences cut the visible text (stop_strings.py) and cancel the rest of the generation.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from ..engine.generate import SamplingParams
from ..engine.request_stream import Failed, Finished, TokenEvent
from ..harmony.calls import CALL, UNFINISHED, call_kind, function_name
from ..harmony.parser import (
    ContentDelta,
    HarmonyStreamParser,
    MessageEnd,
    MessageStart,
    message_kind,
)
from ..harmony.turn import AssistantTurn
from .stop_strings import StopMatcher

log = logging.getLogger("gptoss_mlx.server")

# OpenAI's rule for function names (harmony/request.py checks the same on the way back in).
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def new_id(prefix: str) -> str:
    """An id like OpenAI's (`chatcmpl-…`, `resp_…`, `call_…`): random, so ids never repeat
    across turns or server restarts (clients key tool results on them)."""
    return f"{prefix}{secrets.token_hex(12)}"


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True)
class MessageOpened:
    kind: str  # "reasoning" | "preamble" | "final"


@dataclass(frozen=True)
class TextDelta:
    kind: str
    text: str


@dataclass(frozen=True)
class MessageClosed:
    kind: str
    text: str  # the message's whole (visible) text


@dataclass(frozen=True)
class ToolCallMade:
    call_id: str
    name: str
    arguments: str


TurnEvent = MessageOpened | TextDelta | MessageClosed | ToolCallMade


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# ---------------------------------------------------------------------------- parsing


class TurnParser:
    """Harmony tokens -> TurnEvents, across the segments of one assistant turn.

    `functions`: the declared function names. `turn` is the
    library's AssistantTurn, which decides after each segment whether a refused call is to be
    answered, and the finish reason.
    """

    def __init__(self, tokenizer, *, functions: Collection[str] = (), stops: Sequence[str] = ()):
        from ..engine.chat import harmony_ids

        self._tokenizer = tokenizer
        self._ids = harmony_ids(tokenizer)
        self.turn = AssistantTurn(functions)
        self._stop = StopMatcher(stops)
        self._kind: str | None = None  # kind of the open message
        self._opened = False  # whether MessageOpened went out for it
        self._text: list[str] = []
        self._since_boundary = 0
        self.reasoning_tokens = 0
        self.tool_calls: list[ToolCallMade] = []
        self.new_segment()

    def new_segment(self) -> None:
        """The next segment starts after `<|start|>assistant` (the prompt's or a refusal's)."""
        self._parser = HarmonyStreamParser(self._tokenizer.decode_bytes, self._ids)
        self._since_boundary = 0

    @property
    def stopped_by_string(self) -> bool:
        return self._stop.stopped

    def feed(self, token: int) -> list[TurnEvent]:
        self._since_boundary += 1
        return self._convert(self._parser.feed(token))

    def end_segment(self):
        """Close the segment; returns (its closing events, the refused call to answer or None)."""
        out = self._convert(self._parser.finish())
        call = self.turn.add(self._parser.messages, self._parser.stopped_by)
        if self._stop.stopped:
            call = None
        return out, call

    def _convert(self, events: list) -> list[TurnEvent]:
        out: list[TurnEvent] = []
        for ev in events:
            if isinstance(ev, MessageStart):
                self._kind = _kind(ev)
                self._text = []
                self._opened = self._kind != "tool_call" and not self._stop.stopped
                if self._opened:
                    out.append(MessageOpened(self._kind))
            elif isinstance(ev, ContentDelta):
                if self._opened:
                    self._emit(ev.text, out)
            elif isinstance(ev, MessageEnd):
                self._close(ev, out)
        return out

    def _emit(self, text: str, out: list[TurnEvent]) -> None:
        if self._kind != "reasoning":
            text = self._stop.feed(text)
        if text:
            self._text.append(text)
            out.append(TextDelta(self._kind, text))

    def _close(self, ev: MessageEnd, out: list[TurnEvent]) -> None:
        kind = _kind(ev.message)
        if kind == "reasoning":
            self.reasoning_tokens += self._since_boundary
        self._since_boundary = 0
        if kind == "tool_call":
            if not self._stop.stopped:
                self._call(ev.message, out)
        elif self._opened:
            if kind != "reasoning":
                held = self._stop.flush()
                if held:
                    self._text.append(held)
                    out.append(TextDelta(kind, held))
            out.append(MessageClosed(kind, "".join(self._text)))
        self._kind, self._text, self._opened = None, [], False

    def _call(self, message, out: list[TurnEvent]) -> None:
        kind = call_kind(message, self.turn.functions)
        if kind == CALL:
            name = function_name(message.recipient, self.turn.functions)
            call = ToolCallMade(new_id("call_"), name, message.content)
            self.tool_calls.append(call)
            out.append(call)
        elif kind == UNFINISHED:
            log.info("a call to %s was cut off before <|call|>: not a call", message.recipient)
        else:
            log.warning(
                "the model called %r, which is not a function tool of this request; it is told "
                "so and goes on",
                message.recipient,
            )

    def finish_reason(self, out_of_room: bool = False) -> str:
        """The API's finish reason: "tool_calls", "stop" or "length"."""
        if out_of_room:
            self.turn.out_of_room()
        if self._stop.stopped:
            return "stop"
        return self.turn.result().finish_reason


def _kind(message) -> str:
    kind = message_kind(message)
    return "final" if kind == "other" else kind


# ---------------------------------------------------------------------------- running


@dataclass
class GenerationSpec:
    """What a router asks the engine for (after validating the request)."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    max_context: int
    functions: tuple[str, ...] = ()
    stops: tuple[str, ...] = ()
    grammar: Any = None  # engine/constraints Grammar: structured outputs, tool_choice, strict tools


class Generation:
    """One assistant turn through the engine, read as TurnEvents on the event loop.

    `start()` submits (raising Busy / ContextLengthExceeded before anything is sent to the
    client); iterating `events()` streams, submitting a continuation segment after each refused
    call; afterwards `finish_reason` and `usage` are set. Leaving the iteration early (a client
    that disconnects) cancels the request in the engine.
    """

    def __init__(self, state, spec: GenerationSpec, request_id: str, endpoint: str):
        self.state = state
        self.spec = spec
        self.request_id = request_id
        self.endpoint = endpoint
        self.parser = TurnParser(state.tokenizer, functions=spec.functions, stops=spec.stops)
        self.usage = Usage(prompt_tokens=len(spec.prompt))
        self.finish_reason: str | None = None
        self._handle = None
        self._first: Finished | None = None
        self._segments = 0
        self._t0 = time.perf_counter()

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._handle = self._submit(self.spec.prompt, self.spec.max_tokens)

    def _submit(self, prompt: list[int], max_tokens: int):
        from ..engine.scheduler import GenerationRequest

        self._segments += 1
        rid = self.request_id if self._segments == 1 else f"{self.request_id}.{self._segments}"
        # The grammar covers the turn from its start; it allows only declared functions, so no
        # refused call (and no continuation segment) happens under it.
        grammar = self.spec.grammar if self._segments == 1 else None
        return self.state.scheduler.submit(
            GenerationRequest(
                prompt=prompt,
                max_tokens=max_tokens,
                sampling=self.spec.sampling,
                constraint=grammar.constraint() if grammar is not None else None,
                id=rid,
            )
        )

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    async def events(self) -> AsyncIterator[TurnEvent]:
        status = "cancelled"
        prompt = list(self.spec.prompt)
        try:
            while True:
                segment: list[int] = []
                finished = None
                async for event in self._handle:
                    if isinstance(event, TokenEvent):
                        segment.append(event.token)
                        self.usage.completion_tokens += 1
                        for out in self.parser.feed(event.token):
                            yield out
                        if self.parser.stopped_by_string:
                            self._handle.cancel()  # the rest would be cut anyway
                    elif isinstance(event, Finished):
                        finished = event
                    elif isinstance(event, Failed):
                        status = f"error ({type(event.error).__name__})"
                        raise event.error
                if self._first is None:
                    self._first = finished
                    self.usage.prompt_tokens = finished.prompt_tokens
                    self.usage.cached_tokens = finished.cached_tokens
                closing, call = self.parser.end_segment()
                for out in closing:
                    yield out
                out_of_room = False
                if call is not None:
                    prompt += segment + self.parser.turn.reply(call, self.state.tokenizer)
                    left = self.spec.max_tokens - self.usage.completion_tokens
                    if left >= 1 and len(prompt) + 1 <= self.spec.max_context:
                        self._handle = self._submit(prompt, left)
                        self.parser.new_segment()
                        continue
                    out_of_room = True
                self.usage.reasoning_tokens = self.parser.reasoning_tokens
                self.finish_reason = self.parser.finish_reason(out_of_room)
                status = "ok"
                return
        finally:
            if status == "cancelled" and self._handle is not None:
                self._handle.cancel()
            self._log(status)

    def _log(self, status: str) -> None:
        f = self._first
        u = self.usage
        elapsed = time.perf_counter() - self._t0
        ttft = f"{f.ttft_s:.3f}s" if f is not None else "-"
        tps = f"{f.decode_tps:.1f}" if f is not None else "-"
        log.info(
            "%s %s %s prompt=%d cached=%d completion=%d ttft=%s tokens/s=%s finish=%s (%.2fs)",
            self.request_id,
            self.endpoint,
            status,
            u.prompt_tokens,
            u.cached_tokens,
            u.completion_tokens,
            ttft,
            tps,
            self.finish_reason or "-",
            elapsed,
        )
