"""The continuous-batching engine against the single-sequence one, on a tiny random model whose
sliding window (8 tokens) is shorter than most prompts, so rows cross the window boundary while
other rows join and leave the batch.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_tiny_config
from gptoss_mlx.convert.synthetic import random_model
from gptoss_mlx.engine.batching import (
    BatchEngine,
    BatchRequest,
    BatchResult,
    RowSampling,
    merge_caches,
    sample_rows,
)
from gptoss_mlx.engine.generate import SamplingParams, generate, prefill
from gptoss_mlx.errors import UsageError
from gptoss_mlx.model.config import FULL
from gptoss_mlx.model.transformer import GptOss

WINDOW = 8
VOCAB = 512
GREEDY = SamplingParams(temperature=0.0)
# Prompt lengths below and above the window, and token budgets, for the greedy comparisons.
LENGTHS = [3, 40, 7, 8, 9, 17, 5, 25]
MAX_TOKENS = [20, 5, 12, 1, 17, 9, 14, 3]


def tiny_model(seed: int = 0, layers: int = 2) -> GptOss:
    """Random weights the way a converted checkpoint holds them (see `random_model`)."""
    cfg = make_tiny_config(
        num_hidden_layers=layers,
        head_dim=64,
        num_local_experts=8,
        sliding_window=WINDOW,
        vocab_size=VOCAB,
    )
    return random_model(cfg, seed)


def prompts_of(lengths: list[int], seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model() -> GptOss:
    return tiny_model()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return prompts_of(LENGTHS)


@pytest.fixture(scope="module")
def greedy_refs(model, prompts) -> list[list[int]]:
    return [
        generate(model, p, max_tokens=n, sampling=GREEDY).tokens
        for p, n in zip(prompts, MAX_TOKENS, strict=True)
    ]


def run_all(engine: BatchEngine, requests: list[BatchRequest]) -> dict:
    results = list(engine.run(requests))
    assert len(results) == len(requests)
    return {r.id: r for r in results}


# --------------------------------------------------------------------------- the caches


def test_batch_caches_match_single_sequence(model):
    """mlx-lm's BatchKVCache/BatchRotatingKVCache, driven by our model: each row's logits equal
    that sequence's single-cache logits while rows join (merge + extend) and leave (filter),
    before and after the rotating window wraps, and when the batch empties and refills."""
    lengths = [3, 30, 8, 9, 1, 20, 12]
    joins = [0, 0, 2, 6, 6, 14, 30]  # decode step at which each row joins
    steps = [12, 7, 20, 3, 15, 10, 9]  # decode steps it then takes
    seqs = prompts_of([n + 25 for n in lengths], seed=7)

    def single(i: int) -> mx.array:
        cache = model.make_cache()
        out = [prefill(model, seqs[i][: lengths[i]], cache)]
        for t in range(steps[i]):
            out.append(model(mx.array([[seqs[i][lengths[i] + t]]]), cache=cache)[0, -1])
        return mx.stack(out)

    refs = [single(i) for i in range(len(lengths))]
    rows: list[int] = []
    done = {i: 0 for i in range(len(lengths))}
    cache = None
    worst = 0.0
    for step in range(max(joins) + max(steps) + 1):
        keep = [k for k, i in enumerate(rows) if done[i] < steps[i]]
        if len(keep) < len(rows):
            rows = [rows[k] for k in keep]
            if keep:
                for c in cache:
                    c.filter(mx.array(keep))
            else:
                cache = None
        new = [i for i, j in enumerate(joins) if j == step]
        if new:
            singles = []
            for i in new:
                singles.append(model.make_cache())
                first = prefill(model, seqs[i][: lengths[i]], singles[-1])
                worst = max(worst, mx.abs(first - refs[i][0]).max().item())
            merged = merge_caches(singles)
            if cache is None:
                cache = merged
            else:
                for mine, theirs in zip(cache, merged, strict=True):
                    mine.extend(theirs)
            rows += new
        if not rows:
            continue
        feed = mx.array([[seqs[i][lengths[i] + done[i]]] for i in rows])
        logits = model(feed, cache=cache)[:, -1]
        for k, i in enumerate(rows):
            done[i] += 1
            worst = max(worst, mx.abs(logits[k] - refs[i][done[i]]).max().item())
    assert all(done[i] == steps[i] for i in done)
    assert worst < 1e-4


# --------------------------------------------------------------------------- greedy equality


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_greedy_matches_single_generation(model, prompts, greedy_refs, batch_size):
    pulled: list[int] = []  # how many results had come out when each request was read
    seen: list[BatchResult] = []

    def requests():
        for i, (p, n) in enumerate(zip(prompts, MAX_TOKENS, strict=True)):
            pulled.append(len(seen))
            yield BatchRequest(p, max_tokens=n, sampling=GREEDY, id=f"r{i}")

    engine = BatchEngine(model, batch_size=batch_size, stop_ids=())
    for r in engine.run(requests()):
        seen.append(r)
    by_id = {r.id: r for r in seen}
    assert sorted(by_id) == [f"r{i}" for i in range(len(prompts))]
    for i, ref in enumerate(greedy_refs):
        r = by_id[f"r{i}"]
        assert r.tokens == ref, f"request {i}"
        assert (r.finish_reason, r.error) == ("length", None)
        assert (r.prompt_tokens, r.completion_tokens) == (LENGTHS[i], MAX_TOKENS[i])
    s = engine.stats
    assert s.max_rows == batch_size
    assert s.requests == len(prompts)
    assert s.prompt_tokens == sum(LENGTHS)
    assert s.completion_tokens == sum(MAX_TOKENS)
    assert 0 < s.prompt_seconds < s.seconds
    assert s.tokens_per_second < s.generation_tps
    # Slots are refilled: request `batch_size` was read only after a sequence had finished.
    assert pulled[batch_size] >= 1
    if batch_size > 1:
        assert s.mean_batch > 1.0


def test_stop_ids(model, prompts):
    long = [generate(model, p, max_tokens=12, sampling=GREEDY).tokens for p in prompts]
    stop = {long[0][4], long[5][2]}
    refs = [generate(model, p, max_tokens=12, stop_ids=stop, sampling=GREEDY) for p in prompts]
    engine = BatchEngine(model, batch_size=3, stop_ids=stop)
    got = run_all(engine, [BatchRequest(p, 12, GREEDY) for p in prompts])
    for i, ref in enumerate(refs):
        assert got[i].tokens == ref.tokens
        assert got[i].finish_reason == ref.stats.finish_reason
    assert got[0].finish_reason == "stop" and got[0].tokens[-1] in stop
    # A request's own stop_ids replace the engine's.
    own = run_all(engine, [BatchRequest(prompts[0], 12, GREEDY, stop_ids=())])
    assert own[0].tokens == long[0]
    assert own[0].finish_reason == "length"


def test_harmony_stop_ids_are_the_default(model):
    # <|return|>, <|call|> and <|endoftext|>: where `run_turn` and `batch` stop.
    assert BatchEngine(model).stop_ids == (200002, 200012, 199999)


# --------------------------------------------------------------------------- sampling


def test_seeded_sampling_ignores_batch_composition(model, prompts):
    target = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    req = BatchRequest(prompts[2], max_tokens=15, sampling=target, id="target")
    others = [
        BatchRequest(p, 9, SamplingParams(temperature=t, top_k=k, min_p=m, seed=s))
        for p, t, k, m, s in zip(
            prompts[3:],
            [0.0, 0.7, 1.3, 1.0, 1.0],
            [0, 5, 0, 0, 40],
            [0, 0, 0.1, 0, 0],
            range(5),
            strict=True,
        )
    ]
    alone = run_all(BatchEngine(model, batch_size=1), [req])["target"].tokens
    # Joins late into another slot, next to rows with other settings; then first, with others.
    late = run_all(BatchEngine(model, batch_size=3), [*others, req])["target"].tokens
    early = run_all(BatchEngine(model, batch_size=4), [req, *others[:3]])["target"].tokens
    assert len(alone) == 15
    assert alone == late == early
    reseeded = [
        run_all(
            BatchEngine(model, batch_size=1),
            [BatchRequest(prompts[2], 15, SamplingParams(temperature=1.0, seed=s), id=0)],
        )[0].tokens
        for s in (1, 2)
    ]
    assert reseeded[0] != reseeded[1]


def _allowed(lp: np.ndarray, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Oracle: the tokens each filter keeps, from the definitions (on untempered probabilities)."""
    order = np.argsort(-lp, kind="stable")
    p = np.exp(lp - lp.max())
    p /= p.sum()
    keep = set(range(len(lp)))
    if top_k:
        keep &= set(order[:top_k].tolist())
    if top_p < 1.0:
        mass_before = np.cumsum(p[order]) - p[order]
        keep &= set(order[mass_before < top_p].tolist())
    if min_p:
        keep &= set(np.flatnonzero(p >= min_p * p.max()).tolist())
    return keep


