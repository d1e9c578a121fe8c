"""The server's engine thread (engine/scheduler.py) against the single-sequence engine: streams of
concurrent clients (threads and asyncio tasks) equal `generate_tokens`' greedy output; a cancel
frees its slot within one step; a full queue is `Busy`; `close()`, a NaN in one sequence and an
exception in the engine each end exactly the requests they should, with an error, never a hang.

The model is tiny and random, its sliding window (8) shorter than most prompts, and its matmuls
split over two CPU streams, as `load_model` does on a CPU: the references run on the main thread
first, so the engine thread must make its own streams (MLX streams are per thread).
"""

from __future__ import annotations

import asyncio
import threading
import time

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_tiny_config
from gptoss_mlx.convert.synthetic import random_model
from gptoss_mlx.engine.generate import NonFiniteLogitsError, SamplingParams, generate_tokens
from gptoss_mlx.engine.scheduler import (
    Busy,
    ContextLengthExceeded,
    EngineFailure,
    Failed,
    Finished,
    GenerationRequest,
    Scheduler,
    SchedulerClosed,
    TokenEvent,
)
from gptoss_mlx.errors import UsageError
from gptoss_mlx.harmony.render import render_prompt
from gptoss_mlx.harmony.request import parse_chat_request
from gptoss_mlx.model.cpu_streams import shard_model, threads_of
from scripted_chat import DATE, make_tokenizer

VOCAB = 1024
GREEDY = SamplingParams(temperature=0.0)
LENGTHS = [3, 40, 7, 9, 17, 25]
MAX_TOKENS = [12, 5, 9, 14, 3, 10]
CONTEXT = 256
TIMEOUT = 30.0  # seconds: generous for 2 busy cores, reached only if something hangs


def tiny_model(seed: int = 0):
    cfg = make_tiny_config(
        num_hidden_layers=2, head_dim=64, num_local_experts=8, sliding_window=8, vocab_size=VOCAB
    )
    model = random_model(cfg, seed)
    shard_model(model, 2)  # the vocabulary projection on two CPU streams
    assert threads_of(model) == 2
    return model


