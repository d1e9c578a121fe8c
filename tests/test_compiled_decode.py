"""The compiled decode step gives the logits of the plain one, across the sliding window's wrap
and the full buffers' growth, and hands back mlx-lm caches that continue as if never compiled."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from conftest import make_tiny_config
from gptoss_mlx.engine.generate import prefill_ids
from gptoss_mlx.model import compiled_decode
from gptoss_mlx.model.compiled_decode import CompiledDecoder
from gptoss_mlx.model.transformer import GptOss


@pytest.fixture(scope="module")
def model() -> GptOss:
    mx.random.seed(3)
    m = GptOss(make_tiny_config(num_hidden_layers=4))  # window 8: sliding layers wrap quickly
    # Random non-zero values everywhere (the initial sinks/biases are zeros or trivial).
    from mlx.utils import tree_flatten, tree_unflatten

    params = [
        (
            k,
            mx.random.normal(v.shape, dtype=v.dtype) * 0.2
            if mx.issubdtype(v.dtype, mx.floating)
            else v,
        )
        for k, v in tree_flatten(m.parameters())
    ]
    m.update(tree_unflatten(params))
    # The experts stay zero-initialised uint32/uint8 (all-zero MXFP4 weights): the MoE adds only
    # its biases, which is enough to exercise the decode path.
    mx.eval(m.parameters())
    return m


def _ids(n: int, batch: int, seed: int) -> mx.array:
    return mx.random.randint(0, 1024, (batch, n), key=mx.random.key(seed)).astype(mx.uint32)


@pytest.mark.parametrize("prompt_len", [1, 5, 8, 13, 30])
@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_steps_match_plain_steps(model, monkeypatch, prompt_len, batch):
    # Small allocation steps, so that full buffers are sometimes exactly full at the start and
    # grow several times while decoding.
    monkeypatch.setattr(compiled_decode, "GROW", 4)
    monkeypatch.setattr(KVCache, "step", 4)
    prompt, feed = _ids(prompt_len, batch, 1), _ids(20, batch, 2)
    plain, comp = model.make_cache(), model.make_cache()
    prefill_ids(model, prompt, plain, chunk=7)
    prefill_ids(model, prompt, comp, chunk=7)
    dec = CompiledDecoder.start(model, comp)
    for t in range(feed.shape[1]):
        want = model(feed[:, t : t + 1], cache=plain)[:, -1]
        got = dec.step(feed[:, t])
        assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item(), f"step {t}"
    dec.finish()
    # The handed-back caches hold the same tokens: plain decoding (and a multi-token chunk)
    # continues identically from both.
    assert [c.offset for c in comp] == [c.offset for c in plain] == [prompt_len + 20] * 4
    more = _ids(3, batch, 3)
    assert mx.allclose(model(more, cache=comp), model(more, cache=plain), atol=1e-4).item()
    one = _ids(1, batch, 4)
    assert mx.allclose(model(one, cache=comp), model(one, cache=plain), atol=1e-4).item()


def test_start_refuses_caches_at_different_offsets(model):
    cache = model.make_cache()
    model(_ids(3, 1, 0), cache=cache)
    cache[0].offset -= 1
    with pytest.raises(ValueError, match="disagree"):
        CompiledDecoder.start(model, cache)


def test_generate_tokens_is_the_same_compiled_or_not(model, monkeypatch):
    from gptoss_mlx.engine import generate as gen

    greedy = gen.SamplingParams(temperature=0.0)
    prompt = _ids(11, 1, 5)[0].tolist()
    runs = {}
    for compiled in (False, True):
        monkeypatch.setattr(gen, "COMPILE_DECODE", compiled)
        cache = model.make_cache()
        tokens = list(
            gen.generate_tokens(model, prompt, max_tokens=15, sampling=greedy, cache=cache)
        )
        runs[compiled] = (tokens, cache)
    (t0, c0), (t1, c1) = runs[False], runs[True]
    assert t1 == t0 and len(t0) == 15
    # Both caches hold the prompt and the 14 tokens fed back, and continue alike.
    assert [c.offset for c in c1] == [c.offset for c in c0] == [11 + 14] * 4
    nxt = _ids(2, 1, 6)
    assert mx.allclose(model(nxt, cache=c1), model(nxt, cache=c0), atol=1e-4).item()


def test_a_new_generation_with_the_same_shapes_replays_the_trace(model):
    prompt, feed = _ids(6, 1, 7), _ids(3, 1, 8)
    results, traces = [], []
    for _ in range(2):
        cache = model.make_cache()
        prefill_ids(model, prompt, cache)
        dec = CompiledDecoder.start(model, cache)
        results.append([dec.step(feed[:, t]) for t in range(3)])
        dec.finish()
        traces.append(dec.program.traces)
    assert traces[1] == traces[0] >= 1  # (earlier tests may have traced these shapes already)
    assert all(mx.array_equal(a, b).item() for a, b in zip(*results, strict=True))
    # While one generation is under way, another one traces its own step.
    c1, c2 = model.make_cache(), model.make_cache()
    prefill_ids(model, prompt, c1)
    prefill_ids(model, prompt, c2)
    d1, d2 = CompiledDecoder.start(model, c1), CompiledDecoder.start(model, c2)
    assert d1.program is not d2.program
    assert mx.allclose(d1.step(feed[:, 0]), d2.step(feed[:, 0])).item()
    d1.finish()
    d2.finish()


def test_a_changed_model_is_traced_again(monkeypatch):
    """A trace replays the weights and settings it met: after new weights, a changed module
    setting or a changed module-level switch, the next generation traces again and decodes what a
    plain step computes."""
    from gptoss_mlx.model import moe

    mx.random.seed(4)
    m = GptOss(make_tiny_config(num_hidden_layers=2))
    prompt, y = _ids(5, 1, 9), _ids(1, 1, 10)[:, 0]

    def both() -> tuple[mx.array, mx.array, CompiledDecoder]:
        plain, comp = m.make_cache(), m.make_cache()
        prefill_ids(m, prompt, plain)
        prefill_ids(m, prompt, comp)
        dec = CompiledDecoder.start(m, comp)
        got = dec.step(y)
        dec.finish()
        return got, m(y[:, None], cache=plain)[:, -1], dec

    got, want, first = both()
    assert mx.allclose(got, want, atol=1e-5).item()
    changes = [
        lambda: setattr(m.lm_head, "weight", m.lm_head.weight * 2),  # new weights
        lambda: setattr(m.layers[0].self_attn, "scale", m.layers[0].self_attn.scale * 3),
    ]
    for change in changes:
        before = both()[0]
        change()
        got, want, dec = both()
        assert not mx.allclose(want, before, atol=1e-3).item()  # the change matters...
        assert mx.allclose(got, want, atol=1e-5).item()  # ...and the compiled step follows it
    # A module-level switch the forward pass reads: a new program, traced for it.
    program = both()[2].program
    monkeypatch.setattr(moe, "SORT_THRESHOLD", 1)
    again = both()[2].program
    assert again is not program and again.traces >= 1
    assert both()[2].program is again  # and kept while nothing changes