MIXED = [
    SamplingParams(temperature=1.0, top_k=3, seed=1),
    SamplingParams(temperature=1.0, top_p=0.6, seed=2),
    SamplingParams(temperature=1.0, min_p=0.2, seed=3),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.7, seed=4),
    SamplingParams(temperature=2.0, top_k=5, top_p=0.9, min_p=0.05, seed=5),
]
# Without top-p, top-k takes the partition path instead of a full sort.
TOP_K_ONLY = [
    SamplingParams(temperature=1.0, top_k=3, seed=1),
    SamplingParams(temperature=1.5, seed=2),
    SamplingParams(temperature=0.8, top_k=6, seed=3),
]


@pytest.mark.parametrize("params", [MIXED, TOP_K_ONLY], ids=["mixed", "top_k_only"])
def test_sample_rows_filters_and_distribution(params):
    rng = np.random.default_rng(3)
    lp = rng.normal(size=12) * 0.5  # flat enough that every filter keeps several tokens
    lp = lp - np.log(np.exp(lp).sum())
    s = RowSampling.of(params)
    logprobs = mx.array(np.tile(lp, (len(params), 1)).astype(np.float32))
    n = 2000
    draws = []
    for _ in range(n):
        tokens, s = sample_rows(logprobs, s)
        draws.append(tokens)
    draws = np.array(mx.stack(draws).tolist())  # (n, rows)
    for row, p in enumerate(params):
        got = set(draws[:, row].tolist())
        if p.temperature == 0:
            assert got == {int(np.argmax(lp))}
            continue
        allowed = _allowed(lp, p.top_k, p.top_p, p.min_p)
        assert got <= allowed, (row, got, allowed)
        # Frequencies follow softmax(logprobs / T) renormalised over the kept tokens.
        ids = sorted(allowed)
        q = np.exp(lp[ids] / p.temperature)
        q /= q.sum()
        freq = np.array([(draws[:, row] == t).mean() for t in ids])
        assert np.abs(freq - q).max() < 4 * math.sqrt(0.25 / n), (row, freq, q)
        assert {t for t, qt in zip(ids, q, strict=True) if qt > 0.01} <= got


