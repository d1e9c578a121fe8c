"""The generation engine: chunked prefill, then decoding pipelined with `mx.async_eval`.

Harmony is handled above this layer: the engine takes prompt ids and yields token ids, stopping on
the ids it is given (for gpt-oss chat: `<|return|>` and `<|call|>`, never `<|end|>`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from ..errors import GptOssError, UsageError
from ..model.compiled_decode import start_decoder
from .distributed import agree_on_tokens

# Prompt tokens per forward pass during prefill. On a GPU larger chunks amortise weight reads
# across more tokens (the sorted expert gather reads each expert once per chunk); smaller ones bound
# the attention scores' memory. MLX's CPU kernels compute token by token, so there only the size of
# the intermediates counts: 64 measured fastest (docs/PERFORMANCE.md). Tuned with
# `scripts/bench_variants.py prefill-chunk`.
PREFILL_CHUNK = 512
CPU_PREFILL_CHUNK = 64
# Decode steps replay one compiled graph over fixed-shape caches (compiled_decode.py): about 0.6x
# the host time per step; see docs/PERFORMANCE.md for the measurements behind this default.
COMPILE_DECODE = True


class ContextLimitError(UsageError):
    """The prompt (plus what the cache already holds) does not fit the context limit."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} characters)"


def room_to_generate(tokens: int, limit: int, *, conversation: bool = False) -> int:
    """Tokens a sequence of `tokens` may still generate under a context `limit`; ContextLimitError
    when there is no room: a prompt longer than the limit, or one that fills it exactly (the
    message then says no room is left). The one rule of `generate`, `chat` and `batch`."""
    what = "conversation" if conversation else "prompt"
    fix = (
        "start a new conversation, shorten the prompt, or raise --max-context"
        if conversation
        else "shorten the prompt or raise --max-context"
    )
    if tokens > limit:
        raise ContextLimitError(
            f"the {what} has {tokens} tokens; the context limit is {limit} ({fix})"
        )
    if tokens == limit:
        raise ContextLimitError(
            f"the {what} has {tokens} tokens and the context limit is {limit}: no room is left "
            f"to generate ({fix})"
        )
    return limit - tokens


class NonFiniteLogitsError(GptOssError):
    """The model produced NaN or infinite logits (corrupt weights or an overflowing dtype)."""


# Temperatures below this sample as greedy (temperature 0). Sampling divides the logits by the
# temperature: under ~1e-38 that factor overflows float32 to inf and turns the logits into NaN,
# which samples random tokens; long before that the distribution is greedy for all purposes (at
# 1e-5 a logit gap of 0.001 already weighs e^-100). vLLM treats temperatures under 1e-5 the same.
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0
SEED_LIMIT = 2**64  # MLX's seeds are unsigned 64-bit
TOP_K_LIMIT = 2**31
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed")


