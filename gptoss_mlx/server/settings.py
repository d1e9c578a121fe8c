"""Generation settings both APIs share: sampling, structured outputs, and the prompt rendered for
the engine.

Structured outputs are the library's (engine/constraints): `response_format` / `text.format`
(JSON schema or any JSON object), `tool_choice` ("none", "required", a named function) and
`strict` function tools become one llguidance grammar over the whole harmony turn, compiled once
per request shape (an LRU of grammars) and started as a fresh `TokenConstraint` for each
generation. A schema llguidance cannot enforce is a 400 naming it: a request never runs
unconstrained by accident.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ..engine.generate import SamplingParams
from ..harmony.render import render_prompt
from ..harmony.request import ChatRequest
from .errors import unsupported
from .turn import GenerationSpec

# gpt-oss's card recommends temperature 1.0, top_p 1.0: the defaults of OpenAI's API too.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
SERVICE_TIERS = (None, "auto", "default")


class GrammarCache(OrderedDict):
    """compile_grammar's cache (grammar text -> Grammar), least recently used out: clients that
    send a new schema with every request must not grow the server without bound."""

    def __init__(self, max_entries: int = 64):
        super().__init__()
        self.max_entries = max_entries

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.max_entries:
            self.popitem(last=False)


def grammar_for(request: ChatRequest, state, max_reasoning_tokens: int | None = None) -> Any:
    """The compiled grammar that holds `request`'s turn to its format, tool choice and reasoning
    budget, or None when nothing constrains it; UsageError (400) naming what cannot be enforced."""
    from ..engine.constraints import GrammarSpec, compile_grammar

    spec = GrammarSpec.of(
        request, strict_tools=state.strict_tools, max_reasoning_tokens=max_reasoning_tokens
    )
    return compile_grammar(spec, state.tokenizer, state.vocab_size, cache=state.grammars)


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
    state,
    *,
    max_tokens: int | None,
    sampling: SamplingParams,
    stops: tuple[str, ...] = (),
    max_reasoning_tokens: int | None = None,
) -> GenerationSpec:
    """Render `request`, compile its grammar (if any), and size the budget: `max_tokens`, or the
    room the context leaves. A prompt that does not fit is left for the scheduler to refuse
    (ContextLengthExceeded -> 400 context_length_exceeded)."""
    grammar = grammar_for(request, state, max_reasoning_tokens)
    prompt = render_prompt(request, state.tokenizer)
    room = max(1, state.max_context - len(prompt))
    budget = room if max_tokens is None else min(max_tokens, room)
    return GenerationSpec(
        prompt=prompt,
        max_tokens=budget,
        sampling=sampling,
        max_context=state.max_context,
        functions=tuple(t.name for t in request.tools),
        stops=stops,
        grammar=grammar,
    )