# --------------------------------------------------------------------------- limits and errors


class _CacheWatcher:
    """Wraps the model and records the longest full-attention cache any forward pass leaves."""

    def __init__(self, model: GptOss):
        self.model, self.config, self.longest = model, model.config, 0
        self._full = model.layer_types.index(FULL)

    def make_cache(self):
        return self.model.make_cache()

    def hidden(self, tokens, cache=None):
        out = self.model.hidden(tokens, cache)
        self._record(cache)
        return out

    def __call__(self, tokens, cache=None, last_only=False):
        out = self.model(tokens, cache=cache, last_only=last_only)
        self._record(cache)
        return out

    def _record(self, cache):
        offset = cache[self._full].offset
        lengths = offset.tolist() if isinstance(offset, mx.array) else [offset]
        self.longest = max(self.longest, *lengths)


def test_context_limit(model):
    lengths = [3, 15, 19, 20, 25, 4]
    ps = prompts_of(lengths, seed=5)
    watcher = _CacheWatcher(model)
    engine = BatchEngine(watcher, batch_size=3, stop_ids=(), max_context=20)
    reqs = [BatchRequest(p, 50, GREEDY) for p in ps[:5]]
    reqs.append(BatchRequest(ps[5], 50, GREEDY, max_context=10))  # its own, tighter limit
    got = run_all(engine, reqs)
    for i, limit in zip([0, 1, 2, 5], [20, 20, 20, 10], strict=True):
        ref = generate(model, ps[i], max_tokens=50, sampling=GREEDY, max_context=limit)
        assert got[i].tokens == ref.tokens
        assert got[i].finish_reason == "length"
        assert got[i].completion_tokens == limit - lengths[i]
    for i in (3, 4):
        assert got[i].finish_reason == "error" and got[i].tokens == []
        assert "context limit is 20" in got[i].error
    # The last token of a sequence at its limit is never fed back into the caches.
    assert 0 < watcher.longest <= 19


