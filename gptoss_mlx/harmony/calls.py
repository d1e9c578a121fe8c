"""Which of the model's addressed messages are function calls, and what becomes of the others.

gpt-oss was trained with built-in tools (`browser.search`, `python`) as well as developer
functions, and may address any of them whatever the prompt declares. An assistant message with a
recipient (`to=...`) is exactly one of:

- a function call (CALL): it ended with `<|call|>` and is addressed to `functions.NAME`, NAME one
  of the request's declared functions. Only these reach the caller as `tool_calls`.
- a refused call (REFUSED): it ended with `<|call|>` but is addressed to anything else (a built-in
  tool, `functions.NAME` for an undeclared NAME). It is never run, and never stored as a function
  call (the Chat Completions shape cannot even name `browser.search`, and `python` would come back
  as `to=functions.python`). The model is answered the way harmony answers any tool: a message
  from that recipient saying it is not available here (`refusal_ids`), after which the model
  continues its turn. OpenAI's gpt-oss chat answers its built-in tools with such tool messages.
- an unfinished call (UNFINISHED): it did not end with `<|call|>` (max_tokens or the context limit
  cut it off, or another token closed it). Never a call: never run, never asked about, never
  rendered back as a finished call; results report it apart.

Chat (`engine.chat.run_turn`), batch (`cli.batch_job`) and the server apply these rules through
`AssistantTurn` (harmony/turn.py), so all three treat the same output the same way.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from .render import HarmonyMessage, encode_messages
from .tokenizer import Tokenizer

CALL, REFUSED, UNFINISHED = "call", "refused", "unfinished"
FUNCTIONS = "functions."


class Addressed(Protocol):
    """What is read of a parsed message (harmony.parser.Message has these fields)."""

    role: str
    channel: str | None
    recipient: str | None
    content: str
    ended: str


def function_name(recipient: str | None, functions: Collection[str]) -> str | None:
    """NAME when `recipient` is `functions.NAME` and NAME is declared; None otherwise."""
    if recipient is None or not recipient.startswith(FUNCTIONS):
        return None
    name = recipient[len(FUNCTIONS) :]
    return name if name in functions else None


def call_kind(message: Addressed, functions: Collection[str]) -> str | None:
    """CALL, REFUSED or UNFINISHED for an assistant message with a recipient; None for others."""
    if message.role != "assistant" or message.recipient is None:
        return None
    if message.ended != "call":
        return UNFINISHED
    return CALL if function_name(message.recipient, functions) is not None else REFUSED


def addressed(message: Addressed) -> dict[str, str]:
    """A refused or unfinished call as reported in results: recipient and arguments as written."""
    return {"recipient": message.recipient or "", "arguments": message.content}


def refusal_text(recipient: str, functions: Collection[str]) -> str:
    """What the model is told about a tool it may not call (the tools it may call, if any)."""
    available = ", ".join(FUNCTIONS + name for name in sorted(functions))
    then = f"Available tools: {available}." if available else "Answer without tools."
    return f"Error: the tool {recipient} is not available here. {then}"


def refusal_message(call: Addressed, functions: Collection[str]) -> HarmonyMessage:
    """The tool message answering a refused call: from its recipient, to the assistant, on the
    call's channel (`<|start|>browser.search to=assistant<|channel|>analysis<|message|>...`)."""
    return HarmonyMessage(
        author=call.recipient or "",
        content=refusal_text(call.recipient or "", functions),
        channel=call.channel or "commentary",
        recipient="assistant",
    )


def refusal_ids(call: Addressed, functions: Collection[str], tokenizer: Tokenizer) -> list[int]:
    """The ids that follow a refused call's `<|call|>`: the refusal, then `<|start|>assistant`
    for the model to continue its turn."""
    return encode_messages([refusal_message(call, functions)], tokenizer, generation_prompt=True)
