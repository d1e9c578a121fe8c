"""The engine thread behind the OpenAI-compatible server: requests in through a queue, tokens out
through one `RequestHandle` each.

One thread owns MLX and runs the continuous-batching engine (batching.py): up to
`max_concurrency` sequences decode together, more wait in a FIFO queue of `max_queue`, and
`submit` refuses the next one with `Busy` (the server's 503). The server's event loop never
touches MLX: it submits, then reads its handle's events (`async for`), and cancels it when the
client goes away; the sequence then leaves the batch before the next forward pass.

Each prompt goes through the prompt store (prompt_store.py): the longest stored prefix is
restored and only the rest prefilled, which is what lets a chat's next turn, resent whole by the
client, start at once; `Finished.cached_tokens` says how much was reused.

Failures stay as small as they can: a sequence whose logits go non-finite fails alone; an
unexpected exception in the engine fails every request in flight or queued with
`EngineFailure` (logged with its traceback), and the thread starts a fresh batch, so the server
keeps serving.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from ..errors import GptOssError, UsageError
from ..harmony.parser import HarmonyIds
from .batching import BatchEngine, BatchRequest, BatchResult
from .chat import harmony_ids
from .generate import ContextLimitError, SamplingParams
from .prompt_store import PromptStore
from .request_stream import Event, Failed, Finished, RequestHandle, TokenEvent

__all__ = [
    "Busy",
    "ContextLengthExceeded",
    "EngineFailure",
    "Event",
    "Failed",
    "Finished",
    "GenerationRequest",
    "RequestHandle",
    "Scheduler",
    "SchedulerClosed",
    "TokenEvent",
]

log = logging.getLogger(__name__)

# The prompt store's default budget: about 40k tokens of conversations for gpt-oss-20b (24 KiB
# per token in its full-attention layers, in bf16), plus their sliding-window checkpoints.
DEFAULT_PROMPT_CACHE_BYTES = 1 << 30

# After this many engine failures in a row with no request finishing in between, the failure is
# taken to be permanent: the thread stops and `submit` says why, instead of failing forever.
MAX_CONSECUTIVE_FAILURES = 3


class Busy(GptOssError):
    """Every slot and queue place is taken: the server answers 503 with Retry-After."""


class ContextLengthExceeded(ContextLimitError):
    """The prompt (plus one token to generate) does not fit the context limit."""


class EngineFailure(GptOssError):
    """The engine thread hit an unexpected error; the requests it was running failed with it."""


class SchedulerClosed(GptOssError):
    """The scheduler is shut down (or was never able to run): the request was not completed."""


@dataclass
class GenerationRequest:
    """One completion to generate. `prompt`: harmony-rendered token ids (render_prompt);
    `sampling` is validated by `submit`. `stop_ids` default to harmony's (<|return|>, <|call|>,
    <|endoftext|>). `constraint`: issue 13's per-sequence token constraint, passed through to the
    engine once it takes one. `id` names the request in the log (one is made up if None)."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: tuple[int, ...] | None = None
    constraint: Any = None
    id: str | None = None


@dataclass
class _Job:
    key: int
    request: GenerationRequest
    handle: RequestHandle
    submitted: float
    first_token: float | None = None
    last_token: float | None = None


