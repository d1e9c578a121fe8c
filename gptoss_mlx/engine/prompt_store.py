"""The prompt cache across requests: the KV state at the end of recent prompts, restored for a
later prompt that starts the same way, so only the rest is prefilled.

Why at the prompt's end: a server's clients resend the whole conversation every turn, and
harmony drops a finished turn's reasoning from later prompts, so turn N+1 does not start with
turn N's prompt plus its answer, but it does start with turn N's prompt. Keeping the state
taken right after a prompt's prefill (before sampling) therefore makes turn N+1 prefill about
its new tokens only (llama.cpp's "prompt cache" with `--ctx-checkpoints` does the same).

What is kept, per conversation (an entry): the full-attention layers' keys and values for its
latest prompt, and at each prompt end a checkpoint: the sliding layers' windows
(prompt_cache.window_state, the mechanism chat turns use) and the logits of the prompt's last
token, so that an exact repeat (a regenerated answer) needs no forward pass at all. One more
checkpoint, without logits, marks where the prompt's last message starts: another prompt that
shares everything before it (a new conversation with the same tools and instructions, an edited
last message) restores that much. A prompt that extends an entry's prompt replaces the entry,
inheriting its checkpoints: a conversation costs one entry that grows with it, not one per turn.
Entries are evicted least recently used first, to stay within `max_bytes`.

Why not mlx-lm's LRUPromptCache: it restores a whole cache and trims it, which a sliding window
that has wrapped cannot do, so with gpt-oss's 128-token windows it could reuse only an entry whose
tokens are all a prefix of the prompt; an exact repeat would then need the last prompt token
re-run, which a wrapped window cannot do either.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, RotatingKVCache

from .generate import default_prefill_chunk, prefill
from .prompt_cache import MAX_CHECKPOINTS, restore_window, window_state


@dataclass
class _Checkpoint:
    position: int  # prompt tokens before it
    rotating: dict[int, tuple]  # sliding layer index -> window_state()
    # [vocab]: the logits of the token at position - 1, kept at a prompt's end (for an exact
    # repeat), not at a message start
    logits: mx.array | None

    @property
    def nbytes(self) -> int:
        windows = sum(a.nbytes for st in self.rotating.values() for a in st[:2] if a is not None)
        return windows + (self.logits.nbytes if self.logits is not None else 0)


@dataclass
class _Entry:
    tokens: np.ndarray  # the latest prompt
    full: dict[int, tuple[mx.array, mx.array]]  # full layer index -> keys, values [1, H, >=n, D]
    checkpoints: list[_Checkpoint] = field(default_factory=list)  # by position, ascending

    @property
    def nbytes(self) -> int:
        kv = sum(k.nbytes + v.nbytes for k, v in self.full.values())
        return kv + sum(cp.nbytes for cp in self.checkpoints)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class PromptStore:
    """KV snapshots of recent prompts' ends, LRU-bounded by bytes; used by one thread.
    `message_start`: the id that opens a message (harmony's `<|start|>`), for the checkpoint at
    the last message's start; None takes none.

    `prefill(model, prompt)` is what `BatchEngine` calls instead of a plain prefill when it has a
    store: it restores the longest cached prefix, prefills the rest, keeps the new prompt's end,
    and returns `(cache, last logits, cached tokens)`.
    """

    def __init__(self, max_bytes: int, message_start: int | None = None):
        self.max_bytes = max_bytes
        self.message_start = message_start
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._next_key = 0
        self.nbytes = 0
        # Figures since creation, for logs and tests.
        self.lookups = 0
        self.hits = 0
        self.cached_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def prefill(self, model: Any, prompt: Sequence[int]) -> tuple[list[Any], mx.array, int]:
        """A single-sequence cache holding `prompt`, the logits of its last token, and how many
        of its tokens came from the store rather than a prefill."""
        tokens = np.asarray(prompt, dtype=np.int64)
        self.lookups += 1
        found = self._lookup(tokens)
        cache = model.make_cache()
        if found is None:
            key, entry, cp, position = None, None, None, 0
        else:
            key, entry, cp = found
            position = cp.position
            self._restore(cache, entry, cp)
            self._entries.move_to_end(key)
            self.hits += 1
            self.cached_tokens += position
        if position == len(tokens):
            return cache, cp.logits, position  # the same prompt again: nothing to run
        extends = entry is not None and position == len(entry.tokens)
        # This prompt extends the entry's: the new entry takes its place and its checkpoints.
        checkpoints = list(entry.checkpoints) if extends else []
        boundary = self._last_message_start(tokens, position)
        if boundary:
            _feed(model, tokens[position:boundary].tolist(), cache)
            checkpoints.append(_snapshot(cache, boundary, None))
            position = boundary
        logits = prefill(model, tokens[position:].tolist(), cache)
        checkpoints.append(_snapshot(cache, len(tokens), logits))
        full = {i: (c.keys, c.values) for i, c in enumerate(cache) if type(c) is KVCache}
        self._insert(_Entry(tokens, full, checkpoints[-MAX_CHECKPOINTS:]), key if extends else None)
        return cache, logits, cp.position if cp is not None else 0

    def _last_message_start(self, tokens: np.ndarray, position: int) -> int:
        """Where the prompt's last message starts (before the closing `<|start|>assistant`), if
        that is past `position`, else 0. A checkpoint there serves another prompt that shares
        everything before that message: a new conversation with the same system and developer
        messages (agents resend thousands of tokens of tools), an edited or regenerated last
        message, or the same tool call answered differently."""
        if self.message_start is None:
            return 0
        starts = np.flatnonzero(tokens[: len(tokens) - 2] == self.message_start)
        return int(starts[-1]) if starts.size and starts[-1] > position else 0

    def _lookup(self, tokens: np.ndarray) -> tuple[int, _Entry, _Checkpoint] | None:
        """The entry and checkpoint covering the most of `tokens` (the most recent on a tie)."""
        best = None
        for key, entry in reversed(self._entries.items()):
            common = _common_prefix(entry.tokens, tokens)
            # A checkpoint without logits (a message start) needs a token after it to run.
            usable = (
                c
                for c in reversed(entry.checkpoints)
                if c.position < len(tokens) or (c.position == len(tokens) and c.logits is not None)
            )
            cp = next((c for c in usable if c.position <= common), None)
            if cp is not None and (best is None or cp.position > best[2].position):
                best = (key, entry, cp)
        return best

    @staticmethod
    def _restore(cache: list[Any], entry: _Entry, cp: _Checkpoint) -> None:
        n = cp.position
        for i, c in enumerate(cache):
            if type(c) is RotatingKVCache:
                restore_window(c, cp.rotating[i])
            elif type(c) is KVCache:
                # A slice: the next update copies it into a new buffer, never writing into ours.
                keys, values = entry.full[i]
                c.keys, c.values, c.offset = keys[..., :n, :], values[..., :n, :], n
            else:
                raise TypeError(f"the prompt store cannot restore a {type(c).__name__}")

    def _insert(self, entry: _Entry, replaces: int | None) -> None:
        size = entry.nbytes
        if size > self.max_bytes:
            return  # larger than the whole budget: keep what is there instead
        if replaces is not None:
            self.nbytes -= self._entries.pop(replaces).nbytes
        self._entries[self._next_key] = entry
        self._next_key += 1
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes


def _snapshot(cache: list[Any], position: int, logits: mx.array | None) -> _Checkpoint:
    """The checkpoint of `cache` right after `position` tokens were prefilled."""
    rotating = {i: window_state(c) for i, c in enumerate(cache) if type(c) is RotatingKVCache}
    cp = _Checkpoint(position, rotating, logits)
    mx.eval(
        [logits] if logits is not None else [],
        [a for st in rotating.values() for a in st[:2] if a is not None],
    )
    return cp


def _feed(model: Any, tokens: list[int], cache: list[Any]) -> None:
    """Run `tokens` into `cache` without the vocabulary projection (`prefill` without its
    logits: on a CPU that projection costs as much as a whole decode step)."""
    chunk = default_prefill_chunk()
    ids = mx.array(tokens, dtype=mx.uint32)[None]
    for start in range(0, len(tokens), chunk):
        model.hidden(ids[:, start : start + chunk], cache)
        mx.eval([c.state for c in cache])