@dataclass
class SamplingParams:
    """Sampling settings; the defaults are OpenAI's recommendation for gpt-oss (T=1, top-p=1).

    The rules, the same in `generate`, `chat`, `batch` and any front end (they all call
    `validate`): temperature in [0, 100], where below MIN_TEMPERATURE means greedy; top_p in
    (0, 1]; top_k >= 0, where 0 and any k at or above the vocabulary size keep every token
    (there is nothing to cut); min_p in [0, 1); seed None or in [0, 2**64).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Whether this samples the argmax: temperature 0 or under MIN_TEMPERATURE."""
        return self.temperature < MIN_TEMPERATURE

    @property
    def temperature_used(self) -> float:
        """The temperature sampling divides by: 0.0 (greedy) under MIN_TEMPERATURE."""
        return 0.0 if self.greedy else float(self.temperature)

    def validate(self) -> SamplingParams:
        """Raise UsageError naming the first bad field (`temperature: must be ...`); return self.

        The one check of sampling settings: the CLI, batch lines and the server all map their
        fields onto SamplingParams and call this, so a value is accepted or refused everywhere
        alike. Checks types too, since request fields arrive as arbitrary JSON."""
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UsageError(f"{name}: expected a number, got {type(value).__name__}")
            try:
                finite = math.isfinite(value)
            except OverflowError:  # an integer too large for a float
                finite = False
            if not finite:
                raise UsageError(f"{name}: expected a finite number, got {_show(value)}")
        for name in ("top_k", "seed"):
            value = getattr(self, name)
            if value is None and name == "seed":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise UsageError(f"{name}: expected an integer, got {type(value).__name__}")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise UsageError(
                f"temperature: must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p: must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k < TOP_K_LIMIT:
            raise UsageError(f"top_k: must be in [0, 2**31) (0: off), got {_show(self.top_k)}")
        if not 0.0 <= self.min_p < 1.0:
            raise UsageError(f"min_p: must be in [0, 1), got {self.min_p}")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise UsageError(f"seed: must be in [0, 2**64), got {_show(self.seed)}")
        return self

    @classmethod
    def from_fields(
        cls, fields: Mapping[str, Any], base: SamplingParams | None = None
    ) -> SamplingParams:
        """Settings from a request's fields (JSON values, named as in SAMPLING_FIELDS; a field
        that is missing or null keeps `base`'s value), validated. Other keys are not looked at."""
        base = base or cls()
        values = {
            name: fields[name] if fields.get(name) is not None else getattr(base, name)
            for name in SAMPLING_FIELDS
        }
        return cls(**values).validate()

    def sampler(self) -> Callable[[mx.array], mx.array]:
        """A function of log-probabilities [B, vocab] -> token ids [B] (mlx-lm's samplers)."""
        self.validate()
        made: dict[int, Callable[[mx.array], mx.array]] = {}

        def sample(logprobs: mx.array) -> mx.array:
            vocab = logprobs.shape[-1]
            if vocab not in made:
                # mlx-lm refuses top_k >= vocab; keeping the k likeliest of fewer is keeping all.
                top_k = self.top_k if self.top_k < vocab else 0
                made[vocab] = make_sampler(
                    temp=self.temperature_used, top_p=self.top_p, min_p=self.min_p, top_k=top_k
                )
            return made[vocab](logprobs)

        return sample


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_tokens: int = 0
    generation_seconds: float = 0.0
    peak_memory_bytes: int = 0
    finish_reason: str | None = None

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_seconds if self.generation_seconds else 0.0

    def summary(self) -> str:
        return (
            f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tokens/s | "
            f"generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tokens/s | "
            f"peak memory: {self.peak_memory_bytes / 1e9:.2f} GB"
        )


@dataclass
class GenerationResult:
    tokens: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)


def default_prefill_chunk() -> int:
    """Prompt tokens per forward pass on this machine's default device."""
    return CPU_PREFILL_CHUNK if mx.default_device() == mx.cpu else PREFILL_CHUNK


def prefill(
    model: Any, tokens: Sequence[int], cache: list[Any], chunk: int | None = None
) -> mx.array:
    """Run `tokens` through the model into `cache`; return the logits of the last one [vocab].

    Only the last chunk projects to the vocabulary, and only for its last position.
    """
    if not tokens:
        raise UsageError("the prompt is empty")
    # MLX does not bounds-check the embedding lookup: an id past it reads stray memory or crashes
    # (a tokenizer that does not belong to the model, or ids passed in by a caller).
    vocab = getattr(model.config, "vocab_size", None)  # test doubles may not declare one
    bad = next((t for t in tokens if not 0 <= t < vocab), None) if vocab else None
    if bad is not None:
        raise UsageError(
            f"token id {bad} is outside the model's vocabulary (0..{vocab - 1}); "
            "the tokenizer does not belong to this model"
        )
    return prefill_ids(model, mx.array(list(tokens), dtype=mx.uint32)[None], cache, chunk)[0]


def prefill_ids(model: Any, ids: mx.array, cache: list[Any], chunk: int | None = None) -> mx.array:
    """`prefill` for an id array [batch, T] of equal-length rows; returns logits [batch, vocab].

    `chunk`: prompt tokens per forward pass (default: `default_prefill_chunk()`)."""
    chunk = chunk or default_prefill_chunk()
    T = ids.shape[1]
    start = 0
    while T - start > chunk:
        model.hidden(ids[:, start : start + chunk], cache)
        mx.eval([c.state for c in cache])
        start += chunk
    return model(ids[:, start:], cache=cache, last_only=True)[:, -1]


def _check_finite(ok: bool) -> None:
    if not ok:
        raise NonFiniteLogitsError(
            "the model produced non-finite logits (NaN or inf); the weights may be corrupt: "
            "run `gptoss-mlx verify` on the model folder"
        )


