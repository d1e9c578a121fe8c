"""Streaming parser for what gpt-oss writes: harmony messages, one token id at a time.

Grammar accepted (control tokens in <|...|>, TEXT = any other token, decoded to bytes):

    stream  := [rest]  ( <|start|> rest | TEXT+ as a headerless message )*
    rest    := header <|message|> TEXT* stop
    header  := [role] [" to=" recipient] [<|channel|> channel [" to=" recipient] [type]]
               [<|constrain|> type]
    stop    := <|end|> | <|return|> | <|call|> | <|endoftext|> | <|start|> | end of stream

The parser starts inside a header whose role is already known (the prompt ends in
`<|start|>assistant`), or, with `role=None`, between messages. Nothing here raises on odd output,
and no model text is dropped:
  * text outside any message becomes a message with no channel (callers show it as final);
  * a header that is not closed by <|message|> (stop token, end of stream, or longer than
    `max_header_bytes`) is salvaged: the role/channel it names are kept, its remaining raw text
    becomes the message content;
  * <|channel|>, <|constrain|> or <|message|> inside content are kept as literal text;
  * reserved special tokens are text: whatever `decode_bytes` renders for them.
The decoded text never splits a UTF-8 character: incomplete byte sequences wait for the next token.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from .calls import CALL, REFUSED, UNFINISHED, addressed, call_kind, function_name

CHANNEL, CONSTRAIN, MESSAGE = "<|channel|>", "<|constrain|>", "<|message|>"
_LITERAL = {"channel": CHANNEL, "constrain": CONSTRAIN, "message": MESSAGE}
_ROLES = ("assistant", "user", "system", "developer", "tool")
_WORD = re.compile(r"[^\s<]*")  # a channel name ends at whitespace or the next marker
_BETWEEN, _HEADER, _CONTENT = "between", "header", "content"


@dataclass(frozen=True)
class HarmonyIds:
    """Ids of the harmony control tokens (o200k_harmony's by default)."""

    start: int = 200006
    end: int = 200007
    message: int = 200008
    channel: int = 200005
    constrain: int = 200003
    return_: int = 200002
    call: int = 200012
    endoftext: int = 199999


@dataclass(frozen=True)
class MessageStart:
    """A message header was read; its content follows as ContentDelta events."""

    role: str
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None  # as written: "json" or "<|constrain|>json"


@dataclass(frozen=True)
class ContentDelta:
    """The next piece of the current message's content (whole UTF-8 characters)."""

    text: str


@dataclass
class Message:
    """A finished message. `ended` is "end", "return", "call" or "truncated"."""

    role: str
    channel: str | None
    recipient: str | None
    content_type: str | None
    content: str
    ended: str


@dataclass(frozen=True)
class MessageEnd:
    """The current message is complete."""

    message: Message


Event = MessageStart | ContentDelta | MessageEnd


class HarmonyStreamParser:
    """Turn generated token ids into message events (see the module docstring for the grammar).

    Args:
        decode_bytes: maps a list of token ids to their bytes (specials rendered as their text).
        ids: the control token ids.
        role: the role already written by the prompt (`<|start|>assistant`), or None to start
            between messages.
        max_header_bytes: a header longer than this is taken for content that lost its header.

    Attributes `messages` (finished messages so far) and `stopped_by` ("return", "call",
    "endoftext" or None: the stop token after the last message start) are public.
    """

    def __init__(
        self,
        decode_bytes: Callable[[list[int]], bytes],
        ids: HarmonyIds = HarmonyIds(),
        *,
        role: str | None = "assistant",
        max_header_bytes: int = 256,
    ) -> None:
        self._decode_bytes = decode_bytes
        self._control = {
            ids.start: "start", ids.end: "end", ids.message: "message", ids.channel: "channel",
            ids.constrain: "constrain", ids.return_: "return", ids.call: "call",
            ids.endoftext: "endoftext",
        }  # fmt: skip
        self._max_header_bytes = max_header_bytes
        self.messages: list[Message] = []
        self.stopped_by: str | None = None
        self._state = _BETWEEN
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._role: str | None = None  # role given before the header text (prompt or implied)
        self._header = ""  # header text so far, markers spelled out
        self._header_bytes = 0
        self._current: MessageStart | None = None
        self._parts: list[str] = []
        if role is not None:
            self._begin_header(role)

    def feed(self, token_id: int) -> list[Event]:
        """Consume one generated token id; return the events it completes."""
        out: list[Event] = []
        kind = self._control.get(token_id)
        if kind is None:
            self._text(self._token_bytes(token_id), out)
        elif kind in _LITERAL and self._state == _CONTENT:
            self._text(_LITERAL[kind].encode(), out)  # stray marker inside content: keep as text
        elif kind == "start":
            self._close("end", out)
            self._begin_header(None)
        elif kind in ("channel", "constrain"):
            if self._state == _BETWEEN:  # the model skipped `<|start|>assistant`
                self._begin_header("assistant")
            self._text(_LITERAL[kind].encode(), out)
        elif kind == "message":
            if self._state == _BETWEEN:
                self._begin_header("assistant")
            header_text = self._header + self._decoder.decode(b"", final=True)
            self._decoder.reset()
            header, content = _parse_header(header_text, self._role), ""
            if header is None:
                header, content = _salvage(header_text, self._role)
            self._open(header, content, out)
        else:  # end, return, call, endoftext
            self._close("end" if kind == "endoftext" else kind, out)
            if kind != "end":
                self.stopped_by = kind
        return out

    def finish(self) -> list[Event]:
        """The stream ended: close whatever is open as "truncated"."""
        out: list[Event] = []
        self._close("truncated", out)
        return out

    def _token_bytes(self, token_id: int) -> bytes:
        try:
            return self._decode_bytes([token_id])
        except Exception:  # an id the vocabulary cannot decode must not end the stream
            return f"<|token_{token_id}|>".encode()

    def _begin_header(self, role: str | None) -> None:
        self._state, self._role = _HEADER, role
        self._header, self._header_bytes = "", 0

    def _text(self, data: bytes, out: list[Event]) -> None:
        if self._state == _BETWEEN:
            self._open(MessageStart("assistant"), "", out)
        if self._state == _CONTENT:
            self._emit(self._decoder.decode(data), out)
            return
        self._header += self._decoder.decode(data)
        self._header_bytes += len(data)
        headerless = self._role is not None and not _could_be_header(self._header)
        if headerless or self._header_bytes > self._max_header_bytes:
            self._open(*_salvage(self._header, self._role), out)

    def _open(self, header: MessageStart, content: str, out: list[Event]) -> None:
        self._state, self._current, self._parts = _CONTENT, header, []
        self.stopped_by = None
        out.append(header)
        self._emit(content, out)

    def _emit(self, text: str, out: list[Event]) -> None:
        if text:
            self._parts.append(text)
            out.append(ContentDelta(text))

    def _close(self, ended: str, out: list[Event]) -> None:
        if self._state == _HEADER:
            if not self._header and not self._decoder.getstate()[0]:
                self._state = _BETWEEN  # an empty header (`<|start|>` then a stop): no message
                return
            self._header += self._decoder.decode(b"", final=True)
            self._open(*_salvage(self._header, self._role), out)
        if self._state == _CONTENT:
            self._emit(self._decoder.decode(b"", final=True), out)
            head = self._current
            message = Message(
                head.role,
                head.channel,
                head.recipient,
                head.content_type,
                "".join(self._parts),
                ended,
            )
            self.messages.append(message)
            out.append(MessageEnd(message))
        self._decoder.reset()
        self._state = _BETWEEN


def _could_be_header(text: str) -> bool:
    """Whether text after a known role can still grow into a header (` to=...`, markers)."""
    s = text.lstrip()
    return s.startswith(("to=", "<|")) or "to=".startswith(s) or "<|".startswith(s)


def _parse_header(text: str, role: str | None) -> MessageStart | None:
    """Parse a header closed by <|message|>; None when it is not well formed."""
    if text.count(CHANNEL) > 1 or text.count(CONSTRAIN) > 1:
        return None
    channel = None
    at = text.find(CHANNEL)
    if at >= 0:
        name = _WORD.match(text, at + len(CHANNEL))
        if not name.group():
            return None
        channel = name.group()
        text = text[:at] + " " + text[name.end() :]
    words = re.sub(r"\s*<\|constrain\|>\s*", " " + CONSTRAIN, text).split()
    if role is None:
        has_role = words and not words[0].startswith(("to=", "<|"))
        role = words.pop(0) if has_role else "assistant"
    recipients = [w.removeprefix("to=") for w in words if w.startswith("to=")]
    types = [w for w in words if not w.startswith("to=")]
    if len(recipients) > 1 or len(types) > 1 or "" in recipients:
        return None
    recipient = recipients[0] if recipients else None
    return MessageStart(role, channel, recipient, types[0] if types else None)


def _salvage(text: str, role: str | None) -> tuple[MessageStart, str]:
    """Split a header that never reached <|message|> into (header, content)."""
    at = text.find(CHANNEL)
    if at >= 0:
        end = _WORD.match(text, at + len(CHANNEL)).end()
        header = _parse_header(text[:end], role)
        if header is not None:
            return header, text[end:].lstrip()
    elif role is None:
        words = text.split(maxsplit=1)
        if words and words[0] in _ROLES:
            return MessageStart(words[0]), words[1] if len(words) > 1 else ""
    return MessageStart(role or "assistant"), text


@dataclass
class HarmonyResult:
    """A whole completion, sorted for a chat API.

    `finish_reason` is "tool_calls" (stopped on <|call|> with a function call), "stop" (any other
    stop token) or "length" (the stream ended without one). `tool_calls` holds only function
    calls; `refused_calls` and `unfinished_calls` the other addressed messages (harmony/calls.py),
    as {"recipient", "arguments"}.
    """

    final: str = ""
    reasoning: str = ""
    preambles: list[str] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)
    finish_reason: str = "length"
    messages: list[Message] = field(default_factory=list)
    refused_calls: list[dict] = field(default_factory=list)
    unfinished_calls: list[dict] = field(default_factory=list)


