"""Continuous batching: up to `batch_size` sequences decode together, one forward pass per step.

Each new prompt is prefilled alone (the single-sequence `prefill`, so its first token is exactly
what `generate` would sample), then its per-layer caches are merged into the running batch:
mlx-lm's `BatchKVCache` for full layers (left-padded, growing) and `BatchRotatingKVCache` for
sliding layers (a `sliding_window`-token ring per row). Both carry a per-row `offset` array,
which `Attention` hands to RoPE, and build the per-row masks `GptOss.hidden` asks for;
tests/test_batching.py checks them against single-sequence logits across the window boundary,
merges and removals.
A finished row is dropped from the caches, and its slot goes to the next waiting prompt.

Decoding is pipelined as in `generate_tokens`: step t+1 is launched with the tokens of step t
before the host reads them. A row that is known to be at its token budget is dropped before the
launch; a row that hits a stop id costs one wasted row in the step already launched. A long
prompt's prefill pauses the other rows for its duration (prefill is not interleaved with decode).

Greedy results equal `generate`'s token for token (batched and single logits agree to ~1e-5 in
float32, so only a near-exact tie could tell them apart). Seeded sampling is reproducible per
sequence (same seed, prompt and settings give the same tokens at any batch size or slot), but it
draws from its own per-row key, not from MLX's global generator as `generate` does, so it is not
the same stream as a seeded `generate`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache, RotatingKVCache

from ..errors import GptOssError, UsageError
from ..harmony.parser import HarmonyIds
from .distributed import agree_on_rows, agree_on_tokens
from .generate import NonFiniteLogitsError, SamplingParams, prefill, room_to_generate

# The error of a sequence whose logits went NaN or infinite (where `generate` would raise
# NonFiniteLogitsError); only that sequence ends.
_NON_FINITE = (
    "the model produced non-finite logits (NaN or inf) for this sequence; "
    "the weights may be corrupt: run `gptoss-mlx verify` on the model folder"
)

# gpt-oss's stop tokens, as `run_turn` and `batch` stop: <|return|> (final answer done), <|call|>
# (tool call) and <|endoftext|> (the third eos id of its generation_config).
_IDS = HarmonyIds()  # o200k_harmony's
HARMONY_STOP_IDS = (_IDS.return_, _IDS.call, _IDS.endoftext)


@dataclass
class BatchRequest:
    """One prompt to complete. `id` defaults to the request's index in the input order;
    `stop_ids` and `max_context` default to the engine's.

    For a server (engine/scheduler.py): `on_token` is called with each generated token as the
    host reads it (on the engine's thread), and `cancelled` is polled once per decode step: when
    it returns True the sequence leaves the batch before the next forward pass and ends with
    finish_reason "cancelled"."""

    prompt: Sequence[int]
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    id: Any = None
    stop_ids: Sequence[int] | None = None
    max_context: int | None = None
    on_token: Callable[[int], None] | None = None
    cancelled: Callable[[], bool] | None = None
    # A TokenConstraint (engine/constraints): its grammar masks this row's logits, it advances
    # with each token, a complete grammar ends the row ("stop"), and it is closed with the row.
    constraint: Any = None


@dataclass
class BatchResult:
    """A finished sequence. `finish_reason` is "stop" (a stop id, included in `tokens`),
    "length" (max_tokens or the context limit), "cancelled" (its request's `cancelled()` said
    so) or "error" (then `error` says why and `exception` is the error itself; `tokens` holds
    what was generated before). `cached_tokens`: prompt tokens restored from the engine's
    prompt store instead of prefilled."""

    id: Any
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    exception: GptOssError | None = None
    cached_tokens: int = 0


@dataclass
class BatchStats:
    """Aggregate figures of one `BatchEngine.run`."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # the whole run
    prompt_seconds: float = 0.0  # of which prefilling (and sampling each first token)
    steps: int = 0  # batched decode forward passes
    row_steps: int = 0  # sum of the batch sizes of those passes
    max_rows: int = 0  # most sequences decoding together
    peak_memory_bytes: int = 0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per wall-clock second, prefill time included."""
        return self.completion_tokens / self.seconds if self.seconds else 0.0

    @property
    def generation_tps(self) -> float:
        """Generated tokens per second of decoding, prefill time excluded (as `GenerationStats`)."""
        decode = self.seconds - self.prompt_seconds
        return self.completion_tokens / decode if decode > 0 else 0.0

    @property
    def mean_batch(self) -> float:
        return self.row_steps / self.steps if self.steps else 0.0

    def summary(self) -> str:
        return (
            f"{self.requests} requests | prompt: {self.prompt_tokens} tokens | "
            f"generation: {self.completion_tokens} tokens in {self.seconds:.2f} s "
            f"({self.prompt_seconds:.2f} s prefill), {self.tokens_per_second:.1f} tokens/s, "
            f"{self.generation_tps:.1f} tokens/s decoding | mean batch {self.mean_batch:.1f} | "
            f"peak memory: {self.peak_memory_bytes / 1e9:.2f} GB"
        )


# --------------------------------------------------------------------------- sampling


@dataclass
class RowSampling:
    """Each row's sampling settings and PRNG key, so one batched call samples every row.

    A row's key is split once per token it samples, so a seeded sequence draws the same random
    numbers whatever batch it shares and whichever slot it sits in. The settings stay on the
    host: `sample_rows` turns the ones in use into small arrays each step, which keeps lazy
    gather/concatenate graphs from piling up across many joins and removals.
    """

    params: list[SamplingParams]
    keys: mx.array  # (B, 2) uint32

    @classmethod
    def of(cls, params: Sequence[SamplingParams]) -> RowSampling:
        """State for `params`; a row without a seed gets a key from MLX's global generator."""
        keys = [mx.random.key(p.seed) if p.seed is not None else _fresh_key() for p in params]
        return cls(list(params), mx.stack(keys))

    def take(self, idx: mx.array, rows: Sequence[int]) -> RowSampling:
        return RowSampling([self.params[i] for i in rows], self.keys[idx])

    @staticmethod
    def concat(parts: Sequence[RowSampling]) -> RowSampling:
        params = [q for p in parts for q in p.params]
        return RowSampling(params, mx.concatenate([p.keys for p in parts]))

    def column(self, name: str, dtype: mx.Dtype = mx.float32) -> mx.array:
        return mx.array([getattr(p, name) for p in self.params], dtype=dtype)


def _fresh_key() -> mx.array:
    # randint draws through float32, so build each 32-bit half from two 16-bit draws.
    r = mx.random.randint(0, 1 << 16, (4,)).astype(mx.uint32)
    return (r[0::2] << 16) | r[1::2]


@mx.compile
def _gumbel_draw(keys: mx.array, x: mx.array, temperature: mx.array) -> tuple[mx.array, mx.array]:
    """argmax(x / T + Gumbel noise) per row, the noise drawn with that row's key: a sample of
    softmax(x / T). Returns (tokens [B], next keys [B, 2]). Compiled: vmapping the key split and
    the noise costs far more host time per step than the arithmetic."""
    pairs = mx.vmap(mx.random.split)(keys)  # (B, 2, 2): the row's next key, the key for now
    noise = mx.vmap(lambda k: mx.random.gumbel((x.shape[-1],), key=k))(pairs[:, 1])
    t = temperature[:, None]
    return mx.argmax(x / mx.where(t > 0, t, 1.0) + noise, axis=-1), pairs[:, 0]


def sample_rows(logprobs: mx.array, s: RowSampling) -> tuple[mx.array, RowSampling]:
    """Sample one token per row of `logprobs` [B, vocab] with that row's settings.

    Returns (tokens [B], the sampling state with advanced keys). The filters keep what mlx-lm's
    `make_sampler` chain (top-p, then min-p, then top-k, on untempered log-probabilities) keeps,
    except that a tie at a top-k boundary keeps every tied token; each filter keeps a prefix of
    the sorted vocabulary, so they reduce to one threshold per row. The draw is Gumbel-max, as
    in `mx.random.categorical`, but with one key per row.
    """
    greedy = mx.argmax(logprobs, axis=-1)
    ps = s.params
    if all(p.greedy for p in ps):
        return greedy, s
    neg_inf = mx.array(-mx.inf, dtype=logprobs.dtype)
    thresholds = []
    use_k = any(p.top_k > 0 for p in ps)
    use_p = any(p.top_p < 1.0 for p in ps)
    if use_k or use_p:
        V = logprobs.shape[-1]
        k_max = max(p.top_k for p in ps)
        if use_p or k_max >= V:
            desc = -mx.sort(-logprobs, axis=-1)  # (B, V), largest first
        else:
            # Only the k_max largest matter: partition, then sort just those (B, k_max).
            desc = -mx.sort(mx.partition(-logprobs, k_max - 1, axis=-1)[:, :k_max], axis=-1)
        if use_k:
            top_k = s.column("top_k", mx.int32)[:, None]
            kth = mx.take_along_axis(desc, mx.clip(top_k - 1, 0, desc.shape[-1] - 1), axis=-1)
            thresholds.append(mx.where(top_k > 0, kth, neg_inf))
        if use_p:
            probs = mx.exp(desc.astype(mx.float32))
            before = mx.cumsum(probs, axis=-1) - probs  # mass strictly above each token
            total = probs.sum(axis=-1, keepdims=True)
            top_p = s.column("top_p")[:, None]
            n_keep = (before < top_p * total).sum(axis=-1, keepdims=True)
            last = mx.take_along_axis(desc, mx.maximum(n_keep - 1, 0), axis=-1)
            thresholds.append(mx.where(top_p < 1.0, last, neg_inf))
    if any(p.min_p > 0 for p in ps):
        top = logprobs.max(axis=-1, keepdims=True)
        min_p = s.column("min_p")[:, None]
        floor = top + mx.log(mx.maximum(min_p, 1e-30)).astype(logprobs.dtype)
        thresholds.append(mx.where(min_p > 0, floor, neg_inf))
    x = logprobs
    for t in thresholds:
        x = mx.where(x >= t, x, neg_inf)
    temperature = s.column("temperature_used")  # 0 for a greedy row (SamplingParams.greedy)
    drawn, keys = _gumbel_draw(s.keys, x, temperature)
    return mx.where(temperature > 0, drawn, greedy), RowSampling(ps, keys)


# --------------------------------------------------------------------------- the batch


def merge_caches(caches: Sequence[list[Any]]) -> list[Any]:
    """Per layer, stack single-sequence caches (`model.make_cache()`) into one batch cache,
    left-padded to the longest: BatchRotatingKVCache for sliding layers, BatchKVCache for full."""
    merged = []
    for layer in zip(*caches, strict=True):
        kind = BatchRotatingKVCache if isinstance(layer[0], RotatingKVCache) else BatchKVCache
        merged.append(kind.merge(list(layer)))
    return merged


@dataclass
class _Row:
    id: Any
    prompt_tokens: int
    budget: int  # tokens it may generate: max_tokens, capped by its context limit
    stop: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    on_token: Callable[[int], None] | None = None
    cancelled: Callable[[], bool] | None = None
    cached_tokens: int = 0
    constraint: Any = None

    def result(self, reason: str, error: GptOssError | None = None) -> BatchResult:
        if self.constraint is not None:
            self.constraint.close()  # the matcher goes with its row
        return BatchResult(
            self.id,
            self.tokens,
            reason,
            self.prompt_tokens,
            len(self.tokens),
            str(error) if error is not None else None,
            error,
            self.cached_tokens,
        )


@dataclass
class _Joining:
    """A prefilled sequence waiting to be merged: its caches and its first token, not yet
    handed out."""

    row: _Row
    cache: list[Any]
    y: mx.array  # (1,)
    ok: mx.array  # (1,)
    sampling: RowSampling


class _Batch:
    """The running rows, their batch caches and, per row, the sampled token not yet read back
    (`y`, with `ok` saying whether its logits were finite)."""

    def __init__(self) -> None:
        self.rows: list[_Row] = []
        self.cache: list[Any] | None = None
        self.y: mx.array | None = None
        self.ok: mx.array | None = None
        self.sampling: RowSampling | None = None

    def extend(self, joining: list[_Joining]) -> None:
        new_cache = merge_caches([j.cache for j in joining])
        if self.cache is None:
            self.cache = new_cache
        else:
            for mine, theirs in zip(self.cache, new_cache, strict=True):
                mine.extend(theirs)
        ys, oks = [j.y for j in joining], [j.ok for j in joining]
        samplings = [j.sampling for j in joining]
        if self.rows:
            ys, oks, samplings = [self.y, *ys], [self.ok, *oks], [self.sampling, *samplings]
        self.y, self.ok = mx.concatenate(ys), mx.concatenate(oks)
        self.sampling = RowSampling.concat(samplings)
        self.rows += [j.row for j in joining]

    def keep(self, keep: list[int]) -> None:
        """Keep only rows `keep` (indices into the current rows) in the caches and state."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.y = self.ok = self.sampling = None
            return
        idx = mx.array(keep)
        for c in self.cache:
            c.filter(idx)
        self.y, self.ok = self.y[idx], self.ok[idx]
        self.sampling = self.sampling.take(idx, keep)


# --------------------------------------------------------------------------- the engine


class BatchEngine:
    """Continuous-batching generator over a `GptOss` model.

    `run(requests)` yields a `BatchResult` for each request as soon as its sequence finishes
    (not in input order); `stats` then holds the run's aggregate figures. Problems with one
    request (empty or too long prompt, bad settings, non-finite logits) end that request with
    finish_reason "error" and leave the others running.

    Args:
        model: a `GptOss` (anything with its `__call__`, `hidden`, `make_cache` and `config`).
        batch_size: the most sequences decoding together.
        stop_ids: ids that end a sequence (and are returned with it); harmony's by default.
        max_context: the most tokens (prompt + generated) a sequence may hold, unless its
            request sets its own; the model's `max_position_embeddings` by default.
        prompt_store: a `PromptStore` (engine/prompt_store.py) to restore the longest cached
            prefix of each prompt from, and to keep each prompt's end in; none by default.
    """

    def __init__(
        self,
        model: Any,
        batch_size: int = 8,
        stop_ids: Sequence[int] = HARMONY_STOP_IDS,
        max_context: int | None = None,
        prompt_store: Any = None,
    ):
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        if max_context is not None and max_context < 2:
            raise UsageError(f"max_context must be >= 2, got {max_context}")
        self.model = model
        self.batch_size = batch_size
        self.stop_ids = tuple(stop_ids)
        self.max_context = max_context or model.config.max_position_embeddings
        self.prompt_store = prompt_store
        self.stats = BatchStats()

    def run(self, requests: Iterable[BatchRequest | None]) -> Iterator[BatchResult]:
        """Generate for every request (read lazily, as slots free up); yield each as it ends.

        `requests` may yield None for "none ready yet" (a server's queue): the engine then
        decodes a step and asks again. It should do so only while sequences are running;
        otherwise it should block until a request comes (the engine would just ask again)."""
        stats = self.stats = BatchStats()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        pending = enumerate(requests)
        exhausted = False
        batch = _Batch()
        try:
            while True:
                joining: list[_Joining] = []
                while not exhausted and len(batch.rows) + len(joining) < self.batch_size:
                    item = next(pending, None)
                    if item is None:
                        exhausted = True
                        break
                    if item[1] is None:
                        break
                    if batch.rows and not joining:
                        # Let the step in flight finish, so that prefill timings are its own.
                        mx.eval(batch.y, batch.ok)
                    stats.requests += 1
                    started = self._start(*item)
                    if isinstance(started, BatchResult):
                        yield started
                    else:
                        stats.prompt_tokens += started.row.prompt_tokens
                        joining.append(started)
                if joining:
                    batch.extend(joining)
                if not batch.rows:
                    if exhausted:
                        return
                    continue
                stats.max_rows = max(stats.max_rows, len(batch.rows))
                yield from self._step(batch)
        finally:
            for row in batch.rows:  # rows left behind (the caller stopped early, or an error)
                if row.constraint is not None:
                    row.constraint.close()
            stats.seconds = time.perf_counter() - t0
            stats.peak_memory_bytes = mx.get_peak_memory()

    def _start(self, index: int, req: BatchRequest) -> _Joining | BatchResult:
        """Validate and prefill one request; an error result if it cannot run."""
        rid = req.id if req.id is not None else index
        prompt = list(req.prompt)
        row = _Row(rid, len(prompt), 0, frozenset(self.stop_ids), [], req.on_token, req.cancelled)
        row.constraint = req.constraint
        try:
            budget = self._budget(req, prompt)
        except GptOssError as e:
            return row.result("error", e)
        if req.stop_ids is not None:
            row.stop = frozenset(req.stop_ids)
        row.budget = budget
        t0 = time.perf_counter()
        if self.prompt_store is not None:
            cache, logits, row.cached_tokens = self.prompt_store.prefill(self.model, prompt)
        else:
            cache = self.model.make_cache()
            logits = prefill(self.model, prompt, cache)
        sampling = RowSampling.of([req.sampling])
        masked = [(row.constraint, 0)] if row.constraint is not None else []
        y, ok, sampling = self._sample(logits[None], sampling, masked)
        y, ok = agree_on_tokens(self.model, y, ok)  # a sharded model: rank 0's token
        mx.eval(y, ok, sampling.keys)
        self.stats.prompt_seconds += time.perf_counter() - t0
        return _Joining(row, cache, y, ok, sampling)

    def _budget(self, req: BatchRequest, prompt: list[int]) -> int:
        if not prompt:
            raise UsageError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise UsageError(f"the prompt has token ids outside [0, {vocab})")
        if req.max_tokens < 1:
            raise UsageError(f"max_tokens must be >= 1, got {req.max_tokens}")
        req.sampling.validate()
        limit = req.max_context or self.max_context
        return min(req.max_tokens, room_to_generate(len(prompt), limit))

    @staticmethod
    def _sample(
        logits: mx.array, sampling: RowSampling, masked: list[tuple[Any, int]] = ()
    ) -> tuple[mx.array, mx.array, RowSampling]:
        """Sample each row; `masked`: (constraint, row) pairs whose grammar masks that row."""
        ok = mx.isfinite(logits).all(axis=-1)  # before masking, which writes -inf on purpose
        if masked:
            from .constraints import mask_logits

            logits = mask_logits(logits, masked)  # several rows' masks filled in parallel
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        y, sampling = sample_rows(logprobs, sampling)
        return y, ok, sampling

    @staticmethod
    def _advance(rows: list[_Row], tokens: list[int], finite: list[bool]) -> dict[int, Any]:
        """Advance each constrained row's grammar with its token; {row index: ConstraintError}."""
        from .constraints import ConstraintError

        broken = {}
        for i, row in enumerate(rows):
            if row.constraint is not None and finite[i] and not row.constraint.closed:
                try:
                    row.constraint.advance(tokens[i])
                except ConstraintError as e:
                    broken[i] = e
        return broken

    def _step(self, batch: _Batch) -> Iterator[BatchResult]:
        """Launch the next forward pass, then read back and hand out the previous tokens."""
        rows, y, ok = batch.rows, batch.y, batch.ok
        # A row whose pending token is its last is never fed back: no wasted work, and its
        # caches never hold more than its context limit. A cancelled row is not fed either.
        gone = {i for i, r in enumerate(rows) if r.cancelled is not None and r.cancelled()}
        if any(r.cancelled is not None for r in rows):
            gone = agree_on_rows(self.model, gone, len(rows))  # a sharded model: rank 0's
        feed = [i for i, r in enumerate(rows) if len(r.tokens) + 1 < r.budget and i not in gone]
        batch.keep(feed)
        tokens = finite = broken = None
        if feed:
            logits = self.model(batch.y[:, None], cache=batch.cache)[:, -1]  # (B, V)
            masked = [(r.constraint, k) for k, r in enumerate(batch.rows) if r.constraint]
            if masked:
                # A grammar's next mask depends on the token just sampled: read the tokens
                # now, while the device runs the forward pass just launched.
                mx.async_eval(logits)
                tokens, finite = y.tolist(), ok.tolist()
                broken = self._advance(rows, tokens, finite)
            batch.y, batch.ok, batch.sampling = self._sample(logits, batch.sampling, masked)
            batch.y, batch.ok = agree_on_tokens(self.model, batch.y, batch.ok)
            mx.async_eval(batch.y, batch.ok, batch.sampling.keys)
            self.stats.steps += 1
            self.stats.row_steps += len(feed)
        if tokens is None:
            tokens, finite = y.tolist(), ok.tolist()
            broken = self._advance(rows, tokens, finite)
        done = []
        finished = set()
        for i, row in enumerate(rows):
            reason = error = None
            if i in gone:
                reason = "cancelled"
            elif not finite[i]:
                reason, error = "error", NonFiniteLogitsError(_NON_FINITE)
            elif i in broken:
                reason, error = "error", broken[i]
            else:
                row.tokens.append(tokens[i])
                self.stats.completion_tokens += 1
                if row.on_token is not None:
                    row.on_token(tokens[i])
                if tokens[i] in row.stop or (row.constraint is not None and row.constraint.done):
                    reason = "stop"
                elif len(row.tokens) >= row.budget:
                    reason = "length"
            if reason is not None:
                finished.add(i)
                done.append(row.result(reason, error))
        if finished:
            batch.keep([k for k, i in enumerate(feed) if i not in finished])
        yield from done
