"""Cache reuse across turns: a turn that restores a checkpoint and prefills only its new tokens
must see exactly the logits of a fresh prefill of the same prompt."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import RotatingKVCache

from conftest import make_tiny_config
from gptoss_mlx import load_model
from gptoss_mlx.convert.convert import convert
from gptoss_mlx.convert.synthetic import write_hf_checkpoint
from gptoss_mlx.engine.chat import ChatSession
from gptoss_mlx.engine.generate import SamplingParams, prefill
from gptoss_mlx.engine.prompt_cache import PromptCache
from gptoss_mlx.harmony.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pc")
    # window 8: the sliding layers' rotating buffers wrap many times within a turn
    cfg = make_tiny_config(num_hidden_layers=4, sliding_window=8, vocab_size=201088)
    src = write_hf_checkpoint(root / "hf", cfg, seed=3)  # with a synthetic byte-level tokenizer
    out = root / "mlx"
    convert(src, out, recipe="mxfp4-bf16", dtype="float32", progress=False)
    return out


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir, dtype=mx.float32)


def ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 5000, n).tolist()


def fresh_last_logits(model, prompt):
    return prefill(model, prompt, model.make_cache())


def turn(model, pc: PromptCache, prompt, generated):
    """One chat turn through the PromptCache; returns (reused, last prompt logits)."""
    reused = pc.prepare(prompt)
    logits = prefill(model, prompt[reused:], pc.cache)
    mx.eval(logits)
    pc.checkpoint(prompt)
    # the model "generates": its tokens go into the cache (all but the last one)
    for t in generated[:-1]:
        model(mx.array([[t]]), cache=pc.cache)
    pc.record(generated)
    return reused, logits


def close(a, b):
    return mx.abs(a - b).max().item() <= 1e-5 * max(1.0, mx.abs(b).max().item())


def test_reuse_after_dropped_reasoning_matches_fresh_prefill(model):
    pc = PromptCache(model)
    p1 = ids(40, 0)
    analysis_and_final = ids(30, 1)
    reused, _ = turn(model, pc, p1, analysis_and_final)
    assert reused == 0
    # Turn 2: the analysis is dropped, the final kept, then the new user message.
    p2 = p1 + ids(12, 2) + ids(9, 3)
    reused, logits = turn(model, pc, p2, ids(20, 4))
    assert reused == len(p1)
    assert close(logits, fresh_last_logits(model, p2))
    # Turn 3 continues a prompt that extends what the cache holds exactly.
    p3 = p2 + ids(15, 5)
    reused, logits = turn(model, pc, p3, ids(5, 6))
    assert reused == len(p2)
    assert close(logits, fresh_last_logits(model, p3))


def test_divergence_before_the_last_checkpoint_restores_an_earlier_one(model):
    pc = PromptCache(model)
    p1 = ids(30, 10)
    turn(model, pc, p1, ids(10, 11))
    p2 = p1 + ids(25, 12)  # an open tool loop: reasoning and call kept
    turn(model, pc, p2, ids(10, 13))
    # The loop finished: its reasoning (inside p2) is dropped, so p3 leaves p2 early.
    p3 = p1 + ids(5, 14) + ids(20, 15)
    reused, logits = turn(model, pc, p3, ids(4, 16))
    assert reused == len(p1)
    assert close(logits, fresh_last_logits(model, p3))


def test_a_prompt_differing_at_the_start_starts_over(model):
    pc = PromptCache(model)
    p1 = ids(30, 20)
    turn(model, pc, p1, ids(10, 21))
    p2 = [p1[0] + 1] + p1[1:] + ids(10, 22)  # e.g. /effort changed the system message
    reused, logits = turn(model, pc, p2, ids(3, 23))
    assert reused == 0
    assert close(logits, fresh_last_logits(model, p2))


def test_interrupted_step_is_repaired_by_a_checkpoint(model):
    pc = PromptCache(model)
    p1 = ids(30, 30)
    turn(model, pc, p1, ids(10, 31))
    # Ctrl-C between layers: only half of the layers took the next token.
    half = len(pc.cache) // 2
    x = mx.array([[7]])
    for c in pc.cache[:half]:
        c.update_and_fetch(mx.zeros((1, 2, 1, 16)), mx.zeros((1, 2, 1, 16)))
    assert len({c.offset for c in pc.cache}) == 2
    p2 = p1 + ids(9, 32) + ids(9, 33)
    reused, logits = turn(model, pc, p2, ids(3, 34))
    assert reused == len(p1)
    assert close(logits, fresh_last_logits(model, p2))
    del x


@pytest.mark.parametrize("effort_change", [False, True])
def test_chat_session_reuse_gives_the_same_conversation(model_dir, effort_change):
    """Greedy multi-turn chats with and without reuse produce the same answers, and turns after
    the first reuse the cache."""
    model = load_model(model_dir, dtype=mx.float32)
    tok = load_tokenizer(model_dir)
    transcripts = []
    reused = []
    for reuse in (True, False):
        s = ChatSession(
            model,
            tok,
            sampling=SamplingParams(temperature=0),
            max_tokens=12,
            date="2026-01-01",
            reuse_cache=reuse,
        )
        outs = []
        for i, text in enumerate(["hello", "tell me more", "and then?", "thanks"]):
            if effort_change and i == 2:
                s.reasoning_effort = "high"
            r = s.send(text)
            outs.append(r.tokens)
            if reuse:
                reused.append(r.reused_tokens)
        transcripts.append(outs)
    assert transcripts[0] == transcripts[1]
    assert reused[0] == 0 and reused[1] > 0 and reused[3] > 0
    assert (reused[2] == 0) == effort_change


def test_checkpoints_hold_only_the_window_in_order_and_restore_exactly(model):
    """After a chunked prefill a sliding layer holds window - 1 + last chunk tokens (mlx-lm keeps
    them so each new token sees a whole window); a checkpoint keeps only the last window, oldest
    first, and a turn restored from it sees a fresh prefill's logits. Also after a one-token
    prefill into a ring buffer that has wrapped."""
    window = model.config.sliding_window
    pc = PromptCache(model)

    def prefill_and_check(prompt: list[int], chunk: int) -> list[int]:
        reused = pc.prepare(prompt)
        prefill(model, prompt[reused:], pc.cache, chunk=chunk)
        held = [c.keys.shape[2] for c in pc.cache if isinstance(c, RotatingKVCache)]
        pc.checkpoint(prompt)
        fresh = model.make_cache()
        prefill(model, prompt, fresh, chunk=len(prompt))  # one pass: every key, in order
        assert pc.checkpoints[-1].position == len(prompt)
        for i, state in pc.checkpoints[-1].rotating.items():
            keys, values, offset = state[:3]
            assert keys.shape[2] == values.shape[2] == window and offset == len(prompt)
            assert mx.allclose(keys, fresh[i].keys[..., -window:, :], atol=1e-5).item()
            assert mx.allclose(values, fresh[i].values[..., -window:, :], atol=1e-5).item()
        return held

    def decode(tokens: list[int]) -> None:
        for t in tokens[:-1]:  # as generation feeds them back: all but the last
            model(mx.array([[t]]), cache=pc.cache)
        pc.record(tokens)

    p1 = ids(45, 50)
    held = prefill_and_check(p1, chunk=16)  # chunks of 16, 16, 13
    assert held and all(n == window - 1 + 13 for n in held)  # the situation: more than the window
    decode(ids(12, 51))  # the ring wraps
    p2 = pc.tokens + ids(1, 52)
    prefill_and_check(p2, chunk=16)  # a one-token prefill into the wrapped ring
    decode(ids(5, 53))
    # Restored from each checkpoint (the generated tokens dropped, as harmony drops reasoning).
    for base, seed in ((p2, 54), (p1, 55)):
        prompt = base + ids(20, seed)
        assert pc.prepare(prompt) == len(base)
        logits = prefill(model, prompt[len(base) :], pc.cache, chunk=16)
        assert close(logits, fresh_last_logits(model, prompt))
        pc.tokens = list(prompt)  # what the cache now holds, for the next prepare