def generate_tokens(
    model: Any,
    prompt: Sequence[int],
    *,
    max_tokens: int,
    stop_ids: Sequence[int] = (),
    sampling: SamplingParams | None = None,
    cache: list[Any] | None = None,
    max_context: int | None = None,
    stats: GenerationStats | None = None,
    on_prefilled: Callable[[], None] | None = None,
    constraint: Any = None,
) -> Iterator[int]:
    """Yield sampled token ids after `prompt`, at most `max_tokens`, stopping after a stop id
    (which is yielded) or when the sequence would pass `max_context` tokens.

    `constraint`: a `TokenConstraint` (engine/constraints) whose grammar every token must follow:
    each step's logits are masked to what it allows and it advances with each token; a complete
    grammar ends the sequence ("stop"). It is closed when decoding ends.

    `stats` (if given) is filled in as generation runs; its `finish_reason` ends as "stop" or
    "length". Pass `cache` to continue from (and keep) a cache: `prompt` is then only the tokens
    after what the cache holds; `on_prefilled` runs once the prompt is in the cache (before the
    first token is sampled), e.g. to checkpoint it. Afterwards `cache[i].offset` says how many
    tokens the cache holds (the last yielded token is usually not fed back).
    """
    if max_tokens < 1:
        raise UsageError(f"max_tokens must be at least 1, got {max_tokens}")
    sampling = sampling or SamplingParams()
    sampler = sampling.sampler()
    stats = stats if stats is not None else GenerationStats()
    stop = set(stop_ids)
    cache = cache if cache is not None else model.make_cache()
    already = cache[0].offset if cache else 0
    limit = max_context or model.config.max_position_embeddings
    room = room_to_generate(already + len(prompt), limit, conversation=already > 0)
    budget = min(max_tokens, room)
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    mx.reset_peak_memory()

    def step(logits: mx.array) -> tuple[mx.array, mx.array]:
        ok = mx.isfinite(logits).all()  # before masking, which writes -inf on purpose
        if constraint is not None:
            from .constraints import mask_logits

            logits = mask_logits(logits[None], [(constraint, 0)])[0]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        # A sharded model: every rank takes rank 0's token (engine/distributed.py).
        return agree_on_tokens(model, sampler(logprobs[None])[0], ok)

    t0 = time.perf_counter()
    stats.prompt_tokens = len(prompt)
    logits = prefill(model, prompt, cache)
    y, ok = step(logits)
    mx.eval(y, ok)
    stats.prompt_seconds = time.perf_counter() - t0
    if on_prefilled is not None:
        on_prefilled()
    t1 = time.perf_counter()
    stats.finish_reason = "length"
    n = 0
    decoder = None
    try:
        while True:
            _check_finite(ok.item())
            token = y.item()
            if constraint is not None:
                constraint.advance(token)  # ConstraintError if the grammar refuses it
            n += 1
            complete = constraint is not None and constraint.done
            last = token in stop or n >= budget or complete
            if not last:
                # Build and launch the next step before handing this token out, so the device
                # works while the caller streams text.
                decoder = decoder or start_decoder(model, cache, COMPILE_DECODE)
                logits = decoder.step(y.reshape(1))[0]
                if constraint is not None:
                    # The forward pass runs while the host computes the grammar's mask.
                    mx.async_eval(logits)
                next_y, next_ok = step(logits)
                mx.async_eval(next_y, next_ok)
            stats.generation_tokens = n
            stats.generation_seconds = time.perf_counter() - t1
            if token in stop or complete:
                # Set before yielding: a caller may stop consuming at the stop token.
                stats.finish_reason = "stop"
            yield token
            if last:
                break
            y, ok = next_y, next_ok
    finally:
        if decoder is not None:
            decoder.finish()  # the caller's cache now holds every token fed back
        if constraint is not None:
            constraint.close()
        stats.generation_seconds = time.perf_counter() - t1
        stats.peak_memory_bytes = mx.get_peak_memory()


def generate(
    model: Any,
    prompt: Sequence[int],
    *,
    max_tokens: int,
    stop_ids: Sequence[int] = (),
    sampling: SamplingParams | None = None,
    max_context: int | None = None,
) -> GenerationResult:
    """Run `generate_tokens` to the end and return the tokens with their stats."""
    res = GenerationResult()
    res.tokens = list(
        generate_tokens(
            model,
            prompt,
            max_tokens=max_tokens,
            stop_ids=stop_ids,
            sampling=sampling,
            max_context=max_context,
            stats=res.stats,
        )
    )
    return res
