"""A Responses API request -> the harmony ChatRequest and the generation settings.

`input` (a string, or items) becomes chat-shaped messages for harmony/request.py:
- message items of every role (`developer` and `system` become instructions, as in chat);
- consecutive assistant-side items (reasoning, assistant messages, function calls) form one
  assistant turn: its reasoning, its text (a commentary preamble when the turn calls a tool) and
  its calls, so harmony's rule keeps a tool loop's chain of thought;
- reasoning items give their text from `content` (reasoning_text parts) or, for stateless clients,
  from `encrypted_content` (reasoning_blob.py); summaries are not the chain of thought and are
  not rendered;
- function_call_output items become tool messages, named after the call they answer.
`instructions` come first; with `previous_response_id` the stored conversation comes next (its
instructions are not carried over, as at OpenAI). Function tools are rendered (`strict` ones held
to their parameters by the grammar); other tool types (web_search, custom, ...) are left out with
a warning in the log, not refused: Codex sends them. `text.format` and `tool_choice` are the
structured outputs of settings.py.
Every problem is a 400 naming the field (`input[3].call_id: ...`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import UsageError
from ..harmony.request import ChatRequest, parse_chat_request
from ..harmony.response_format import parse_response_format
from .errors import APIError, bad_request, unsupported
from .reasoning_blob import decode_reasoning
from .responses_types import ResponseCreateParams
from .settings import check_service_tier, generation_spec, sampling_params
from .turn import FUNCTION_NAME, GenerationSpec

log = logging.getLogger("gptoss_mlx.server")

ENCRYPTED_REASONING = "reasoning.encrypted_content"
_TEXT_PARTS = ("input_text", "output_text", "text")


@dataclass
class ResponsesCall:
    """A validated Responses request, ready for the engine.

    `history`: the conversation in the chat shape (without instructions), which a stored response
    keeps for a later `previous_response_id`; `tools`: the function tools as given, echoed back."""

    request: ChatRequest
    spec: GenerationSpec
    stream: bool
    store: bool
    include_encrypted: bool
    history: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)
    effort: str = "medium"
    summary: str | None = None


def build_responses_call(body: ResponseCreateParams, state) -> ResponsesCall:
    """Validate `body`, resolve `previous_response_id`, and render the prompt."""
    _refuse_unsupported(body)
    check_service_tier(body.service_tier)
    include_encrypted = _includes(body.include)
    effort = (body.reasoning.effort if body.reasoning else None) or state.default_effort
    if effort not in ("low", "medium", "high"):
        raise bad_request(
            f"reasoning.effort: expected one of low, medium, high, got {effort!r}",
            "reasoning.effort",
        )
    response_format = parse_response_format(body.text.format if body.text else None, "text.format")
    sampling = sampling_params(body.temperature, body.top_p)
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        stored = state.store.get(body.previous_response_id)
        if stored is None:
            raise APIError(
                404,
                f"previous_response_id: no stored response {body.previous_response_id!r} (never "
                "stored, deleted, evicted, or the server restarted); send the whole conversation",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        history = list(stored.messages)
    history += input_messages(body.input, _call_names(history))
    tools = function_tools(body.tools)
    messages = [{"role": "developer", "content": body.instructions}] if body.instructions else []
    messages += history
    if not messages:
        raise bad_request("input: empty; send at least one message", "input")
    chat_tools = [{"type": "function", "function": _chat_function(t)} for t in tools]
    obj = {
        "messages": messages,
        "tools": chat_tools,
        "reasoning_effort": effort,
        "tool_choice": body.tool_choice,
    }
    try:
        request = parse_chat_request(obj)
    except UsageError as e:  # residual checks of harmony/request.py, in its chat terms
        if str(e).startswith("tool_choice"):
            raise
        raise bad_request(f"input: {e}", "input") from None
    request = replace(request, response_format=response_format)
    try:
        spec = generation_spec(
            request,
            state,
            max_tokens=body.max_output_tokens,
            sampling=sampling,
            max_reasoning_tokens=body.max_reasoning_tokens,
        )
    except UsageError as e:  # the grammar names the chat field; here it is text.format
        message = str(e)
        if message.startswith("response_format"):
            raise UsageError("text.format" + message.removeprefix("response_format")) from None
        raise
    summary = body.reasoning.summary or body.reasoning.generate_summary if body.reasoning else None
    return ResponsesCall(
        request,
        spec,
        stream=bool(body.stream),
        store=body.store is not False,
        include_encrypted=include_encrypted,
        history=history,
        tools=tools,
        effort=effort,
        summary=summary,
    )


def _refuse_unsupported(body: ResponseCreateParams) -> None:
    if body.background:
        raise unsupported("background", "background responses are not supported; stream instead")
    if body.truncation not in (None, "disabled"):
        raise unsupported(
            "truncation", "only 'disabled': the server never drops parts of a conversation"
        )
    if body.top_logprobs not in (None, 0):
        raise unsupported("top_logprobs", "log probabilities are not returned by this server")
    if body.text is not None and body.text.verbosity not in (None, "medium"):
        raise unsupported("text.verbosity", "gpt-oss has no verbosity setting; leave it at medium")
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options: only allowed with stream: true", "stream_options")


def _includes(include: list[str] | None) -> bool:
    for i, item in enumerate(include or []):
        if item != ENCRYPTED_REASONING:
            raise unsupported(
                f"include[{i}]", f"{item!r} is not available; only {ENCRYPTED_REASONING!r}"
            )
    return bool(include)


# ---------------------------------------------------------------------------- tools


def function_tools(raw: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The function tools among `raw` (Responses shape); the others are skipped with a warning."""
    out, skipped = [], []
    for i, tool in enumerate(raw or []):
        if not isinstance(tool, dict):
            raise bad_request(f"tools[{i}]: expected a tool object", f"tools[{i}]")
        if tool.get("type") != "function":
            skipped.append(str(tool.get("type")))
            continue
        name = tool.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise bad_request(
                f"tools[{i}].name: invalid function name {name!r} (letters, digits, _ and -, "
                "at most 64)",
                f"tools[{i}].name",
            )
        if tool.get("parameters") is not None and not isinstance(tool["parameters"], dict):
            raise bad_request(
                f"tools[{i}].parameters: expected a JSON schema object", f"tools[{i}].parameters"
            )
        if tool.get("description") is not None and not isinstance(tool["description"], str):
            raise bad_request(
                f"tools[{i}].description: expected a string", f"tools[{i}].description"
            )
        if tool.get("strict") is not None and not isinstance(tool["strict"], bool):
            raise bad_request(f"tools[{i}].strict: expected true or false", f"tools[{i}].strict")
        out.append(tool)
    if skipped:
        log.warning(
            "tools of type %s are not run by this server: left out of the prompt",
            ", ".join(sorted(set(skipped))),
        )
    return out


