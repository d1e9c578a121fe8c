"""An OpenAI-shaped chat request, parsed and validated into plain dataclasses.

Accepted shape (the Chat Completions API's, minus what gpt-oss cannot use):
  {"messages": [...], "tools": [...], "reasoning_effort": "low" | "medium" | "high",
   "response_format": {...}, "tool_choice": ...}   (the last two: see response_format.py)
Messages: system / developer / user with `content`; assistant with `content`, `reasoning_content`
(alias `reasoning`, `thinking`) and `tool_calls`; tool with `content` plus `tool_call_id` and/or
`name`. `content` is a string or a list of {"type": "text", "text": ...} parts (joined with "\n").
Other top-level fields (model, temperature, stream, ...) are left to the caller.

An assistant message with both `content` and `tool_calls` (which the Chat Completions shape
allows) is a turn that wrote text before calling: in harmony, a commentary-channel preamble
("Let me check the weather.") before the `to=functions.NAME` calls. Its content is kept as
`preambles`, one commentary message per text part (a plain string is one part; empty parts, which
clients send with tool calls, are none). Without `tool_calls`, content is the final answer.

Every problem raises UsageError naming the field, e.g. "messages[2].role: unknown role 'bot'".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from .response_format import ResponseFormat, ToolChoice, parse_response_format, parse_tool_choice

ROLES = ("system", "developer", "user", "assistant", "tool")
EFFORTS = ("low", "medium", "high")
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
# OpenAI's rule for function names; they also end up in TypeScript and in `to=functions.NAME`.
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class ToolCall:
    """One function call made by the assistant; `arguments` is the JSON text as sent."""

    name: str
    arguments: str
    id: str | None = None


@dataclass(frozen=True)
class ChatMessage:
    """One message. `name` of a tool message is the function whose result it carries."""

    role: str
    content: str | None = None
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    # An assistant message with tool_calls: the commentary it wrote before them, one message each.
    preambles: tuple[str, ...] = ()


@dataclass(frozen=True)
class FunctionTool:
    """A function the model may call; `parameters` is its JSON schema (None: no arguments)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool = False  # arguments held to `parameters` by a grammar (engine/constraints)


@dataclass(frozen=True)
class ChatRequest:
    """A validated conversation plus the tools and reasoning effort to render it with."""

    messages: tuple[ChatMessage, ...]
    tools: tuple[FunctionTool, ...] = ()
    reasoning_effort: str = "medium"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # Structured outputs (harmony/response_format.py): the answer's format, which tools to call.
    response_format: ResponseFormat | None = None
    tool_choice: ToolChoice = field(default_factory=ToolChoice)


def parse_chat_request(obj: Any) -> ChatRequest:
    """Validate a decoded JSON request (an object, or a bare list of messages)."""
    if isinstance(obj, list):
        obj = {"messages": obj}
    if not isinstance(obj, dict):
        raise UsageError(f"request: expected a JSON object, got {_kind(obj)}")
    raw_messages = obj.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise UsageError("messages: expected a non-empty list of messages")
    tools = _parse_tools(obj.get("tools"))
    effort = obj.get("reasoning_effort")
    effort = "medium" if effort is None else effort
    if effort not in EFFORTS:
        raise UsageError(f"reasoning_effort: expected one of low, medium, high, got {effort!r}")
    messages: list[ChatMessage] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, for tool messages
    for i, raw in enumerate(raw_messages):
        message = _parse_message(raw, f"messages[{i}]", call_names)
        for call in message.tool_calls:
            if call.id is not None:
                call_names[call.id] = call.name
        messages.append(message)
    response_format = parse_response_format(obj.get("response_format"))
    tool_choice = parse_tool_choice(obj.get("tool_choice"), [t.name for t in tools])
    known = {"messages", "tools", "reasoning_effort", "response_format", "tool_choice"}
    extra = {k: v for k, v in obj.items() if k not in known}
    return ChatRequest(tuple(messages), tools, effort, extra, response_format, tool_choice)


def load_chat_request(text: str | bytes, source: str = "request") -> ChatRequest:
    """Parse JSON text (an object, or a bare list of messages) into a validated request."""
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{source}: not valid JSON ({e})") from None
    except RecursionError:
        raise UsageError(f"{source}: JSON nested too deeply") from None
    return parse_chat_request(obj)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _parse_content(value: Any, where: str) -> str | None:
    parts = _parse_parts(value, where)
    return None if parts is None else "\n".join(parts)


