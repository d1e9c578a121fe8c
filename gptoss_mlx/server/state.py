"""What the routes share: the engine's scheduler, the tokenizer, the served model's ids, the
response store and the limits. One `ServerState` per app (`app.state.server`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .errors import APIError
from .response_store import ResponseStore
from .settings import GrammarCache


def model_aliases(model_id: str) -> tuple[str, ...]:
    """The spellings a client may use for the served model: the id itself and, for
    `gpt-oss-20b`, Ollama's `gpt-oss:20b` and the hub's `openai/gpt-oss-20b`."""
    names = [model_id]
    if model_id.startswith("gpt-oss-"):
        size = model_id.removeprefix("gpt-oss-")
        names += [f"gpt-oss:{size}", f"openai/gpt-oss-{size}"]
    return tuple(names)


@dataclass
class ServerState:
    """Args:
    scheduler: the engine's Scheduler (engine/scheduler.py), already started.
    tokenizer: the model's harmony tokenizer.
    model_id: the id /v1/models lists (e.g. "gpt-oss-20b").
    max_context: the context limit the scheduler enforces (prompt + generated tokens).
    vocab_size: the model's vocabulary size (structured outputs' grammars mask its logits).
    api_key: the key every endpoint but /health needs (None: no key).
    default_effort: the reasoning effort of requests that do not set one.
    strict_tools: hold every function call's arguments to its schema, not only `strict` tools.
    """

    scheduler: Any
    tokenizer: Any
    model_id: str
    max_context: int
    vocab_size: int
    api_key: str | None = None
    default_effort: str = "medium"
    strict_tools: bool = False
    store: ResponseStore = field(default_factory=ResponseStore)
    grammars: GrammarCache = field(default_factory=GrammarCache)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def aliases(self) -> tuple[str, ...]:
        return model_aliases(self.model_id)

    def check_model(self, name: Any) -> str:
        """The served id for a request's `model` field; 404 naming the served ids otherwise.

        Only compared with the served spellings (case-insensitively): never opened as a path
        or a repo id, so a request cannot make the server load or read anything."""
        if isinstance(name, str) and name.strip().lower() in {a.lower() for a in self.aliases}:
            return self.model_id
        shown = name if isinstance(name, str) and len(name) <= 200 else "(given)"
        raise APIError(
            404,
            f"model: {shown!r} is not served here; this server serves "
            + ", ".join(repr(a) for a in self.aliases),
            param="model",
            code="model_not_found",
        )