def prompts_of(lengths: list[int], seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return prompts_of(LENGTHS)


@pytest.fixture(scope="module")
def refs(model, prompts) -> list[list[int]]:
    """The single-sequence engine's greedy tokens, computed on the main thread."""
    return [
        list(generate_tokens(model, p, max_tokens=n, sampling=GREEDY))
        for p, n in zip(prompts, MAX_TOKENS, strict=True)
    ]


def request(prompt, max_tokens, **kw) -> GenerationRequest:
    return GenerationRequest(list(prompt), max_tokens, GREEDY, stop_ids=(), **kw)


def drain(handle) -> tuple[list[int], Finished | Failed]:
    events = list(handle)
    assert all(isinstance(e, TokenEvent) for e in events[:-1])
    return [e.token for e in events[:-1]], events[-1]


def wait_until(condition, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


class Recorder:
    """Wraps the model: counts decode passes (the batch's one-token forward calls) and runs
    `hook(n)` while pass n is being built, on the engine thread. `fail_from` makes pass n >= it
    raise, as an unexpected engine error would."""

    def __init__(self, model):
        self.model, self.config = model, model.config
        self.passes = 0
        self.hook = None
        self.fail_from: int | None = None

    def make_cache(self):
        return self.model.make_cache()

    def hidden(self, tokens, cache=None):
        return self.model.hidden(tokens, cache)

    def __call__(self, tokens, cache=None, last_only=False):
        if not last_only:  # prefill's last chunk asks for the last position only
            self.passes += 1
            if self.hook is not None:
                self.hook(self.passes)
            if self.fail_from is not None and self.passes >= self.fail_from:
                raise RuntimeError("simulated kernel failure")
        return self.model(tokens, cache=cache, last_only=last_only)


# --------------------------------------------------------------------------- greedy equality


def test_serial_and_concurrent_streams_equal_single_generation(model, prompts, refs):
    with Scheduler(model, max_context=CONTEXT, max_concurrency=1) as s:
        serial = [drain(s.submit(request(p, n))) for p, n in zip(prompts, MAX_TOKENS, strict=True)]
    for (tokens, end), ref, p in zip(serial, refs, prompts, strict=True):
        assert tokens == ref
        assert isinstance(end, Finished) and end.finish_reason == "length"
        assert (end.prompt_tokens, end.completion_tokens) == (len(p), len(ref))
        assert end.cached_tokens == 0

    # Six clients at once, each on its own thread, four decoding together.
    got: dict[int, tuple] = {}
    with Scheduler(model, max_context=CONTEXT, max_concurrency=4) as s:
        barrier = threading.Barrier(len(prompts))

        def client(i: int) -> None:
            barrier.wait()
            # The same id for all: ids name requests in the log, the engine keys its own.
            got[i] = drain(s.submit(request(prompts[i], MAX_TOKENS[i], id="client")))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert s.stats["active"] == 0 and s.stats["queued"] == 0
    assert [got[i][0] for i in range(len(prompts))] == refs
    assert all(got[i][1].finish_reason == "length" for i in got)


def test_asyncio_clients(model, prompts, refs):
    async def main(s: Scheduler) -> list[list[int]]:
        async def client(p, n) -> list[int]:
            handle = s.submit(request(p, n))  # bound to this loop
            tokens = []
            async for ev in handle:
                if isinstance(ev, TokenEvent):
                    tokens.append(ev.token)
                else:
                    assert isinstance(ev, Finished) and ev.finish_reason == "length"
            return tokens

        return await asyncio.gather(
            *(client(p, n) for p, n in zip(prompts, MAX_TOKENS, strict=True))
        )

    with Scheduler(model, max_context=CONTEXT, max_concurrency=3) as s:
        assert asyncio.run(main(s)) == refs


def test_finished_figures(model, prompts, refs):
    with Scheduler(model, max_context=CONTEXT) as s:
        _, end = drain(s.submit(request(prompts[0], MAX_TOKENS[0])))
    assert end.ttft_s > 0 and end.decode_tps > 0
    line = end.summary()
    assert line.startswith(f"prompt={LENGTHS[0]} cached=0 completion={MAX_TOKENS[0]} ttft=")
    assert line.endswith("finish=length")


def test_stop_ids_end_with_stop(model, prompts, refs):
    stop = refs[0][4]
    with Scheduler(model, max_context=CONTEXT) as s:
        req = GenerationRequest(prompts[0], 12, GREEDY, stop_ids=(stop,))
        tokens, end = drain(s.submit(req))
    assert tokens == refs[0][: refs[0].index(stop) + 1]
    assert end.finish_reason == "stop"


# --------------------------------------------------------------------------- slots and queue


def test_cancel_frees_the_slot_within_one_step(model, prompts, refs):
    rec = Recorder(model)
    with Scheduler(rec, max_context=CONTEXT, max_concurrency=2) as s:
        cancel_at = 4
        long = s.submit(request(prompts[1], 100))
        other = s.submit(request(prompts[3], 40))
        queued = s.submit(request(prompts[0], MAX_TOKENS[0]))
        # Cancelled while decode pass 4 is being built: pass 4 still holds the row, and the
        # token it samples is never handed out; the row is gone from pass 5 on.
        rec.hook = lambda n: long.cancel() if n == cancel_at else None
        tokens, end = drain(long)
        assert isinstance(end, Finished) and end.finish_reason == "cancelled"
        assert len(tokens) == cancel_at == end.completion_tokens
        # Its slot went to the queued request, which finishes while `other` still decodes.
        q_tokens, q_end = drain(queued)
        assert q_tokens == refs[0] and q_end.finish_reason == "length"
        assert not other.done
        o_tokens, o_end = drain(other)
        assert len(o_tokens) == 40 and o_end.finish_reason == "length"
        assert s.stats["active"] == 0 and s.stats["queued"] == 0


def test_cancel_from_a_client_thread_and_an_asyncio_task(model, prompts):
    with Scheduler(model, max_context=CONTEXT, max_concurrency=2) as s:
        handle = s.submit(request(prompts[2], 200))
        it = iter(handle)
        assert isinstance(next(it), TokenEvent)
        handle.cancel()
        rest = list(it)
        assert rest[-1] == Finished("cancelled", *_figures(rest[-1]))
        wait_until(lambda: s.stats["active"] == 0)

        async def disconnecting_client() -> None:
            handle = s.submit(request(prompts[2], 200))

            async def read() -> None:
                async for _ in handle:
                    pass

            task = asyncio.create_task(read())
            while s.stats["active"] == 0:
                await asyncio.sleep(0.005)
            task.cancel()  # the client went away: leaving `async for` cancels the request
            with pytest.raises(asyncio.CancelledError):
                await task
            assert handle.cancelled

        asyncio.run(disconnecting_client())
        wait_until(lambda: s.stats["active"] == 0)


def _figures(end: Finished) -> tuple:
    return (end.prompt_tokens, end.cached_tokens, end.completion_tokens, end.ttft_s, end.decode_tps)


def test_busy_when_the_queue_is_full(model, prompts, refs):
    s = Scheduler(model, max_context=CONTEXT, max_concurrency=1, max_queue=2)
    try:
        # Not started yet: nothing is admitted, so one slot + two queue places hold three.
        handles = [s.submit(request(prompts[i], MAX_TOKENS[i])) for i in range(3)]
        with pytest.raises(Busy, match="busy"):
            s.submit(request(prompts[3], MAX_TOKENS[3]))
        assert s.stats["queued"] == 3
        handles[1].cancel()  # a queued request leaves the queue at once
        assert list(handles[1]) == [Finished("cancelled", LENGTHS[1], 0, 0, 0.0, 0.0)]
        handles.append(s.submit(request(prompts[3], MAX_TOKENS[3])))
        s.start()
        for i, h in zip([0, 2, 3], [handles[0], handles[2], handles[3]], strict=True):
            tokens, end = drain(h)
            assert tokens == refs[i] and end.finish_reason == "length"
    finally:
        s.close()


def test_close_fails_running_and_queued_requests(model, prompts):
    s = Scheduler(model, max_context=CONTEXT, max_concurrency=1)
    s.start()
    running = s.submit(request(prompts[0], 200))
    queued = s.submit(request(prompts[1], 5))
    assert isinstance(next(iter(running)), TokenEvent)
    s.close()
    for handle in (running, queued):
        end = list(handle)[-1]
        assert isinstance(end, Failed) and isinstance(end.error, SchedulerClosed)
    assert (s.stats["active"], s.stats["queued"], s.stats["running"]) == (0, 0, False)
    with pytest.raises(SchedulerClosed):
        s.submit(request(prompts[0], 5))


# --------------------------------------------------------------------------- failures


def test_nan_in_one_sequence_fails_only_that_request(prompts, refs):
    poisoned = tiny_model()
    # A token in no other prompt or reference output; its embedding row NaN.
    used = {t for p, r in zip(prompts, refs, strict=True) for t in p + r}
    bad = next(t for t in range(VOCAB) if t not in used)
    emb = poisoned.model.embed_tokens.weight
    emb[bad] = mx.nan
    poisoned.model.embed_tokens.weight = emb
    mx.eval(poisoned.parameters())  # the engine thread cannot evaluate this thread's graphs
    with Scheduler(poisoned, max_context=CONTEXT, max_concurrency=3) as s:
        handles = [s.submit(request(p, n)) for p, n in zip(prompts, MAX_TOKENS, strict=True)]
        sick = s.submit(request([*prompts[2], bad, *prompts[3]], 8))
        tokens, end = drain(sick)
        assert tokens == [] and isinstance(end, Failed)
        assert isinstance(end.error, NonFiniteLogitsError) and "non-finite" in str(end.error)
        for h, ref in zip(handles, refs, strict=True):
            assert drain(h)[0] == ref


def test_engine_exception_fails_the_requests_then_serving_goes_on(model, prompts, refs):
    rec = Recorder(model)
    with Scheduler(rec, max_context=CONTEXT, max_concurrency=2) as s:
        rec.fail_from = 3
        handles = [s.submit(request(p, 30)) for p in prompts[:3]]  # two running, one queued
        for h in handles:
            end = list(h)[-1]
            assert isinstance(end, Failed) and isinstance(end.error, EngineFailure)
            assert "RuntimeError: simulated kernel failure" in str(end.error)
        assert s.stats["engine_failures"] == 1 and s.stats["active"] == 0
        assert "simulated kernel failure" in s.stats["last_engine_failure"]
        rec.fail_from = None  # the engine thread started a fresh batch: it serves again
        tokens, end = drain(s.submit(request(prompts[0], MAX_TOKENS[0])))
        assert tokens == refs[0] and end.finish_reason == "length"
        # A failure that persists stops the engine after three in a row, and says so.
        rec.fail_from = 0
        for _ in range(3):
            assert isinstance(list(s.submit(request(prompts[0], 5)))[-1].error, EngineFailure)
        wait_until(lambda: not s.stats["running"])
        with pytest.raises(EngineFailure, match="3 failures in a row"):
            s.submit(request(prompts[0], 5))


def test_submit_refuses_what_cannot_run(model):
    s = Scheduler(model, max_context=20)
    with pytest.raises(ContextLengthExceeded, match="context limit of 20"):
        s.submit(request(range(20), 5))
    assert issubclass(ContextLengthExceeded, UsageError)
    s.submit(request(range(19), 5))  # 19 + 1 fits
    for bad, match in [
        (request([], 5), "empty"),
        (request([1, VOCAB], 5), "outside the model's vocabulary"),
        (request([1, 2], 0), "max_tokens"),
        (GenerationRequest([1, 2], 5, SamplingParams(temperature=-1.0)), "temperature"),
    ]:
        with pytest.raises(UsageError, match=match):
            s.submit(bad)
    with pytest.raises(UsageError, match="max_concurrency"):
        Scheduler(model, max_context=20, max_concurrency=0)
    s.close()


# --------------------------------------------------------------------------- the prompt store


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A random model with the real vocabulary size (harmony's ids are ~200k) and a tokenizer:
    o200k_harmony if its vocabulary is here, else a synthetic byte-level one."""
    tok = make_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    cfg = make_tiny_config(num_hidden_layers=2, sliding_window=8, vocab_size=201088)
    return random_model(cfg, 0), tok


def test_a_chat_turn_prefills_only_its_new_messages(chat_model):
    model, tok = chat_model

    def prompt(messages) -> list[int]:
        return render_prompt(parse_chat_request({"messages": messages}), tok, date=DATE)

    turns = [[{"role": "user", "content": "What is the capital of France?"}]]
    answer = {"role": "assistant", "reasoning": "The user asks about France.", "content": "Paris."}
    turns.append([*turns[0], answer, {"role": "user", "content": "And of Italy?"}])
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    turns.append(
        [
            *turns[1],
            {"role": "assistant", "reasoning": "Look it up.", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "Rome"},
        ]
    )
    prompts = [prompt(m) for m in turns]
    stops = Scheduler(model, tok, max_context=CONTEXT).stop_ids
    with Scheduler(model, tok, max_context=4096, max_concurrency=2) as s:
        for i, p in enumerate(prompts):
            tokens, end = drain(s.submit(GenerationRequest(p, 6, GREEDY)))
            fresh = list(generate_tokens(model, p, max_tokens=6, sampling=GREEDY, stop_ids=stops))
            assert tokens == fresh
            # Harmony drops turn 1's reasoning after its final answer, yet each prompt starts
            # with the previous one: all of it comes from the store.
            assert end.cached_tokens == (len(prompts[i - 1]) if i else 0)
            assert end.prompt_tokens == len(p)
        # Regenerating the last answer: the whole prompt is stored, its last logits too.
        tokens, end = drain(s.submit(GenerationRequest(prompts[-1], 6, GREEDY)))
        assert tokens == fresh and end.cached_tokens == len(prompts[-1])
        assert s.stats["cached_entries"] == 1  # one conversation, one entry
        assert 0 < s.stats["cached_bytes"] <= s.store.max_bytes
