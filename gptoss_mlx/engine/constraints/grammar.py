"""One lark grammar per request, over the whole assistant turn as harmony writes it.

The prompt ends in `<|start|>assistant`; the grammar covers everything after it (control tokens
are tokens here, never their text):

    start     : pre answer
    pre       : (analysis | preamble)*              free reasoning, tool preambles
    analysis  : <|channel|> "analysis" <|message|> TEXT <|end|> <|start|> "assistant"
    answer    : final | call_0 | call_1 | ...
    final     : <|channel|> "final" CONSTRAIN? <|message|> body <|return|>
    call_i    : (" to=functions.NAME" <|channel|> "commentary"     the recipient in the role
              | <|channel|> "commentary to=functions.NAME")        ... or in the channel header
                CONSTRAIN? <|message|> args_i <|call|>
    CONSTRAIN : " "? <|constrain|> "json"                (harmony's docs show both spacings)

`body` is `%json{schema}` for a response format, free text otherwise; `args_i` is
`%json{parameters}` for a strict tool, free text for one that is not. Forcing the headers is the
point: a grammar that starts only after the reasoning lets the model skip `final` (SGLang #31019)
or slip out through `<|constrain|>` (vLLM #28000), and one that constrains from the first token
kills the reasoning (Ollama #11691).

JSON is compact (llguidance's `whitespace_flexible: false`): with flexible whitespace a model that
is unsure can emit spaces and tabs until max_tokens (measured with random logits on 8 small
bounded schemas: 3 ran to 400 tokens of whitespace; compact, all 8 closed within 47 tokens).
A schema's own "x-guidance" options win over that default.

A reasoning budget (`max_reasoning_tokens` = N) allows one analysis message of at most N tokens
of text (llguidance's `max_tokens` on the lexeme), after which the grammar closes it and moves
to the answer; N = 0 skips the analysis. Commentary preambles are not offered under a budget, so
the budget bounds everything written before the answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ...errors import UsageError
from ...harmony.request import ChatRequest, FunctionTool
from ...harmony.response_format import ResponseFormat, ToolChoice

COMPACT = {"whitespace_flexible": False}
# An arguments-less tool (parameters None) takes the empty object, as harmony renders `() => any`.
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
_TEXT = "TEXT: /(.|\\n)*/"


@dataclass(frozen=True)
class GrammarSpec:
    """What one request asks of the assistant turn; `needed` says whether a grammar is needed.

    `strict_tools`: constrain every tool's arguments to its parameters, not only the tools that
    say `strict: true` (the CLI's and server's --strict-tools).
    """

    response_format: ResponseFormat | None = None
    tools: tuple[FunctionTool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    strict_tools: bool = False
    max_reasoning_tokens: int | None = None

    @classmethod
    def of(
        cls,
        request: ChatRequest,
        *,
        strict_tools: bool = False,
        max_reasoning_tokens: int | None = None,
    ) -> GrammarSpec:
        """The spec of a parsed chat request plus the options that are not request fields."""
        return cls(
            response_format=request.response_format,
            tools=request.tools,
            tool_choice=request.tool_choice,
            strict_tools=strict_tools,
            max_reasoning_tokens=max_reasoning_tokens,
        )

    def callable_tools(self) -> tuple[FunctionTool, ...]:
        """The tools the answer may call under `tool_choice`."""
        mode = self.tool_choice.mode
        if mode == "none":
            return ()
        if mode == "function":
            return tuple(t for t in self.tools if t.name == self.tool_choice.name)
        return self.tools

    def is_strict(self, tool: FunctionTool) -> bool:
        return self.strict_tools or tool.strict

    @property
    def needed(self) -> bool:
        """Whether anything here constrains the turn (otherwise it runs free, as before)."""
        return (
            self.response_format is not None
            or self.max_reasoning_tokens is not None
            or self.tool_choice.mode in ("required", "function")
            or (self.tool_choice.mode == "none" and bool(self.tools))
            or any(self.is_strict(t) for t in self.callable_tools())
        )

    def check(self) -> None:
        """UsageError for a spec that allows no answer at all."""
        n = self.max_reasoning_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise UsageError(f"max_reasoning_tokens: expected an integer >= 0, got {n!r}")
        mode = self.tool_choice.mode
        if mode in ("required", "function") and not self.callable_tools():
            wanted = "a tool" if mode == "required" else f"the tool {self.tool_choice.name!r}"
            raise UsageError(f"tool_choice: {mode} needs {wanted} in 'tools'")


def with_compact_whitespace(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with llguidance's compact-JSON option, unless the schema sets it itself."""
    options = schema.get("x-guidance")
    options = {**COMPACT, **options} if isinstance(options, dict) else COMPACT
    return {**schema, "x-guidance": options}


def tool_schema(tool: FunctionTool) -> dict[str, Any]:
    """The schema a strict tool's arguments are held to."""
    return tool.parameters if tool.parameters is not None else NO_ARGUMENTS


def _json(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps(with_compact_whitespace(schema), ensure_ascii=False)


def build_lark(spec: GrammarSpec) -> str:
    """The lark grammar text of `spec` (see the module docstring)."""
    spec.check()
    lines: list[str] = []
    calls = spec.callable_tools()
    answers = [] if spec.tool_choice.mode in ("required", "function") else ["final"]
    answers += [f"call_{i}" for i in range(len(calls))]
    budget = spec.max_reasoning_tokens
    lines.append("start: pre answer" if budget != 0 else "start: answer")
    header_end = '<|end|> <|start|> "assistant"'
    if budget is None:
        lines.append("pre: (analysis | preamble)*" if calls else "pre: analysis*")
        lines.append(f'analysis: <|channel|> "analysis" <|message|> TEXT {header_end}')
        if calls:
            lines.append(f'preamble: <|channel|> "commentary" <|message|> TEXT {header_end}')
    elif budget > 0:
        lines.append("pre: analysis?")
        lines.append(f'analysis: <|channel|> "analysis" <|message|> thought {header_end}')
        lines.append(f"thought[max_tokens={budget}]: /(.|\\n)*/")
    lines.append("answer: " + " | ".join(answers))
    lines.append('constrain: " "? <|constrain|> "json"')
    if "final" in answers:
        fmt = spec.response_format
        body = _json(fmt.json_schema) if fmt is not None else "TEXT"
        lines.append('final: <|channel|> "final" constrain? <|message|> final_body <|return|>')
        lines.append(f"final_body: {body}")
    for i, tool in enumerate(calls):
        to = f"to=functions.{tool.name}"
        lines.append(
            f'call_{i}: (" {to}" <|channel|> "commentary" | <|channel|> "commentary {to}") '
            f"constrain? <|message|> args_{i} <|call|>"
        )
        lines.append(f"args_{i}: " + (_json(tool_schema(tool)) if spec.is_strict(tool) else "TEXT"))
    lines.append(_TEXT)
    return "\n".join(lines) + "\n"