def _chat_function(tool: dict[str, Any]) -> dict[str, Any]:
    fn = {"name": tool["name"]}
    for key in ("description", "parameters", "strict"):
        if tool.get(key) is not None:
            fn[key] = tool[key]
    return fn


# ---------------------------------------------------------------------------- input items


def _call_names(messages: list[dict[str, Any]]) -> dict[str, str]:
    names = {}
    for m in messages:
        for call in m.get("tool_calls") or []:
            names[call["id"]] = call["function"]["name"]
    return names


def input_messages(raw: str | list[Any] | None, call_names: dict[str, str]) -> list[dict[str, Any]]:
    """`input` as chat-shaped messages (see the module docstring)."""
    if raw is None:
        return []
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    builder = _TurnBuilder(call_names)
    for i, item in enumerate(raw):
        builder.add(item, f"input[{i}]")
    return builder.finish()


class _TurnBuilder:
    def __init__(self, call_names: dict[str, str]):
        self.call_names = dict(call_names)
        self.messages: list[dict[str, Any]] = []
        self.reasoning: list[str] = []
        self.content: str | None = None
        self.calls: list[dict[str, Any]] = []

    def add(self, item: Any, where: str) -> None:
        if not isinstance(item, dict):
            raise bad_request(f"{where}: expected an input item object", where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            self._message(item, where)
        elif kind == "reasoning":
            self._reasoning(item, where)
        elif kind == "function_call":
            self._call(item, where)
        elif kind == "function_call_output":
            self._output(item, where)
        elif kind == "item_reference":
            raise unsupported(f"{where}.type", "item references are not kept; send the item itself")
        else:
            raise bad_request(
                f"{where}.type: unsupported input item {kind!r} (expected message, reasoning, "
                "function_call or function_call_output)",
                f"{where}.type",
            )

    def finish(self) -> list[dict[str, Any]]:
        self._flush()
        return self.messages

    # -- one assistant turn is gathered until a non-assistant item comes

    def _flush(self) -> None:
        if not (self.reasoning or self.content is not None or self.calls):
            return
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning:
            msg["reasoning_content"] = "\n".join(self.reasoning)
        if self.calls:
            msg["tool_calls"] = self.calls
        self.messages.append(msg)
        self.reasoning, self.content, self.calls = [], None, []

    def _message(self, item: dict[str, Any], where: str) -> None:
        role = item.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise bad_request(
                f"{where}.role: expected user, system, developer or assistant, got {role!r}",
                f"{where}.role",
            )
        text = _text(item.get("content"), f"{where}.content")
        if role != "assistant":
            self._flush()
            self.messages.append({"role": role, "content": text})
            return
        if self.content is not None or self.calls:
            self._flush()
        self.content = text

    def _reasoning(self, item: dict[str, Any], where: str) -> None:
        if self.content is not None or self.calls:
            self._flush()
        parts = item.get("content")
        texts = []
        if parts is not None:
            if not isinstance(parts, list):
                raise bad_request(f"{where}.content: expected a list of parts", f"{where}.content")
            for j, part in enumerate(parts):
                if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                    raise bad_request(
                        f'{where}.content[{j}]: expected {{"type": "reasoning_text", "text": ...}}',
                        f"{where}.content[{j}]",
                    )
                texts.append(part["text"])
        if not texts and item.get("encrypted_content") is not None:
            try:
                texts.append(
                    decode_reasoning(item["encrypted_content"], f"{where}.encrypted_content")
                )
            except UsageError as e:
                raise bad_request(str(e), f"{where}.encrypted_content") from None
        text = "".join(texts)
        if text:
            self.reasoning.append(text)

    def _call(self, item: dict[str, Any], where: str) -> None:
        call_id, name, args = item.get("call_id"), item.get("name"), item.get("arguments", "")
        for key, value in (("call_id", call_id), ("name", name), ("arguments", args)):
            if not isinstance(value, str):
                raise bad_request(f"{where}.{key}: expected a string", f"{where}.{key}")
        if not call_id:
            raise bad_request(f"{where}.call_id: must not be empty", f"{where}.call_id")
        if not FUNCTION_NAME.fullmatch(name):
            raise bad_request(f"{where}.name: invalid function name {name!r}", f"{where}.name")
        self.calls.append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
        )
        self.call_names[call_id] = name

    def _output(self, item: dict[str, Any], where: str) -> None:
        call_id = item.get("call_id")
        if not isinstance(call_id, str):
            raise bad_request(f"{where}.call_id: expected a string", f"{where}.call_id")
        if call_id not in self.call_names:
            raise bad_request(
                f"{where}.call_id: no function_call with call_id {call_id!r} earlier in the "
                "conversation",
                f"{where}.call_id",
            )
        self._flush()
        output = _text(item.get("output"), f"{where}.output")
        self.messages.append(
            {
                "role": "tool",
                "tool_call_id": call_id,
                "name": self.call_names[call_id],
                "content": output,
            }
        )


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or text parts joined with newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}: expected a string or a list of text parts", where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise bad_request(f"{where}[{j}]: expected a content part object", f"{where}[{j}]")
        kind = part.get("type")
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise bad_request(
                f"{where}[{j}].type: {kind!r} is not supported (gpt-oss reads text: input_text "
                "or output_text parts)",
                f"{where}[{j}].type",
            )
    return "\n".join(texts)
