"""The cross-request prompt store (engine/prompt_store.py): a prompt that starts with a stored
prompt prefills only the rest, and the last logits equal a fresh prefill's; a conversation is one
entry that grows; a prompt sharing only the messages before another's last one restores those;
entries are evicted least recently used first, within a byte budget that is checked against
sizes computed from the shapes.

The model's sliding window (8 tokens) is far shorter than the prompts, so every restore goes
through wrapped windows.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_tiny_config
from gptoss_mlx.convert.synthetic import random_model
from gptoss_mlx.engine.generate import prefill
from gptoss_mlx.engine.prompt_store import PromptStore
from gptoss_mlx.model.config import FULL

VOCAB = 1024
WINDOW = 8
UNLIMITED = 1 << 40
# Stand-ins for harmony's `<|start|>` and `assistant`: `ids` never draws them.
START, ASSISTANT = 1000, 1001


@pytest.fixture(scope="module")
def model():
    cfg = make_tiny_config(num_hidden_layers=4, sliding_window=WINDOW, vocab_size=VOCAB)
    return random_model(cfg, 3)


class Counter:
    """Counts the prompt tokens the model is run on."""

    def __init__(self, model):
        self.model, self.config, self.tokens = model, model.config, 0

    def make_cache(self):
        return self.model.make_cache()

    def hidden(self, tokens, cache=None):
        self.tokens += tokens.shape[1]
        return self.model.hidden(tokens, cache)

    def __call__(self, tokens, cache=None, last_only=False):
        self.tokens += tokens.shape[1]
        return self.model(tokens, cache=cache, last_only=last_only)


def ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, START, n).tolist()


def fresh(model, prompt) -> mx.array:
    return prefill(model, prompt, model.make_cache())


def close(a, b) -> bool:
    return mx.abs(a - b).max().item() <= 1e-5 * max(1.0, mx.abs(b).max().item())


def run(store: PromptStore, counter: Counter, prompt) -> tuple[int, int, mx.array, list]:
    """(cached tokens, tokens run, last logits, cache) for one prompt through the store."""
    before = counter.tokens
    cache, logits, cached = store.prefill(counter, prompt)
    mx.eval(logits)
    return cached, counter.tokens - before, logits, cache


def test_turns_prefill_only_their_new_tokens(model):
    store, counter = PromptStore(UNLIMITED), Counter(model)
    p1 = ids(40, 0)
    assert run(store, counter, p1)[:2] == (0, 40)
    # Turn 2: turn 1's prompt, its answer without the dropped reasoning, a new user message.
    p2 = p1 + ids(12, 1) + ids(9, 2)
    cached, ran, logits, _ = run(store, counter, p2)
    assert (cached, ran) == (len(p1), 21)
    assert close(logits, fresh(model, p2))
    p3 = p2 + ids(15, 3)
    cached, ran, logits, cache = run(store, counter, p3)
    assert (cached, ran) == (len(p2), 15)
    assert close(logits, fresh(model, p3))
    assert len(store) == 1  # one conversation, one entry: each turn took the previous one's place
    # The restored cache continues like a fresh one: decode a token on both.
    ref = model.make_cache()
    prefill(model, p3, ref)
    step = mx.array([[5]])
    assert close(model(step, cache=cache)[0, -1], model(step, cache=ref)[0, -1])


def test_a_branch_restores_an_earlier_prompt_end(model):
    store, counter = PromptStore(UNLIMITED), Counter(model)
    p1 = ids(30, 10)
    p2 = p1 + ids(25, 11)  # an open tool loop: reasoning and call kept
    run(store, counter, p1)
    run(store, counter, p2)
    # The loop is over: its reasoning (inside p2) is dropped, so p3 leaves p2 early.
    p3 = p1 + ids(5, 12) + ids(20, 13)
    cached, ran, logits, _ = run(store, counter, p3)
    assert (cached, ran) == (len(p1), 25)
    assert close(logits, fresh(model, p3))
    assert len(store) == 2  # p2's entry still serves its own continuations
    assert run(store, counter, p2 + ids(3, 14))[:2] == (len(p2), 3)


def test_the_same_prompt_again_runs_nothing(model):
    store, counter = PromptStore(UNLIMITED), Counter(model)
    p1 = ids(33, 20)
    p2 = p1 + ids(17, 21)
    _, _, first, _ = run(store, counter, p1)
    run(store, counter, p2)
    for prompt, ref in [(p2, fresh(model, p2)), (p1, first)]:
        cached, ran, logits, cache = run(store, counter, prompt)
        assert (cached, ran) == (len(prompt), 0)
        assert close(logits, ref)
        assert {c.offset for c in cache} == {len(prompt)}


def test_unrelated_prompts_start_over(model):
    store, counter = PromptStore(UNLIMITED), Counter(model)
    p1 = ids(30, 30)
    run(store, counter, p1)
    p2 = [(p1[0] + 1) % VOCAB] + p1[1:]  # e.g. another reasoning effort in the system message
    cached, ran, logits, _ = run(store, counter, p2)
    assert (cached, ran) == (0, len(p2))
    assert close(logits, fresh(model, p2))
    assert len(store) == 2


def test_a_new_conversation_reuses_the_shared_messages(model):
    store, counter = PromptStore(UNLIMITED, message_start=START), Counter(model)
    shared = [START, *ids(50, 60), START, *ids(30, 61)]  # system and developer messages
    first = [*shared, START, *ids(10, 62), START, ASSISTANT]  # + user message, generation prompt
    assert run(store, counter, first)[:2] == (0, len(first))
    # Another conversation with the same tools and instructions: everything before its user
    # message comes from the checkpoint taken where `first`'s last message started.
    second = [*shared, START, *ids(14, 63), START, ASSISTANT]
    cached, ran, logits, _ = run(store, counter, second)
    assert (cached, ran) == (len(shared), len(second) - len(shared))
    assert close(logits, fresh(model, second))
    # The first conversation goes on from its own prompt's end, as before.
    turn2 = [*first, *ids(6, 64), START, *ids(9, 65), START, ASSISTANT]
    assert run(store, counter, turn2)[:2] == (len(first), len(turn2) - len(first))
    assert len(store) == 2


def expected_bytes(model, n_prompts: list[int]) -> int:
    """An entry's size from the shapes: full layers hold the latest prompt in mlx-lm's KVCache
    buffers (grown in 256-token steps, from the restored length on a later turn); each checkpoint
    holds min(n, window) tokens per sliding layer and the logits."""
    cfg = model.config
    per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # keys + values, float32
    full = sum(t == FULL for t in model.layer_types)
    sliding = len(model.layer_types) - full
    restored = n_prompts[-2] if len(n_prompts) > 1 else 0
    capacity = restored + 256 * math.ceil((n_prompts[-1] - restored) / 256)
    total = full * per_token * capacity
    for m in n_prompts:
        total += sliding * per_token * min(m, WINDOW) + cfg.vocab_size * 4
    return total


def test_lru_eviction_within_the_byte_budget(model):
    a, b, c = ids(20, 40), ids(300, 41), ids(25, 42)
    sizes = {k: expected_bytes(model, [len(p)]) for k, p in zip("abc", (a, b, c), strict=True)}
    store = PromptStore(UNLIMITED)
    store.prefill(model, a)
    assert store.nbytes == sizes["a"]
    a2 = a + ids(5, 43)
    store.prefill(model, a2)
    assert store.nbytes == expected_bytes(model, [len(a), len(a2)])

    # Room for a and b but not c as well: c's arrival evicts the least recently used.
    budget = sizes["a"] + sizes["b"] + sizes["c"] - 1
    store = PromptStore(budget)
    store.prefill(model, a)
    store.prefill(model, b)
    store.prefill(model, a)  # a hit: a is now the most recently used
    store.prefill(model, c)
    assert store.nbytes == sizes["a"] + sizes["c"] <= budget
    assert store.prefill(model, a)[2] == len(a)
    assert store.prefill(model, b)[2] == 0  # evicted, and stored again, which evicts c
    assert store.prefill(model, c)[2] == 0


def test_an_entry_larger_than_the_budget_is_not_kept(model):
    p = ids(20, 50)
    store = PromptStore(expected_bytes(model, [len(p)]) - 1)
    _, logits, cached = store.prefill(model, p)
    assert cached == 0 and len(store) == 0 and store.nbytes == 0
    assert close(logits, fresh(model, p))


@pytest.mark.parametrize("budget", [UNLIMITED, 60_000], ids=["unlimited", "evicting"])
def test_random_conversations_match_fresh_prefills(model, budget):
    """Prompts that extend, repeat or branch off earlier ones, with message starts in them, under
    a budget that does or does not evict: every restore gives a fresh prefill's logits, and never
    claims more tokens than the prompt shares with an earlier one."""
    rng = np.random.default_rng(7)
    store, counter = PromptStore(budget, message_start=START), Counter(model)
    seen: list[list[int]] = []

    def message(n: int) -> list[int]:
        return [START, *rng.integers(0, START, n).tolist()]

    for step in range(14):
        kind = rng.choice(["new", "extend", "repeat", "branch"]) if seen else "new"
        if kind == "new":
            prompt = message(20) + message(int(rng.integers(3, 15)))
        elif kind == "extend":
            prompt = seen[-1] + message(int(rng.integers(1, 12)))
        elif kind == "repeat":
            prompt = list(seen[int(rng.integers(len(seen)))])
        else:
            base = seen[int(rng.integers(len(seen)))]
            prompt = base[: int(rng.integers(1, len(base)))] + message(int(rng.integers(1, 9)))
        prompt += [START, ASSISTANT]
        shared = max((_shared(prompt, p) for p in seen), default=0)
        cached, ran, logits, _ = run(store, counter, prompt)
        assert cached + ran == len(prompt) and cached <= shared, (step, kind)
        if kind == "extend" and budget == UNLIMITED:
            assert cached == len(seen[-1]), step
        assert close(logits, fresh(model, prompt)), (step, kind)
        assert store.nbytes <= budget
        seen.append(prompt)


def _shared(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
