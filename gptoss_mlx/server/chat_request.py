"""A Chat Completions request -> the harmony ChatRequest and the generation settings.

The messages go through harmony/request.py, the chat-request parser the CLI and batch use:
system/developer/user/assistant/tool messages, assistant `tool_calls`, and reasoning given back
under `reasoning_content`, `reasoning` or `thinking`, as well as `response_format` and
`tool_choice`. The renderer then applies harmony's rule to that reasoning (kept while a tool loop
is open, dropped after a final answer).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..harmony.request import ChatRequest, parse_chat_request
from .chat_types import CompletionCreateParams
from .errors import bad_request, unsupported
from .settings import check_service_tier, generation_spec, sampling_params
from .turn import GenerationSpec

MAX_STOPS = 4  # OpenAI's limit


@dataclass
class ChatCall:
    """A validated Chat Completions request, ready for the engine."""

    request: ChatRequest
    spec: GenerationSpec
    stream: bool
    include_usage: bool
    show_reasoning: bool


def build_chat_call(body: CompletionCreateParams, state) -> ChatCall:
    """Validate `body` against what we can honour and render its prompt (400s name the field)."""
    _refuse_unsupported(body)
    check_service_tier(body.service_tier)
    effort = _effort(body, state.default_effort)
    sampling = sampling_params(body.temperature, body.top_p, body.top_k, body.min_p, body.seed)
    if (
        body.max_tokens is not None
        and body.max_completion_tokens is not None
        and body.max_tokens != body.max_completion_tokens
    ):
        raise bad_request(
            "max_tokens: differs from max_completion_tokens; send one of them",
            param="max_tokens",
        )
    max_tokens = body.max_completion_tokens or body.max_tokens
    stops = _stops(body.stop)
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options: only allowed with stream: true", "stream_options")
    obj = {
        "messages": body.messages,
        "tools": body.tools,
        "reasoning_effort": effort,
        "response_format": body.response_format,
        "tool_choice": body.tool_choice,
    }
    request = parse_chat_request(obj)
    spec = generation_spec(
        request,
        state,
        max_tokens=max_tokens,
        sampling=sampling,
        stops=stops,
        max_reasoning_tokens=body.max_reasoning_tokens,
    )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    show_reasoning = not (body.reasoning is not None and body.reasoning.exclude)
    return ChatCall(request, spec, bool(body.stream), include_usage, show_reasoning)


def _refuse_unsupported(body: CompletionCreateParams) -> None:
    if body.n not in (None, 1):
        raise unsupported("n", f"only n=1 is supported (got {body.n}); send separate requests")
    if body.logprobs:
        raise unsupported("logprobs", "log probabilities are not returned by this server")
    if body.top_logprobs not in (None, 0):
        raise unsupported("top_logprobs", "log probabilities are not returned by this server")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            raise unsupported(name, "penalties are not implemented; leave it at 0")
    if body.logit_bias:
        raise unsupported("logit_bias", "logit biases are not implemented")
    if body.modalities not in (None, ["text"]):
        raise unsupported("modalities", "gpt-oss writes text only")
    if body.store:
        raise unsupported(
            "store", "chat completions are not stored; the Responses API stores responses"
        )
    r = body.reasoning
    if r is not None and r.max_tokens is not None:
        raise unsupported("reasoning.max_tokens", "use reasoning effort low/medium/high")
    if r is not None and r.enabled is False:
        raise unsupported("reasoning.enabled", "gpt-oss always reasons; use effort 'low'")


def _effort(body: CompletionCreateParams, default: str) -> str:
    nested = body.reasoning.effort if body.reasoning is not None else None
    if body.reasoning_effort is not None and nested is not None and nested != body.reasoning_effort:
        raise bad_request(
            "reasoning.effort: differs from reasoning_effort; send one of them", "reasoning.effort"
        )
    effort = body.reasoning_effort or nested or default
    if effort not in ("low", "medium", "high"):
        param = "reasoning_effort" if body.reasoning_effort is not None else "reasoning.effort"
        raise bad_request(f"{param}: expected one of low, medium, high, got {effort!r}", param)
    return effort


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOPS:
        raise bad_request(f"stop: at most {MAX_STOPS} sequences, got {len(stops)}", "stop")
    return tuple(s for s in stops if s)
