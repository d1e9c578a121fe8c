"""Render a chat request as a harmony prompt, token for token as openai-harmony does.

A prompt is a sequence of messages, each
  <|start|>{author}[ to={recipient}]<|channel|>{channel}[ <|constrain|>{type}]<|message|>{text}<|end|>
(a tool call ends in <|call|> instead), followed by `<|start|>assistant` for the model to continue.
Every piece of text is encoded separately and as plain text, exactly where openai-harmony encodes
separately, so user or tool text spelling "<|start|>" cannot forge a control token.

Choices made here (documented because the request format leaves them open):
- System and developer messages of the request, wherever they sit, become the `# Instructions` of
  the one harmony developer message, in order, joined by a blank line ("\\n\\n").
- An assistant message renders as: analysis (its reasoning), then its content, then one message
  per call. With tool calls, its content is what the model wrote before calling: each text part is
  one commentary message (`<|start|>assistant<|channel|>commentary<|message|>Let me check.<|end|>`,
  openai-harmony's rendering of a preamble), so a stored tool turn renders back as written. Without
  tool calls, content is the final answer (parts joined with a newline).
- Tool calls carry the recipient after the role (`<|start|>assistant to=functions.f<|channel|>
  commentary <|constrain|>json<|message|>...<|call|>`), which is openai-harmony's form.
- Analysis is kept only in the open tool loop: the messages after the last user message, while
  none of them is a final answer. Every other turn's analysis is dropped (finished turns, and turns
  a later user message cut short), as the model saw in training.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass

from ..errors import UsageError
from .request import ChatMessage, ChatRequest
from .response_format import render_response_formats
from .tokenizer import Tokenizer
from .tool_schema import render_functions_namespace

MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"
CHANNELS_LINE = (
    "# Valid channels: analysis, commentary, final. Channel must be included for every message."
)
FUNCTIONS_CHANNEL_LINE = "Calls to these tools must go to the commentary channel: 'functions'."
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True)
class Control:
    """A control token (by its text, e.g. "<|start|>"), as opposed to text to encode."""

    text: str


Piece = str | Control


@dataclass(frozen=True)
class HarmonyMessage:
    """One harmony message before tokenization."""

    author: str  # "system", "user", "assistant", ... or "functions.NAME" for tool results
    content: str
    channel: str | None = None
    recipient: str | None = None
    constrain: str | None = None  # content type after <|constrain|>, e.g. "json"

    def pieces(self) -> list[Piece]:
        """The message as text pieces and control tokens, split where openai-harmony splits."""
        out: list[Piece] = [Control("<|start|>"), self.author]
        if self.recipient is not None:
            out.append(f" to={self.recipient}")
        if self.channel is not None:
            out += [Control("<|channel|>"), self.channel]
        if self.constrain is not None:
            out += [" ", Control("<|constrain|>"), self.constrain]
        out += [Control("<|message|>"), self.content]
        is_call = self.author == "assistant" and self.recipient is not None
        out.append(Control("<|call|>" if is_call else "<|end|>"))
        return out


@dataclass(frozen=True)
class RenderedPrompt:
    """Prompt ids plus `message_ends`: the offset just after each complete message.

    Every `ids[:end]` is a prefix that a later request of the same conversation renders the same
    way (until a turn finishes and its analysis is dropped), which is what KV-cache reuse needs.
    """

    ids: list[int]
    message_ends: list[int]


def system_text(request: ChatRequest, date: str) -> str:
    """The system message's text: identity, cutoff, date, effort, channels."""
    channels = CHANNELS_LINE + ("\n" + FUNCTIONS_CHANNEL_LINE if request.tools else "")
    top = f"{MODEL_IDENTITY}\nKnowledge cutoff: {KNOWLEDGE_CUTOFF}\nCurrent date: {date}"
    return f"{top}\n\nReasoning: {request.reasoning_effort}\n\n{channels}"


def developer_text(request: ChatRequest) -> str | None:
    """The developer message's text (instructions, function tools, then the response format as
    harmony's docs/format.md places it, at the end), or None when there is none."""
    instructions = [m.content for m in request.messages if m.role in ("system", "developer")]
    sections = []
    if instructions:
        sections += ["# Instructions", "\n\n".join(instructions)]
    if request.tools:
        sections += ["# Tools", render_functions_namespace(request.tools)]
    response_formats = render_response_formats(request.response_format)
    if response_formats:
        sections.append(response_formats)
    return "\n\n".join(sections) if sections else None