class Scheduler:
    """Continuous batching on a thread of its own, for many concurrent clients.

    Args:
        model: a `GptOss` with its weights evaluated (`load_model` does so): MLX cannot
            evaluate a graph built on another thread, and every stream is per thread.
        tokenizer: the model's tokenizer (for harmony's stop ids); None uses o200k_harmony's.
        max_context: the most tokens (prompt + generated) one sequence may hold.
        max_concurrency: the most sequences decoding together.
        max_queue: the most requests waiting for a slot; `submit` raises `Busy` beyond.
        prompt_cache_bytes: the budget of the cross-request prompt store (prompt_store.py):
            KV snapshots of recent prompts' ends, reused by later prompts that start with one
            (0: no store).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        max_context: int,
        max_concurrency: int = 4,
        max_queue: int = 64,
        prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
    ):
        if max_concurrency < 1:
            raise UsageError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_queue < 0:
            raise UsageError(f"max_queue must be >= 0, got {max_queue}")
        if max_context < 2:
            raise UsageError(f"max_context must be >= 2, got {max_context}")
        if prompt_cache_bytes < 0:
            raise UsageError(f"prompt_cache_bytes must be >= 0, got {prompt_cache_bytes}")
        self.model = model
        self.max_context = max_context
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        ids = harmony_ids(tokenizer) if tokenizer is not None else HarmonyIds()
        store = PromptStore(prompt_cache_bytes, message_start=ids.start)
        self.store = store if prompt_cache_bytes else None
        self.stop_ids = (ids.return_, ids.call, ids.endoftext)
        self._vocab = model.config.vocab_size
        self._lock = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._active: dict[int, _Job] = {}  # by _Job.key
        self._closing = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._failures = 0  # engine failures, all told
        self._failures_in_a_row = 0
        self._last_failure: str | None = None
        self._dead: EngineFailure | None = None

    # ------------------------------------------------------------------ the server's side

    def start(self) -> None:
        """Start the engine thread; from then on it alone uses MLX."""
        with self._lock:
            if self._thread is not None or self._closing:
                raise SchedulerClosed("the scheduler was already started (or closed)")
            self._thread = threading.Thread(target=self._serve, name="gptoss-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the engine thread: running and queued requests fail with `SchedulerClosed`
        (running ones after the step in progress); then join it."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._fail_all(
            SchedulerClosed("the server is shutting down; the request was not completed")
        )

    def __enter__(self) -> Scheduler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, req: GenerationRequest) -> RequestHandle:
        """Queue `req`; returns at once. Raises `ContextLengthExceeded` or `UsageError` for a
        request that cannot run, `Busy` when the queue is full, `SchedulerClosed` after close
        (`EngineFailure` once the engine has failed for good)."""
        self._check(req)
        with self._lock:
            if self._dead is not None:
                raise self._dead
            if self._closing:
                raise SchedulerClosed("the server is shutting down")
            if len(self._active) + len(self._queue) >= self.max_concurrency + self.max_queue:
                raise Busy(
                    f"the server is busy: {len(self._active)} requests are generating and "
                    f"{len(self._queue)} are queued (the most: {self.max_queue}); retry later"
                )
            key = next(self._ids)  # the engine's own id: a client's ids need not be unique
            rid = req.id if req.id is not None else f"req-{key}"
            job = _Job(key, req, RequestHandle(rid, self._cancel), time.perf_counter())
            self._queue.append(job)
            self._lock.notify_all()
        return job.handle

    @property
    def stats(self) -> dict[str, Any]:
        """active/queued sequences, the prompt store's entries and bytes, engine failures."""
        store = self.store
        return {
            "active": len(self._active),
            "queued": len(self._queue),
            "cached_entries": len(store) if store is not None else 0,
            "cached_bytes": store.nbytes if store is not None else 0,
            "engine_failures": self._failures,
            "last_engine_failure": self._last_failure,
            "running": self._thread is not None and self._thread.is_alive(),
        }

    def _check(self, req: GenerationRequest) -> None:
        prompt = req.prompt
        if not prompt:
            raise UsageError("the prompt is empty")
        if req.max_tokens < 1:
            raise UsageError(f"max_tokens must be >= 1, got {req.max_tokens}")
        req.sampling.validate()
        if req.constraint is not None and "constraint" not in BatchRequest.__dataclass_fields__:
            # Until issue 13 gives the engine constraints: refuse rather than ignore one.
            raise UsageError("token constraints are not supported by this engine yet")
        seed = req.sampling.seed
        if seed is not None and not 0 <= seed < 2**64:
            raise UsageError(f"seed must be in [0, 2**64), got {seed}")
        if len(prompt) + 1 > self.max_context:
            raise ContextLengthExceeded(
                f"the prompt has {len(prompt)} tokens; with at least one to generate it does "
                f"not fit the context limit of {self.max_context} tokens"
            )
        bad = next((t for t in prompt if not 0 <= t < self._vocab), None)
        if bad is not None:
            raise UsageError(f"token id {bad} is outside the model's vocabulary")

    def _cancel(self, handle: RequestHandle) -> None:
        # A queued request leaves at once; a running one is seen by the engine at its next step.
        with self._lock:
            job = next((j for j in self._queue if j.handle is handle), None)
            if job is not None:
                self._queue.remove(job)
        if job is not None:
            job.handle.push(self._finished(job, "cancelled", 0, 0))

    # ------------------------------------------------------------------ the engine thread

    def _serve(self) -> None:
        try:
            self._serve_until_closed()
        finally:
            # MLX's streams are per thread and must be destroyed by their thread before the
            # interpreter shuts down (mlx#3126): otherwise the process aborts at exit.
            mx.clear_streams()

    def _serve_until_closed(self) -> None:
        while True:
            with self._lock:
                if self._closing:
                    return
            engine = BatchEngine(
                self.model,
                batch_size=self.max_concurrency,
                stop_ids=self.stop_ids,
                max_context=self.max_context,
                prompt_store=self.store,
            )
            try:
                for result in engine.run(self._admit()):
                    self._finish(result)
            except Exception as e:  # noqa: BLE001 - reported to every request it touched
                log.exception("the engine failed; failing the requests in flight and queued")
                self._failures += 1
                if self.store is not None:
                    self.store.clear()  # it may hold what the failure left half-made
                self._failures_in_a_row += 1
                self._last_failure = f"{type(e).__name__}: {e}"
                failure = EngineFailure(
                    f"the engine failed ({self._last_failure}); the request was not completed"
                )
                if self._failures_in_a_row >= MAX_CONSECUTIVE_FAILURES:
                    with self._lock:
                        self._dead = EngineFailure(
                            f"the engine stopped after {self._failures_in_a_row} failures in a "
                            f"row (last: {self._last_failure}); restart the server"
                        )
                    self._fail_all(failure)
                    return
                self._fail_all(failure)

    def _admit(self) -> Iterator[BatchRequest | None]:
        """The engine's request source: the next queued request while a slot is free, None
        when there is none but sequences are running, blocking while there are neither."""
        while True:
            with self._lock:
                while True:
                    if self._closing and not self._active:
                        return
                    job = self._queue.popleft() if self._queue and not self._closing else None
                    if job is not None or self._active:
                        break
                    self._lock.wait()
                if job is not None:
                    self._active[job.key] = job
            yield self._batch_request(job) if job is not None else None

    def _batch_request(self, job: _Job) -> BatchRequest:
        req, handle = job.request, job.handle

        def on_token(token: int) -> None:
            now = time.perf_counter()
            if job.first_token is None:
                job.first_token = now
            job.last_token = now
            handle.push(TokenEvent(token))

        extra = {"constraint": req.constraint} if req.constraint is not None else {}
        return BatchRequest(
            req.prompt,
            max_tokens=req.max_tokens,
            sampling=req.sampling,
            id=job.key,
            stop_ids=req.stop_ids,
            on_token=on_token,
            cancelled=lambda: handle.cancelled or self._closing,
            **extra,
        )

    def _finish(self, result: BatchResult) -> None:
        with self._lock:
            job = self._active.pop(result.id)
        self._failures_in_a_row = 0
        if result.finish_reason == "error":
            error = result.exception or GptOssError(result.error or "generation failed")
            job.handle.push(Failed(error))
        elif result.finish_reason == "cancelled" and not job.handle.cancelled:
            job.handle.push(Failed(SchedulerClosed("the server is shutting down")))
        else:
            job.handle.push(
                self._finished(
                    job, result.finish_reason, result.completion_tokens, result.cached_tokens
                )
            )

    @staticmethod
    def _finished(job: _Job, reason: str, completion: int, cached: int) -> Finished:
        ttft = (job.first_token - job.submitted) if job.first_token is not None else 0.0
        span = (job.last_token - job.first_token) if job.first_token is not None else 0.0
        tps = (completion - 1) / span if completion > 1 and span > 0 else 0.0
        return Finished(reason, len(job.request.prompt), cached, completion, ttft, tps)

    def _fail_all(self, error: GptOssError) -> None:
        with self._lock:
            jobs = [*self._active.values(), *self._queue]
            self._active.clear()
            self._queue.clear()
        for job in jobs:
            job.handle.push(Failed(error))
