"""Scripted models and harmony helpers for chat tests (imported like `conftest`).

The scripted models force greedy decoding to write exactly the harmony completion a test gives,
and record every prompt they are asked to continue, so tests can check what the conversation
history looks like to the model after each turn. `ScriptedModel` plays one script per turn, in
order; `TableModel` looks the completion up by prompt and also runs under `BatchEngine`.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from gptoss_mlx.engine.chat import ChatSession
from gptoss_mlx.engine.generate import SamplingParams
from gptoss_mlx.harmony.tokenizer import find_default_vocab, load_default_tokenizer, load_tokenizer

DATE = "2025-03-04"
GREEDY = SamplingParams(temperature=0.0)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def make_tokenizer(tmp_dir: Path):
    """The real o200k_harmony tokenizer if its vocabulary is here, else a synthetic one."""
    if find_default_vocab() is not None:
        return load_default_tokenizer()
    from gptoss_mlx.convert.synthetic import write_byte_level_tokenizer_json

    write_byte_level_tokenizer_json(tmp_dir / "tokenizer.json")
    return load_tokenizer(tmp_dir)


def ids(tok, *parts: str) -> list[int]:
    """Harmony text as the model writes it: `<|name|>` parts are control tokens, others text."""
    out: list[int] = []
    for p in parts:
        out += [tok.special(p)] if p.startswith("<|") and p.endswith("|>") else tok.encode(p)
    return out


def final_answer(tok, analysis: str, answer: str) -> list[int]:
    """`<|channel|>analysis<|message|>{analysis}<|end|><|start|>assistant<|channel|>final...`"""
    return ids(
        tok,
        "<|channel|>", "analysis", "<|message|>", analysis, "<|end|>",
        "<|start|>", "assistant", "<|channel|>", "final", "<|message|>", answer, "<|return|>",
    )  # fmt: skip


def tool_call(tok, analysis: str, name: str, arguments: str) -> list[int]:
    """Analysis, then `<|start|>assistant to=functions.{name}<|channel|>commentary <|constrain|>
    json<|message|>{arguments}<|call|>`."""
    return ids(
        tok,
        "<|channel|>", "analysis", "<|message|>", analysis, "<|end|>",
        "<|start|>", "assistant", f" to=functions.{name}", "<|channel|>", "commentary ",
        "<|constrain|>", "json", "<|message|>", arguments, "<|call|>",
    )  # fmt: skip


def message_ids(tok, author: str, channel: str, content: str, recipient: str | None = None):
    """A rendered prompt message, split into pieces where the renderer splits them."""
    parts = ["<|start|>", author] + ([f" to={recipient}"] if recipient else [])
    return ids(tok, *parts, "<|channel|>", channel, "<|message|>", content, "<|end|>")


def contains(seq: list[int], sub: list[int]) -> bool:
    n = len(sub)
    return any(seq[i : i + n] == sub for i in range(len(seq) - n + 1))


class TokenCache(KVCache):
    """An mlx-lm KVCache that holds the token ids fed to it instead of keys and values, so the
    session's cache reuse can trim it back (setting `offset`) like a real one."""

    def __init__(self):
        self.tokens: list[int] = []
        super().__init__()

    @property
    def offset(self) -> int:
        return len(self.tokens)

    @offset.setter
    def offset(self, value: int) -> None:
        assert value <= len(self.tokens), "a cache can be trimmed, not grown by hand"
        del self.tokens[value:]

    @property
    def state(self) -> mx.array:
        return mx.array(self.tokens or [0])