def test_non_finite_logits_end_only_that_sequence(prompts):
    clean = tiny_model()
    refs = [generate(clean, p, max_tokens=10, sampling=GREEDY).tokens for p in prompts]
    # A token that prompt 0 generates at step j >= 1 and that appears nowhere else: with its
    # embedding row set to NaN, sequence 0 breaks exactly when that token is fed back.
    used_elsewhere = {t for i, p in enumerate(prompts) if i for t in p + refs[i]}
    j, bad = next(
        (j, t)
        for j, t in enumerate(refs[0])
        if j >= 1 and t not in used_elsewhere and t not in prompts[0] + refs[0][:j]
    )
    poisoned = tiny_model()
    emb = poisoned.model.embed_tokens.weight
    emb[bad] = mx.nan
    # A second bad token sits in prompt 3 itself, so that sequence fails at prefill.
    prompt3_bad = prompts[3][1]
    emb[prompt3_bad] = mx.nan
    poisoned.model.embed_tokens.weight = emb
    affected = {0, 3} | {i for i, p in enumerate(prompts) if prompt3_bad in p + refs[i]}
    engine = BatchEngine(poisoned, batch_size=4, stop_ids=())
    got = run_all(engine, [BatchRequest(p, 10, GREEDY) for p in prompts])
    assert got[0].finish_reason == "error" and "non-finite" in got[0].error
    assert got[0].tokens == refs[0][: j + 1]
    assert got[3].finish_reason == "error" and got[3].tokens == []
    for i in set(range(len(prompts))) - affected:
        assert (got[i].tokens, got[i].finish_reason) == (refs[i], "length"), i


def test_bad_requests_fail_alone(model, prompts, greedy_refs):
    bad = [
        BatchRequest([], 5, GREEDY, id="empty"),
        BatchRequest([1, VOCAB], 5, GREEDY, id="vocab"),
        BatchRequest([1, 2], 0, GREEDY, id="max_tokens"),
        BatchRequest([1, 2], 5, SamplingParams(temperature=-1.0), id="temperature"),
        BatchRequest([1, 2], 5, SamplingParams(seed=-3), id="seed"),
    ]
    good = BatchRequest(prompts[0], MAX_TOKENS[0], GREEDY, id="good")
    got = run_all(BatchEngine(model, batch_size=2, stop_ids=()), [bad[0], good, *bad[1:]])
    for r in bad:
        assert got[r.id].finish_reason == "error" and got[r.id].tokens == [], r.id
        assert got[r.id].error
    assert got["good"].tokens == greedy_refs[0]
    with pytest.raises(UsageError):
        BatchEngine(model, batch_size=0)
