"""Harmony turns on top of the generation engine: render a chat request, stream the model's
channels back as events, and keep a conversation's history the way gpt-oss was trained to see it.

`run_turn` is the one-shot building block (used by `generate` and `batch`); `ChatSession` is a
conversation (used by `chat` and the library API).

Tool calls follow harmony/calls.py: only a `<|call|>` to a declared `functions.NAME` is a tool
call; a call to anything else is answered inside the turn with "not available" and the model goes
on (harmony/turn.py); a call cut off before `<|call|>` is reported as unfinished, never run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..harmony.calls import CALL, REFUSED, call_kind, function_name
from ..harmony.parser import (
    ContentDelta,
    HarmonyIds,
    HarmonyStreamParser,
    Message,
    MessageEnd,
    MessageStart,
    message_kind,
)
from ..harmony.render import check_date, render_prompt
from ..harmony.request import EFFORTS, ChatRequest, parse_chat_request
from ..harmony.turn import AssistantTurn
from .generate import GenerationStats, SamplingParams, generate_tokens
from .prompt_cache import PromptCache

DEFAULT_MAX_TOKENS = 4096


@dataclass(frozen=True)
class TurnEvent:
    """What the model is writing, as it writes it.

    kind: "reasoning" (analysis channel), "preamble" (commentary shown to the user), "final"
    (the answer), "tool_call" (a function call, in `tool_call`), "refused_call" (a call to a tool
    that is not declared, e.g. `browser.search`: not run, the model is told so and goes on),
    "unfinished_call" (a call cut off before `<|call|>`: never run), "other" (text with no usual
    home; shown rather than dropped). A tool_call's `name` is the function's; for the refused and
    unfinished kinds it is the recipient as written ("browser.search", "functions.get_weather").
    """

    kind: str
    text: str = ""
    tool_call: dict[str, Any] | None = None


@dataclass
class TurnResult:
    final: str
    reasoning: str
    tool_calls: list[dict[str, Any]]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    stats: GenerationStats = field(default_factory=GenerationStats)
    preambles: list[str] = field(default_factory=list)
    # Every token after the prompt: what the model generated, and any refusal it was answered with.
    tokens: list[int] = field(default_factory=list)
    reused_tokens: int = 0  # prompt tokens that came from the cache instead of a prefill
    refused_calls: list[dict[str, str]] = field(default_factory=list)  # {recipient, arguments}
    unfinished_calls: list[dict[str, str]] = field(default_factory=list)

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def to_json(self) -> dict[str, Any]:
        """The result record; `refused_calls` and `unfinished_calls` appear only when present."""
        out: dict[str, Any] = {
            "final": self.final,
            "reasoning": self.reasoning,
            "tool_calls": self.tool_calls,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
        }
        if self.refused_calls:
            out["refused_calls"] = self.refused_calls
        if self.unfinished_calls:
            out["unfinished_calls"] = self.unfinished_calls
        return out

    def assistant_message(self) -> dict[str, Any]:
        """The turn as an OpenAI-shaped assistant message, for the conversation's history.

        A tool-call turn keeps what the model wrote before calling as `content` (one preamble: a
        string; several: one text part each), which renders back as its commentary messages
        (harmony/render.py). Otherwise `content` is the answer; a turn with no answer shows what
        the user saw of it (its commentary), and one that showed nothing stores "" so the history
        stays a valid request. Refused and unfinished calls are not kept (harmony/turn.py).
        """
        msg: dict[str, Any] = {"role": "assistant"}
        preambles = [p for p in self.preambles if p]
        if self.tool_calls:
            parts = [{"type": "text", "text": p} for p in preambles]
            msg["content"] = preambles[0] if len(preambles) == 1 else (parts or None)
        else:
            msg["content"] = self.final or "\n".join(preambles) or None
            if msg["content"] is None and not self.reasoning:
                msg["content"] = ""
        if self.reasoning:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


def harmony_ids(tokenizer: Any) -> HarmonyIds:
    return HarmonyIds(
        start=tokenizer.start,
        end=tokenizer.end,
        message=tokenizer.message,
        channel=tokenizer.channel,
        constrain=tokenizer.constrain,
        return_=tokenizer.return_,
        call=tokenizer.call,
        endoftext=tokenizer.special("<|endoftext|>"),
    )


def run_turn(
    model: Any,
    tokenizer: Any,
    prompt: Sequence[int],
    *,
    sampling: SamplingParams | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_context: int | None = None,
    on_event: Callable[[TurnEvent], None] | None = None,
    call_id_prefix: str = "call_",
    cache: list[Any] | None = None,
    on_prefilled: Callable[[], None] | None = None,
    functions: Collection[str] = (),
    constraint: Any = None,
) -> TurnResult:
    """Generate one assistant turn after a harmony `prompt` ending in `<|start|>assistant`.

    Stops on `<|return|>` (answer done), `<|call|>` (tool call) or `<|endoftext|>` (the third eos
    id of gpt-oss's generation_config), never on `<|end|>`, which the model writes between its
    analysis and its answer. With `cache`, `prompt` is only the part after what the cache holds
    (see `generate_tokens`).

    `functions` are the declared function names: only a call to `functions.NAME` for one of them
    is a tool call (finish reason "tool_calls"). A call to any other recipient is answered in the
    same cache with a tool message saying it is not available, and generation goes on (at most
    `harmony.turn.MAX_REFUSALS` times), all within `max_tokens` generated tokens in total.

    `constraint`: a `TokenConstraint` (engine/constraints) holding the turn to its grammar (which
    allows only declared functions, so no refusal segment follows).
    """
    ids = harmony_ids(tokenizer)
    turn = AssistantTurn(functions)
    stats = GenerationStats()
    emit = on_event or (lambda _e: None)
    cache = cache if cache is not None else model.make_cache()  # kept to continue after a refusal
    start = cache[0].offset if cache else 0
    limit = max_context or model.config.max_position_embeddings
    segment = list(prompt)
    tokens: list[int] = []  # every token after the prompt: generated, and refusals fed in
    generated = 0
    while True:
        parser = HarmonyStreamParser(tokenizer.decode_bytes, ids)
        handle = _event_handler(emit, turn.functions)
        part = GenerationStats()
        for token in generate_tokens(
            model,
            segment,
            max_tokens=max_tokens - generated,
            stop_ids=(ids.return_, ids.call, ids.endoftext),
            sampling=sampling,
            max_context=max_context,
            stats=part,
            cache=cache,
            on_prefilled=on_prefilled if not tokens else None,
            constraint=constraint if not tokens else None,
        ):
            tokens.append(token)
            handle(parser.feed(token))
        handle(parser.finish())
        generated += part.generation_tokens
        _add_stats(stats, part)
        call = turn.add(parser.messages, parser.stopped_by)
        if call is None:
            break
        # What was generated but not fed back (the `<|call|>` token) leads the next segment.
        held = cache[0].offset
        reply = turn.reply(call, tokenizer)
        segment = tokens[held - start - len(prompt) :] + reply
        if generated >= max_tokens or held + len(segment) >= limit:
            turn.out_of_room()
            break
        tokens += reply
    res = turn.result(id_prefix=call_id_prefix)
    return TurnResult(
        final=res.final,
        reasoning=res.reasoning,
        tool_calls=res.tool_calls,
        finish_reason=res.finish_reason,
        prompt_tokens=len(prompt),
        completion_tokens=generated,
        stats=stats,
        preambles=list(res.preambles),
        tokens=tokens,
        refused_calls=res.refused_calls,
        unfinished_calls=res.unfinished_calls,
    )


def _event_handler(
    emit: Callable[[TurnEvent], None], functions: Collection[str]
) -> Callable[[list], None]:
    """Turn one segment's parser events into TurnEvents; a call's text is never streamed."""
    kind = "final"

    def handle(events: list) -> None:
        nonlocal kind
        for ev in events:
            if isinstance(ev, MessageStart):
                kind = message_kind(ev)
            elif isinstance(ev, ContentDelta) and kind != "tool_call":
                emit(TurnEvent(kind, ev.text))
            elif isinstance(ev, MessageEnd) and message_kind(ev.message) == "tool_call":
                emit(_call_event(ev.message, functions))

    return handle


def _call_event(message: Message, functions: Collection[str]) -> TurnEvent:
    what = call_kind(message, functions)
    if what == CALL:
        name = function_name(message.recipient, functions)
        return TurnEvent("tool_call", tool_call={"name": name, "arguments": message.content})
    call = {"name": message.recipient, "arguments": message.content}
    return TurnEvent("refused_call" if what == REFUSED else "unfinished_call", tool_call=call)


def _add_stats(total: GenerationStats, part: GenerationStats) -> None:
    """Add one segment's figures to the turn's (the finish reason is the last segment's)."""
    total.prompt_tokens += part.prompt_tokens
    total.prompt_seconds += part.prompt_seconds
    total.generation_tokens += part.generation_tokens
    total.generation_seconds += part.generation_seconds
    total.peak_memory_bytes = max(total.peak_memory_bytes, part.peak_memory_bytes)
    total.finish_reason = part.finish_reason


class ChatSession:
    """A conversation with gpt-oss in harmony format.

    The history is kept in the OpenAI chat shape; each turn renders it with the harmony rules
    (a finished turn's reasoning is dropped, an open tool loop keeps it, stored answers end in
    `<|end|>`). Each turn is stored by `TurnResult.assistant_message`: a tool-call turn keeps
    its preamble, and only calls to the declared tools are ever stored, so whatever the model
    writes the history stays a valid request. The date in the system message is pinned when the
    session starts so every turn renders the same prefix.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        reasoning_effort: str = "medium",
        instructions: str | None = None,
        tools: Sequence[dict[str, Any]] = (),
        sampling: SamplingParams | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_context: int | None = None,
        date: str | None = None,
        reuse_cache: bool = True,
        response_format: Any = None,
        tool_choice: Any = None,
        max_reasoning_tokens: int | None = None,
        strict_tools: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.reasoning_effort = reasoning_effort
        self.instructions = instructions
        self.tools = list(tools)
        self.sampling = sampling or SamplingParams()
        self.max_tokens = max_tokens
        self.max_context = max_context
        self.date = date or _dt.date.today().isoformat()
        self.messages: list[dict[str, Any]] = []
        # Keeps the KV cache between turns so a turn prefills only its new tokens.
        self.prompt_cache = PromptCache(model) if reuse_cache else None
        self.turns = 0
        self.last: TurnResult | None = None
        # Structured outputs (engine/constraints): OpenAI's `response_format` and `tool_choice`
        # objects, the reasoning budget, and whether every tool's arguments follow its schema.
        self.response_format = response_format
        self.tool_choice = tool_choice
        self.max_reasoning_tokens = max_reasoning_tokens
        self.strict_tools = strict_tools
        # Validate tools, effort and the grammar now, not at the first turn.
        self.constraint_for(self.request())

    def request(self, messages: list[dict[str, Any]] | None = None) -> ChatRequest:
        """The conversation (plus pending `messages`) as a validated chat request."""
        if self.reasoning_effort not in EFFORTS:
            raise UsageError(f"reasoning effort must be one of {', '.join(EFFORTS)}")
        msgs = list(self.messages if messages is None else messages)
        if self.instructions:
            msgs.insert(0, {"role": "developer", "content": self.instructions})
        if not msgs:  # a request needs a message; validation of an empty session
            msgs = [{"role": "user", "content": ""}]
        return parse_chat_request(
            {
                "messages": msgs,
                "tools": self.tools,
                "reasoning_effort": self.reasoning_effort,
                "response_format": self.response_format,
                "tool_choice": self.tool_choice,
            }
        )

    def constraint_for(self, request: ChatRequest) -> Any:
        """A fresh TokenConstraint for a turn of `request`, or None when nothing constrains it;
        UsageError for a schema the grammar cannot enforce."""
        from .constraints import GrammarSpec, compile_grammar

        spec = GrammarSpec.of(
            request,
            strict_tools=self.strict_tools,
            max_reasoning_tokens=self.max_reasoning_tokens,
        )
        grammar = compile_grammar(spec, self.tokenizer, self.model.config.vocab_size)
        return grammar.constraint() if grammar is not None else None

    def pending_tool_calls(self) -> list[dict[str, Any]]:
        """Tool calls of the last assistant message that have no result yet."""
        answered = {m.get("tool_call_id") for m in self.messages if m.get("role") == "tool"}
        for m in reversed(self.messages):
            if m.get("role") == "assistant":
                return [c for c in m.get("tool_calls") or [] if c.get("id") not in answered]
            if m.get("role") == "user":
                return []
        return []

    def _run(
        self, new: list[dict[str, Any]], on_event: Callable[[TurnEvent], None] | None
    ) -> TurnResult:
        msgs = self.messages + new
        request = self.request(msgs)
        prompt = render_prompt(request, self.tokenizer, date=self.date)
        pc = self.prompt_cache
        reused = pc.prepare(prompt) if pc is not None else 0
        result = run_turn(
            self.model,
            self.tokenizer,
            prompt[reused:],
            sampling=self.sampling,
            max_tokens=self.max_tokens,
            max_context=self.max_context,
            on_event=on_event,
            call_id_prefix=f"call_{self.turns}_",
            cache=pc.cache if pc is not None else None,
            on_prefilled=(lambda: pc.checkpoint(prompt)) if pc is not None else None,
            functions=[t.name for t in request.tools],
            constraint=self.constraint_for(request),
        )
        if pc is not None:
            pc.record(result.tokens)
        result.prompt_tokens = len(prompt)
        result.reused_tokens = reused
        # Only a turn that ran to its end joins the history (Ctrl-C leaves it as it was).
        self.messages = msgs + [result.assistant_message()]
        self.turns += 1
        self.last = result
        return result

    def send(self, text: str, on_event: Callable[[TurnEvent], None] | None = None) -> TurnResult:
        """Add a user message and generate the assistant's turn."""
        return self._run([{"role": "user", "content": text}], on_event)

    def send_tool_results(
        self,
        results: Sequence[tuple[dict[str, Any], str]],
        on_event: Callable[[TurnEvent], None] | None = None,
    ) -> TurnResult:
        """Answer tool calls with `(call, result text)` pairs and let the model continue."""
        new = [
            {
                "role": "tool",
                "tool_call_id": call.get("id"),
                "name": call["function"]["name"],
                "content": content,
            }
            for call, content in results
        ]
        return self._run(new, on_event)

    def reset(self) -> None:
        if self.prompt_cache is not None:
            self.prompt_cache.reset()
        self.messages = []
        self.turns = 0
        self.last = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "gptoss-mlx-chat",
            "version": 1,
            "date": self.date,
            "reasoning_effort": self.reasoning_effort,
            "instructions": self.instructions,
            "tools": self.tools,
            "messages": self.messages,
        }

    def save(self, path: str | Path) -> None:
        """Write the conversation as JSON (atomically: a crash never leaves half a file)."""
        path = Path(path).expanduser()
        if not path.name or path.is_dir():  # ".", "/", "~", a folder: no file name to write
            raise UsageError(f"{path}: is a folder; save to a file name, e.g. {path / 'chat.json'}")
        try:
            # Encoded before any file exists: text UTF-8 cannot carry fails here, leaving nothing.
            data = json.dumps(self.to_json(), ensure_ascii=False, indent=1).encode("utf-8")
        except UnicodeEncodeError as e:
            raise UsageError(
                f"{path}: cannot save: the conversation holds text that is not valid UTF-8 "
                f"({e.object[e.start]!r}); /reset or /load another chat"
            ) from None
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_bytes(data)
            tmp.replace(path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise UsageError(f"{path}: cannot save ({e.strerror})") from None

    def load(self, path: str | Path) -> None:
        """Replace the conversation by one saved with `save` (or any chat request JSON)."""
        path = Path(path).expanduser()
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"{path}: not found") from None
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: absurd nesting
            raise UsageError(f"{path}: not a saved chat ({e})") from None
        if isinstance(obj, list):
            obj = {"messages": obj}
        if not isinstance(obj, dict):
            raise UsageError(f"{path}: not a saved chat (expected a JSON object)")
        messages = obj.get("messages")
        if not isinstance(messages, list):
            # Any other JSON object would replace the conversation by an empty one.
            raise UsageError(
                f'{path}: not a saved chat (no "messages" list); the conversation is unchanged'
            )
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # "\ud800" escapes decode to text UTF-8 cannot carry
            raise UsageError(
                f"{path}: contains an unpaired surrogate escape (\\ud800-\\udfff)"
            ) from None
        old = (self.messages, self.reasoning_effort, self.instructions, self.tools, self.date)
        self.messages = messages
        self.reasoning_effort = obj.get("reasoning_effort") or self.reasoning_effort
        self.instructions = obj.get("instructions", self.instructions)
        # A saved chat restores its own tools (even none); a bare message list keeps the current.
        self.tools = obj.get("tools", self.tools) or []
        self.date = obj.get("date") or self.date
        try:
            check_date(self.date)  # rendered only at the next turn: check it now
            self.request()
        except UsageError as e:
            self.messages, self.reasoning_effort, self.instructions, self.tools, self.date = old
            raise UsageError(f"{path}: {e}") from None
        self.turns = sum(1 for m in messages if m.get("role") == "assistant")