def _parse_parts(value: Any, where: str) -> list[str] | None:
    """`content` as its text parts: a string is one part."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise UsageError(f"{where}: expected a string or a list of text parts, got {_kind(value)}")
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict):
            raise UsageError(f"{where}[{j}]: expected a content part object, got {_kind(part)}")
        if part.get("type") != "text":
            raise UsageError(
                f"{where}[{j}].type: unsupported part {part.get('type')!r} (only 'text')"
            )
        if not isinstance(part.get("text"), str):
            raise UsageError(f"{where}[{j}].text: expected a string")
        texts.append(part["text"])
    return texts


def _parse_message(raw: Any, where: str, call_names: dict[str, str]) -> ChatMessage:
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: expected a message object, got {_kind(raw)}")
    role = raw.get("role")
    if role not in ROLES:
        raise UsageError(
            f"{where}.role: unknown role {role!r} (expected one of {', '.join(ROLES)})"
        )
    parts = _parse_parts(raw.get("content"), f"{where}.content")
    content = None if parts is None else "\n".join(parts)
    if role == "assistant":
        return _parse_assistant(raw, where, content, parts or [])
    if content is None:
        raise UsageError(f"{where}.content: a {role} message needs content")
    if role != "tool":
        return ChatMessage(role, content)
    call_id = raw.get("tool_call_id")
    name = raw.get("name")
    if call_id is not None and not isinstance(call_id, str):
        raise UsageError(f"{where}.tool_call_id: expected a string")
    if name is None and call_id is not None:
        if call_id not in call_names:
            raise UsageError(f"{where}.tool_call_id: no earlier tool call has id {call_id!r}")
        name = call_names[call_id]
    if name is None:
        raise UsageError(f"{where}: a tool message needs 'name' or a matching 'tool_call_id'")
    if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
        raise UsageError(f"{where}.name: invalid function name {name!r}")
    return ChatMessage("tool", content, tool_call_id=call_id, name=name)


def _parse_assistant(raw: dict, where: str, content: str | None, parts: list[str]) -> ChatMessage:
    reasoning = None
    for key in REASONING_KEYS:
        if raw.get(key) is not None:
            reasoning = _parse_content(raw[key], f"{where}.{key}")
            break
    calls = raw.get("tool_calls") or []
    if not isinstance(calls, list):
        raise UsageError(f"{where}.tool_calls: expected a list")
    tool_calls = tuple(_parse_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls))
    if content is None and not reasoning and not tool_calls:
        raise UsageError(f"{where}: an assistant message needs content, reasoning or tool_calls")
    preambles = tuple(p for p in parts if p) if tool_calls else ()
    return ChatMessage("assistant", content, reasoning or None, tool_calls, preambles=preambles)


def _parse_tool_call(raw: Any, where: str) -> ToolCall:
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: expected a tool call object, got {_kind(raw)}")
    if raw.get("type", "function") != "function":
        raise UsageError(f"{where}.type: unsupported tool call type {raw.get('type')!r}")
    fn = raw.get("function")
    if not isinstance(fn, dict):
        raise UsageError(f"{where}.function: expected an object with name and arguments")
    name = fn.get("name")
    if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
        raise UsageError(f"{where}.function.name: invalid function name {name!r}")
    args = fn.get("arguments")
    if args is None:
        args = "{}"
    elif not isinstance(args, str):
        # Objects are serialized compactly, the way the model writes its own calls.
        args = json.dumps(args, ensure_ascii=False, separators=(",", ":"))
    call_id = raw.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise UsageError(f"{where}.id: expected a string")
    return ToolCall(name, args, call_id)


def _parse_tools(raw: Any) -> tuple[FunctionTool, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise UsageError("tools: expected a list of function tools")
    tools = []
    for i, item in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(item, dict):
            raise UsageError(f"{where}: expected a tool object, got {_kind(item)}")
        if item.get("type", "function") != "function":
            raise UsageError(f"{where}.type: unsupported tool type {item.get('type')!r}")
        fn = item.get("function")
        if not isinstance(fn, dict):
            raise UsageError(f"{where}.function: expected an object with name and parameters")
        name = fn.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            raise UsageError(f"{where}.function.name: invalid function name {name!r}")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise UsageError(f"{where}.function.description: expected a string")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise UsageError(f"{where}.function.parameters: expected a JSON schema object")
        if name in {t.name for t in tools}:
            raise UsageError(f"{where}.function.name: duplicate tool {name!r}")
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise UsageError(f"{where}.function.strict: expected true or false")
        tools.append(FunctionTool(name, description, params, bool(strict)))
    return tuple(tools)