def message_kind(message: MessageStart | Message) -> str:
    """Where a message belongs: "tool_call", "reasoning", "preamble", "final" or "other".

    Messages with no channel (headerless text) or an unknown channel count as final, so model
    output is always shown; messages the model wrote as another role are "other".
    """
    if message.role != "assistant":
        return "other"
    if message.recipient is not None:
        return "tool_call"
    return {"analysis": "reasoning", "commentary": "preamble"}.get(message.channel, "final")


def build_result(
    messages: list[Message],
    stopped_by: str | None,
    id_prefix: str = "call_",
    *,
    functions: Collection[str] = (),
) -> HarmonyResult:
    """Sort parsed messages into a HarmonyResult; tool call ids are `id_prefix` + a counter.

    `functions`: the declared function names. Only a `<|call|>` to `functions.NAME` with NAME
    among them is a tool call (harmony/calls.py); with none declared, no message is.
    """
    result = HarmonyResult(messages=list(messages))
    reasoning: list[str] = []
    for message in messages:
        kind = message_kind(message)
        if kind == "final":
            result.final += message.content
        elif kind == "reasoning":
            reasoning.append(message.content)
        elif kind == "preamble":
            result.preambles.append(message.content)
        elif kind == "tool_call":
            call = call_kind(message, functions)
            if call == CALL:
                name = function_name(message.recipient, functions)
                call_id = f"{id_prefix}{len(result.tool_calls)}"
                function = {"name": name, "arguments": message.content}
                result.tool_calls.append({"id": call_id, "type": "function", "function": function})
            elif call == REFUSED:
                result.refused_calls.append(addressed(message))
            elif call == UNFINISHED:
                result.unfinished_calls.append(addressed(message))
    result.reasoning = "\n".join(reasoning)
    if stopped_by == "call" and messages and call_kind(messages[-1], functions) == CALL:
        result.finish_reason = "tool_calls"  # the completion ends on a function call
    elif stopped_by is not None:
        result.finish_reason = "stop"
    return result


def parse_messages(
    token_ids: Iterable[int],
    decode_bytes: Callable[[list[int]], bytes],
    ids: HarmonyIds = HarmonyIds(),
    *,
    role: str | None = "assistant",
) -> tuple[list[Message], str | None]:
    """The finished messages of a whole generated completion, and the stop token that ended it."""
    parser = HarmonyStreamParser(decode_bytes, ids, role=role)
    for token_id in token_ids:
        parser.feed(token_id)
    parser.finish()
    return parser.messages, parser.stopped_by


def parse_completion(
    token_ids: Iterable[int],
    decode_bytes: Callable[[list[int]], bytes],
    ids: HarmonyIds = HarmonyIds(),
    *,
    role: str | None = "assistant",
    id_prefix: str = "call_",
    functions: Collection[str] = (),
) -> HarmonyResult:
    """Parse a whole generated completion (the tokens after the prompt) into a HarmonyResult;
    `functions` are the declared function names (see `build_result`)."""
    messages, stopped_by = parse_messages(token_ids, decode_bytes, ids, role=role)
    return build_result(messages, stopped_by, id_prefix, functions=functions)