class ScriptedModel:
    """A model whose greedy output is a script of token ids, one script per turn.

    A call with `last_only=True` (the engine's prefill) starts the next script and records the
    whole prompt the cache has seen in `prompts`. Each decode call checks it is fed the token the
    script just produced. `interrupt_at=(turn, step)` raises KeyboardInterrupt at that step.
    """

    def __init__(self, vocab_size: int, scripts: list[list[int]], interrupt_at=None):
        self.vocab_size = vocab_size
        self.scripts = list(scripts)
        self.prompts: list[list[int]] = []
        self.config = SimpleNamespace(max_position_embeddings=131072, vocab_size=vocab_size)
        self.interrupt_at = interrupt_at
        self._script: list[int] = []
        self._step = 0

    def make_cache(self) -> list[TokenCache]:
        return [TokenCache()]

    def hidden(self, tokens: mx.array, cache=None) -> mx.array:
        if cache is not None:
            cache[0].tokens += tokens[0].tolist()
        return mx.zeros((1, tokens.shape[1], 1))

    def __call__(self, tokens: mx.array, cache=None, last_only: bool = False) -> mx.array:
        self.hidden(tokens, cache)
        if last_only:
            assert self.scripts, "the model was asked for more turns than scripted"
            self.prompts.append(list(cache[0].tokens))
            self._script, self._step = self.scripts.pop(0), 0
        else:
            fed = tokens[0, -1].item()
            assert fed == self._script[self._step - 1], "the engine fed back another token"
        if self.interrupt_at == (len(self.prompts) - 1, self._step):
            raise KeyboardInterrupt
        assert self._step < len(self._script), "the engine went past the end of the script"
        target = self._script[self._step]
        self._step += 1
        hot = mx.arange(self.vocab_size) == target
        return mx.where(hot, 30.0, 0.0)[None, None, :]


class TableModel:
    """Greedy output looked up in `scripts`: {prompt ids (tuple): completion ids}.

    The token ids themselves are kept in real mlx-lm caches (as one-dimensional keys), so at every
    step the model reads each row's whole history, finds the longest scripted prompt it starts
    with, and puts all the probability on the next token of that prompt's completion. That works
    alike for one sequence (`generate_tokens`, `run_turn`), a `PromptCache`, and `BatchEngine`'s
    left-padded, merged and filtered batch caches. `prompts` records every prompt it was
    prefilled with, in order; a history that no script covers fails the test.
    """

    def __init__(self, vocab_size: int, scripts: dict[tuple[int, ...], list[int]]):
        self.vocab_size = vocab_size
        self.scripts = {tuple(p): list(c) for p, c in scripts.items()}
        self.prompts: list[list[int]] = []
        self.config = SimpleNamespace(max_position_embeddings=131072, vocab_size=vocab_size)

    def make_cache(self) -> list[KVCache]:
        return [KVCache()]

    def _store(self, tokens: mx.array, cache: list) -> list[list[int]]:
        """Append `tokens` [B, T] to the cache; return each row's whole history."""
        ids = tokens.astype(mx.float32)[:, None, :, None]  # (B, 1 head, T, 1): exact below 2**24
        keys, _ = cache[0].update_and_fetch(ids, ids)
        rows = keys[:, 0, :, 0].astype(mx.int32).tolist()
        if isinstance(cache[0], BatchKVCache):
            pads = cache[0].left_padding.tolist()
            return [row[pad:] for row, pad in zip(rows, pads, strict=True)]
        return rows

    def hidden(self, tokens: mx.array, cache=None) -> mx.array:
        self._store(tokens, cache)
        return mx.zeros((tokens.shape[0], tokens.shape[1], 1))

    def __call__(self, tokens: mx.array, cache=None, last_only: bool = False) -> mx.array:
        histories = self._store(tokens, cache)
        if last_only:
            self.prompts.extend(histories)
        rows = [self._next(h) for h in histories]
        hot = mx.arange(self.vocab_size)[None, :] == mx.array(rows)[:, None]
        return mx.where(hot, 30.0, 0.0)[:, None, :]  # (B, 1, vocab): the last position's logits

    def _next(self, history: list[int]) -> int:
        best = max(
            (p for p in self.scripts if tuple(history[: len(p)]) == p),
            key=len,
            default=None,
        )
        assert best is not None, f"no script for a history of {len(history)} tokens"
        step = len(history) - len(best)
        script = self.scripts[best]
        # Past the end: the row the batch engine has already launched after a stop token (its
        # output is thrown away). Anything will do.
        return script[step] if step < len(script) else 0


def session(tok, scripts, **kw) -> tuple[ChatSession, ScriptedModel]:
    model = ScriptedModel(tok.vocab_size, scripts, interrupt_at=kw.pop("interrupt_at", None))
    kw.setdefault("sampling", GREEDY)
    kw.setdefault("date", DATE)
    return ChatSession(model, tok, **kw), model
