"""Generation settings both APIs share: sampling, tool_choice, structured outputs, and the
prompt rendered for the engine.

Every value we cannot honour is refused with a 400 naming the field. Two hooks wait for the
structured-outputs issue (13): `tool_choice` "required" or a named function, and a JSON
`response_format` / `text.format`. Both need constrained decoding (a per-sequence token constraint
passed to the scheduler as `GenerationRequest.constraint`); until it exists they are refused here,
in `structured_constraint`, the one place to plug it in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engine.generate import SamplingParams
from ..harmony.render import render_prompt
from ..harmony.request import ChatRequest
from .errors import APIError, bad_request, unsupported
from .turn import GenerationSpec

# gpt-oss's card recommends temperature 1.0, top_p 1.0: the defaults of OpenAI's API too.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
SERVICE_TIERS = (None, "auto", "default")


@dataclass(frozen=True)
class ToolChoice:
    """`mode`: "auto" (the model decides), "none" (no calls: tools are left out of the prompt),
    "required" or "function" (issue 13: constrained decoding; `name` for "function")."""

    mode: str = "auto"
    name: str | None = None


def parse_tool_choice(value: Any, param: str = "tool_choice") -> ToolChoice:
    if value is None or value == "auto":
        return ToolChoice("auto")
    if value == "none":
        return ToolChoice("none")
    if value == "required":
        return ToolChoice("required")
    if isinstance(value, dict):
        kind = value.get("type")
        # Chat: {"type": "function", "function": {"name": ...}}; Responses: {"type", "name"}.
        fn = value.get("function") if isinstance(value.get("function"), dict) else value
        if kind == "function" and isinstance(fn.get("name"), str):
            return ToolChoice("function", fn["name"])
        raise bad_request(
            f'{param}: expected "auto", "none", "required" or '
            '{"type": "function", ...} naming a function',
            param=param,
        )
    raise bad_request(
        f'{param}: expected "auto", "none", "required" or a named function, got {value!r}',
        param=param,
    )


def structured_constraint(
    tool_choice: ToolChoice, response_format: dict[str, Any] | None, format_param: str
) -> Any:
    """The token constraint for forced tool calls or JSON answers (issue 13); None without one.

    Refused until constrained decoding lands: answering these without it would be a silent
    fallback (a free-form answer where the client was promised JSON or a call)."""
    if tool_choice.mode in ("required", "function"):
        what = (
            "required" if tool_choice.mode == "required" else f"the function {tool_choice.name!r}"
        )
        raise APIError(
            400,
            f"tool_choice: forcing {what} needs structured outputs (constrained decoding), which "
            'this server does not have yet; use "auto"',
            param="tool_choice",
            code="unsupported_value",
        )
    kind = (response_format or {}).get("type", "text")
    if kind != "text":
        raise APIError(
            400,
            f"{format_param}: {kind!r} needs structured outputs (constrained decoding), which this "
            "server does not have yet; ask for JSON in the instructions instead",
            param=format_param,
            code="unsupported_value",
        )
    return None


def sampling_params(
    temperature: float | None,
    top_p: float | None,
    top_k: int | None = None,
    min_p: float | None = None,
    seed: int | None = None,
) -> SamplingParams:
    """SamplingParams from request fields (None: the default), validated: UsageError naming the
    field (`temperature: must be in [0, 100]...`), which the error handler turns into a 400."""
    params = SamplingParams(
        temperature=DEFAULT_TEMPERATURE if temperature is None else temperature,
        top_p=DEFAULT_TOP_P if top_p is None else top_p,
        top_k=0 if top_k is None else top_k,
        min_p=0.0 if min_p is None else min_p,
        seed=seed,
    )
    params.validate()
    return params


def check_service_tier(value: str | None) -> None:
    if value not in SERVICE_TIERS:
        raise unsupported("service_tier", f"{value!r} is not offered here (one tier: 'default')")


def generation_spec(
    request: ChatRequest,
    tokenizer: Any,
    *,
    max_context: int,
    max_tokens: int | None,
    sampling: SamplingParams,
    tool_choice: ToolChoice,
    stops: tuple[str, ...] = (),
) -> GenerationSpec:
    """Render `request` (without its tools when tool_choice is "none": the model is not offered
    them, and a call it makes anyway is refused inside the turn) and size the budget:
    `max_tokens`, or the room the context leaves. A prompt that does not fit is left for the
    scheduler to refuse (ContextLengthExceeded -> 400 context_length_exceeded)."""
    if tool_choice.mode == "none":
        request = ChatRequest(request.messages, (), request.reasoning_effort, request.extra)
    prompt = render_prompt(request, tokenizer)
    room = max(1, max_context - len(prompt))
    budget = room if max_tokens is None else min(max_tokens, room)
    return GenerationSpec(
        prompt=prompt,
        max_tokens=budget,
        sampling=sampling,
        max_context=max_context,
        functions=tuple(t.name for t in request.tools),
        stops=stops,
    )
