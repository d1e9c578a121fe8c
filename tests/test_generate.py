"""The generation engine (gptoss_mlx.generate) on a tiny random model converted like a real one.

Greedy decoding is checked against the argmax of one full forward pass over the whole sequence,
so the cache, chunked prefill and the pipelined decode loop are all covered by one oracle.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_tiny_config
from gptoss_mlx import load_model
from gptoss_mlx.convert.convert import convert
from gptoss_mlx.convert.synthetic import write_hf_checkpoint
from gptoss_mlx.engine.generate import (
    PREFILL_CHUNK,
    GenerationStats,
    NonFiniteLogitsError,
    SamplingParams,
    generate,
    generate_tokens,
)
from gptoss_mlx.errors import UsageError

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    cfg = make_tiny_config(num_hidden_layers=2, vocab_size=1024)
    src = write_hf_checkpoint(root / "hf", cfg, seed=3)
    out = root / "mlx"
    convert(src, out, recipe="mxfp4-bf16", dtype="float32", progress=False)
    return load_model(Path(out), dtype=mx.float32)


def prompt_of(n: int, seed: int = 0, vocab: int = 1024) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def full_forward_argmax(model, tokens: list[int]) -> list[int]:
    logits = model(mx.array([tokens]))[0]
    return np.array(mx.argmax(logits, axis=-1)).tolist()


@pytest.mark.parametrize("n_prompt", [5, PREFILL_CHUNK + 20], ids=["short", "chunked"])
def test_greedy_equals_argmax_of_full_forward(model, n_prompt):
    prompt = prompt_of(n_prompt)
    res = generate(model, prompt, max_tokens=12, sampling=GREEDY)
    assert len(res.tokens) == 12
    # Position i of a forward over prompt + generated predicts the token at i + 1.
    expected = full_forward_argmax(model, prompt + res.tokens[:-1])[n_prompt - 1 :]
    assert res.tokens == expected


def test_max_tokens_is_honoured(model):
    res = generate(model, prompt_of(6), max_tokens=3, sampling=GREEDY)
    assert len(res.tokens) == 3
    assert res.stats.finish_reason == "length"
    assert res.stats.generation_tokens == 3


def test_stops_right_after_a_stop_id(model):
    prompt = prompt_of(7, seed=1)
    greedy = generate(model, prompt, max_tokens=10, sampling=GREEDY).tokens
    # The first step k >= 1 whose token did not appear before: stopping on it must stop there.
    k = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])
    res = generate(model, prompt, max_tokens=10, stop_ids=[greedy[k]], sampling=GREEDY)
    assert res.tokens == greedy[: k + 1]
    assert res.stats.finish_reason == "stop"


def test_stop_on_the_last_allowed_token_counts_as_stop(model):
    prompt = prompt_of(7, seed=1)
    greedy = generate(model, prompt, max_tokens=10, sampling=GREEDY).tokens
    k = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])
    res = generate(model, prompt, max_tokens=k + 1, stop_ids=[greedy[k]], sampling=GREEDY)
    assert res.tokens == greedy[: k + 1]
    assert res.stats.finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_seeds_differ(model):
    prompt = prompt_of(5, seed=2)

    def sample(seed):
        params = SamplingParams(temperature=1.5, seed=seed)
        return generate(model, prompt, max_tokens=16, sampling=params).tokens

    a = sample(7)
    assert sample(7) == a
    assert sample(8) != a


def test_top_k_1_equals_greedy(model):
    prompt = prompt_of(9, seed=3)
    greedy = generate(model, prompt, max_tokens=8, sampling=GREEDY).tokens
    topk1 = SamplingParams(temperature=1.0, top_k=1, seed=0)
    assert generate(model, prompt, max_tokens=8, sampling=topk1).tokens == greedy


def test_context_limit_stops_with_length(model):
    prompt = prompt_of(10, seed=4)
    res = generate(model, prompt, max_tokens=100, sampling=GREEDY, max_context=13)
    assert len(res.tokens) == 3  # prompt + answer never passes max_context
    assert res.stats.finish_reason == "length"
    full = generate(model, prompt, max_tokens=3, sampling=GREEDY)
    assert res.tokens == full.tokens


@pytest.mark.parametrize("n_prompt", [13, 20])
def test_prompt_at_or_over_the_context_limit_is_refused(model, n_prompt):
    with pytest.raises(UsageError, match="context limit is 13"):
        generate(model, prompt_of(n_prompt), max_tokens=4, max_context=13)


def test_the_model_limit_applies_without_max_context(model, monkeypatch):
    monkeypatch.setattr(model.config, "max_position_embeddings", 12)
    res = generate(model, prompt_of(10), max_tokens=50, sampling=GREEDY)
    assert len(res.tokens) == 2
    assert res.stats.finish_reason == "length"


def test_empty_prompt_is_refused(model):
    with pytest.raises(UsageError, match="empty"):
        generate(model, [], max_tokens=4)


def test_continuing_a_cache_equals_a_fresh_run(model):
    """A cache kept from one call continues the conversation (the chat turn pattern)."""
    p1, extra = prompt_of(9, seed=5), prompt_of(4, seed=6)
    cache = model.make_cache()
    first = list(generate_tokens(model, p1, max_tokens=5, sampling=GREEDY, cache=cache))
    # The last sampled token was never fed back: the next prompt starts with it.
    second = list(
        generate_tokens(model, [first[-1], *extra], max_tokens=5, sampling=GREEDY, cache=cache)
    )
    fresh = generate(model, p1 + first + extra, max_tokens=5, sampling=GREEDY).tokens
    assert second == fresh


def test_context_limit_counts_the_cached_tokens(model):
    cache = model.make_cache()
    first = list(generate_tokens(model, prompt_of(9), max_tokens=3, sampling=GREEDY, cache=cache))
    assert cache[0].offset == 11  # 9 prompt tokens + 2 fed back
    stats = GenerationStats()
    out = list(
        generate_tokens(
            model, [first[-1]], max_tokens=50, sampling=GREEDY, cache=cache, max_context=15,
            stats=stats,
        )
    )  # fmt: skip
    assert len(out) == 15 - 12
    assert stats.finish_reason == "length"
    with pytest.raises(UsageError, match="context limit"):
        list(generate_tokens(model, [1, 2, 3, 4], max_tokens=5, cache=cache, max_context=15))


class NaNAfter:
    """The real model, except that its logits turn NaN from call number `after` on."""

    def __init__(self, model, after: int = 0):
        self.inner, self.after, self.calls = model, after, 0
        self.config = model.config

    def make_cache(self):
        return self.inner.make_cache()

    def hidden(self, tokens, cache=None):
        return self.inner.hidden(tokens, cache)

    def __call__(self, tokens, cache=None, last_only=False):
        logits = self.inner(tokens, cache=cache, last_only=last_only)
        self.calls += 1
        return logits * mx.nan if self.calls > self.after else logits


def test_nan_logits_raise(model):
    with pytest.raises(NonFiniteLogitsError, match="verify"):
        generate(model=NaNAfter(model), prompt=prompt_of(5), max_tokens=4)


def test_nan_logits_mid_generation_raise_after_the_good_tokens(model):
    prompt = prompt_of(5)
    greedy = generate(model, prompt, max_tokens=6, sampling=GREEDY).tokens
    got = []
    with pytest.raises(NonFiniteLogitsError):
        for t in generate_tokens(NaNAfter(model, after=3), prompt, max_tokens=6, sampling=GREEDY):
            got.append(t)
    assert got == greedy[:3]


def test_stats_are_filled(model):
    res = generate(model, prompt_of(11), max_tokens=5, sampling=GREEDY)
    s = res.stats
    assert s.prompt_tokens == 11
    assert s.generation_tokens == 5
    assert s.prompt_seconds > 0 and s.generation_seconds > 0
    assert s.prompt_tps > 0 and s.generation_tps > 0
    assert s.peak_memory_bytes > 0
    assert s.finish_reason == "length"
    summary = s.summary()
    assert "prompt: 11 tokens" in summary and "generation: 5 tokens" in summary


def test_stats_of_a_stream_closed_early(model):
    stats = GenerationStats()
    gen = generate_tokens(model, prompt_of(5), max_tokens=10, sampling=GREEDY, stats=stats)
    next(gen), next(gen)
    gen.close()
    assert stats.generation_tokens == 2
    assert stats.generation_seconds > 0


@pytest.mark.parametrize(
    "params, field",
    [
        (SamplingParams(temperature=-1.0), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(top_k=-1), "top_k"),
        (SamplingParams(min_p=1.0), "min_p"),
    ],
)
def test_bad_sampling_params_are_refused(model, params, field):
    with pytest.raises(UsageError, match=field):
        generate(model, prompt_of(3), max_tokens=2, sampling=params)
