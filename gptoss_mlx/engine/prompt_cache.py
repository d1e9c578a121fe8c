"""Reusing the KV cache across chat turns, with checkpoints of the sliding-window state.

Why checkpoints: harmony drops a finished turn's reasoning from later prompts, so the next prompt
diverges from what the cache holds right after the previous `<|start|>assistant`. Full-attention
layers can simply be trimmed back to any position, but the sliding layers keep a 128-token
rotating window that cannot be rewound. So at the end of each rendered prompt we keep a copy of
every sliding layer's window (at most 128 tokens each) and, for the full layers, just the position
to trim back to (llama.cpp does the same with its SWA checkpoints). A new turn restores the latest
checkpoint inside the common prefix and prefills only the tokens after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache

# Each checkpoint costs sliding layers x 128 tokens x 2 x kv_heads x head_dim values (about 3 MB
# for gpt-oss-20b in bf16); a conversation rarely needs to go back more than a few turns.
MAX_CHECKPOINTS = 16


def _copy(a: mx.array | None) -> mx.array | None:
    # A new array object: the caches write into their buffers in place (slice assignment), which
    # must never reach a checkpoint's arrays.
    return None if a is None else mx.array(a)


def _window(c: RotatingKVCache, a: mx.array | None) -> mx.array | None:
    """What a sliding layer's buffer `a` holds that the next token can still attend to: its
    `keep` first tokens and the most recent ones, `min(offset, max_size)` in all, in temporal
    order, copied into an array of exactly that size.

    After a multi-token update mlx-lm keeps `max_size - 1 + S` tokens (so each of the S new ones
    sees a whole window); copying that buffer as it is would keep up to S - 1 dead tokens per layer
    per checkpoint (up to 191 tokens instead of 128 with 64-token chunks, 639 with 512-token
    ones), and a view of it would keep the whole buffer alive.
    """
    if a is None:
        return None
    a = c._temporal_order(a)  # mlx-lm's own unrolling of its ring buffer
    n = min(c.offset, c.max_size)
    if a.shape[2] > n:
        recent = a[..., a.shape[2] - (n - c.keep) :, :]
        a = mx.concatenate([a[..., : c.keep, :], recent], axis=2) if c.keep else recent
    return mx.array(a)  # a copy of its own: a slice would keep the whole buffer alive


def window_state(c: RotatingKVCache) -> tuple:
    """A sliding layer's checkpoint: (keys, values, offset, keep, max_size), its window copied
    (`_window`). Chat turns (PromptCache) and the server's prompt store (prompt_store.py) both
    keep these."""
    return (_window(c, c.keys), _window(c, c.values), c.offset, c.keep, c.max_size)


def restore_window(c: RotatingKVCache, state: tuple) -> None:
    """Put `window_state`'s checkpoint back into the sliding layer `c`."""
    # The window in temporal order: the next write goes after its last token.
    keys, values, offset, keep, max_size = state
    idx = 0 if keys is None else keys.shape[2]
    c.state = (_copy(keys), _copy(values), offset, keep, max_size, idx)


@dataclass
class Checkpoint:
    position: int  # tokens in the cache when it was taken
    # layer index -> (keys, values, offset, keep, max_size): the window, in temporal order
    rotating: dict[int, tuple]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PromptCache:
    """A model cache plus the tokens it holds and checkpoints to rewind to.

    Usage per turn: `reused = pc.prepare(prompt)` gives the number of prompt tokens already in the
    cache (the caller prefills `prompt[reused:]`), then `pc.checkpoint(prompt)` right after the
    prompt is prefilled, then `pc.record(tokens_fed)` once generation ends.
    """

    def __init__(self, model: Any):
        self.model = model
        self.cache: list[Any] = model.make_cache()
        self.tokens: list[int] = []
        self.checkpoints: list[Checkpoint] = []

    def reset(self) -> None:
        self.cache = self.model.make_cache()
        self.tokens = []
        self.checkpoints = []

    def _offsets(self) -> list[int]:
        return [c.offset for c in self.cache]

    def prepare(self, prompt: Sequence[int]) -> int:
        """Make the cache hold a prefix of `prompt` (as long as possible, shorter than the prompt
        so at least one token is left to prefill) and return its length."""
        # After an interrupted step (Ctrl-C between layers) the layers' positions can disagree
        # with each other and with `tokens`; then only a checkpoint can make them consistent.
        consistent = all(o == len(self.tokens) for o in self._offsets())
        limit = min(common_prefix(prompt, self.tokens), len(prompt) - 1)
        if consistent and limit == len(self.tokens):
            return limit  # the cache holds a prefix of the prompt: just continue
        while self.checkpoints and self.checkpoints[-1].position > limit:
            self.checkpoints.pop()
        if not self.checkpoints:
            self.reset()
            return 0
        self._restore(self.checkpoints[-1])
        return self.checkpoints[-1].position

    def _restore(self, cp: Checkpoint) -> None:
        for i, c in enumerate(self.cache):
            if isinstance(c, RotatingKVCache):
                restore_window(c, cp.rotating[i])
            elif isinstance(c, KVCache):
                # Entries past the position are simply overwritten by the next tokens.
                c.offset = cp.position
            else:
                raise TypeError(f"cannot rewind a {type(c).__name__}")
        self.tokens = self.tokens[: cp.position]

    def checkpoint(self, prompt: Sequence[int]) -> None:
        """Remember the state after `prompt` has been prefilled."""
        position = len(prompt)
        assert all(o == position for o in self._offsets()), "checkpoint after prefill only"
        rotating = {
            i: window_state(c) for i, c in enumerate(self.cache) if isinstance(c, RotatingKVCache)
        }
        mx.eval([a for st in rotating.values() for a in st[:2] if a is not None])
        self.tokens = list(prompt)
        if self.checkpoints and self.checkpoints[-1].position >= position:
            self.checkpoints = [c for c in self.checkpoints if c.position < position]
        self.checkpoints.append(Checkpoint(position, rotating))
        del self.checkpoints[:-MAX_CHECKPOINTS]

    def record(self, generated: Sequence[int]) -> None:
        """Note the generated tokens that were fed into the cache (all but usually the last)."""
        held = min(self._offsets())
        self.tokens = (self.tokens + list(generated))[:held]

    @property
    def nbytes(self) -> int:
        total = sum(getattr(c, "nbytes", 0) for c in self.cache)
        for cp in self.checkpoints:
            total += sum(a.nbytes for st in cp.rotating.values() for a in st[:2] if a is not None)
        return total