def _keeps_analysis(messages: tuple[ChatMessage, ...]) -> list[bool]:
    """Per message: whether its reasoning is rendered (only in the open tool loop)."""
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    tail = messages[last_user + 1 :]
    open_loop = not any(m.role == "assistant" and _is_final(m) for m in tail)
    return [open_loop and i > last_user for i in range(len(messages))]


def _is_final(message: ChatMessage) -> bool:
    return message.content is not None and not message.tool_calls


def _assistant_messages(message: ChatMessage, keep_analysis: bool) -> list[HarmonyMessage]:
    out = []
    if message.reasoning and keep_analysis:
        out.append(HarmonyMessage("assistant", message.reasoning, channel="analysis"))
    if message.tool_calls:
        for preamble in message.preambles:
            out.append(HarmonyMessage("assistant", preamble, channel="commentary"))
        for call in message.tool_calls:
            out.append(
                HarmonyMessage(
                    "assistant",
                    call.arguments,
                    channel="commentary",
                    recipient=f"functions.{call.name}",
                    constrain="json",
                )
            )
    elif message.content is not None:
        out.append(HarmonyMessage("assistant", message.content, channel="final"))
    return out


def harmony_messages(request: ChatRequest, *, date: str | None = None) -> list[HarmonyMessage]:
    """The conversation as harmony messages: system, developer (if any), then the turns."""
    date = check_date(date)
    out = [HarmonyMessage("system", system_text(request, date))]
    developer = developer_text(request)
    if developer is not None:
        out.append(HarmonyMessage("developer", developer))
    keep = _keeps_analysis(request.messages)
    for message, keep_analysis in zip(request.messages, keep, strict=True):
        if message.role == "user":
            out.append(HarmonyMessage("user", message.content or ""))
        elif message.role == "assistant":
            out += _assistant_messages(message, keep_analysis)
        elif message.role == "tool":
            author = f"functions.{message.name}"
            out.append(HarmonyMessage(author, message.content or "", "commentary", "assistant"))
    return out


def check_date(date: str | None) -> str:
    """`date` validated as YYYY-MM-DD; today's local date when None."""
    if date is None:
        return _dt.date.today().isoformat()
    try:
        if not _DATE.fullmatch(date):
            raise ValueError
        _dt.date.fromisoformat(date)
    except (TypeError, ValueError):
        raise UsageError(f"date: expected YYYY-MM-DD, got {date!r}") from None
    return date


def _encode_pieces(pieces: list[Piece], tokenizer: Tokenizer) -> list[int]:
    ids: list[int] = []
    for piece in pieces:
        if isinstance(piece, Control):
            ids.append(tokenizer.special(piece.text))
        elif piece:
            ids += tokenizer.encode(piece)
    return ids


GENERATION_PROMPT: list[Piece] = [Control("<|start|>"), "assistant"]


def encode_messages(
    messages: list[HarmonyMessage], tokenizer: Tokenizer, *, generation_prompt: bool = False
) -> list[int]:
    """`messages` as ids (plus `<|start|>assistant` with `generation_prompt`), as in a prompt."""
    pieces = [p for m in messages for p in m.pieces()]
    return _encode_pieces(pieces + (GENERATION_PROMPT if generation_prompt else []), tokenizer)


def render_prompt_prefix(
    request: ChatRequest, tokenizer: Tokenizer, *, date: str | None = None
) -> RenderedPrompt:
    """The conversation's messages as ids, without the generation prompt, with message ends."""
    ids: list[int] = []
    ends: list[int] = []
    for message in harmony_messages(request, date=date):
        ids += _encode_pieces(message.pieces(), tokenizer)
        ends.append(len(ids))
    return RenderedPrompt(ids, ends)


def render_prompt(
    request: ChatRequest, tokenizer: Tokenizer, *, date: str | None = None
) -> list[int]:
    """The prompt for the model's next assistant turn: messages + `<|start|>assistant`."""
    prefix = render_prompt_prefix(request, tokenizer, date=date)
    return prefix.ids + _encode_pieces(GENERATION_PROMPT, tokenizer)


def render_text(request: ChatRequest, *, date: str | None = None) -> str:
    """The same prompt as text (control tokens spelled out); needs no tokenizer."""
    pieces = [p for m in harmony_messages(request, date=date) for p in m.pieces()]
    pieces += GENERATION_PROMPT
    return "".join(p.text if isinstance(p, Control) else p for p in pieces)
