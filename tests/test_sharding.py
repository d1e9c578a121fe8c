"""Row-sharded matmuls on MLX's CPU backend: a model whose layers are split across CPU streams
computes exactly what the unsplit model computes (prefill, compiled decode, batched decode), with
the same weights in memory."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from conftest import make_tiny_config
from gptoss_mlx.engine import generate
from gptoss_mlx.engine.batching import BatchEngine, BatchRequest
from gptoss_mlx.errors import UsageError
from gptoss_mlx.model import cpu_streams as sharding
from gptoss_mlx.model.compiled_decode import CompiledDecoder
from gptoss_mlx.model.cpu_streams import RowShards
from gptoss_mlx.weights.loading import load_model

GREEDY = generate.SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A converted random model with the default recipe (MXFP4 experts, 8-bit affine rest)."""
    from gptoss_mlx.convert.convert import convert
    from gptoss_mlx.convert.synthetic import write_hf_checkpoint

    root = tmp_path_factory.mktemp("shard")
    cfg = make_tiny_config(num_hidden_layers=4, intermediate_size=96)
    out = root / "mlx"
    convert(write_hf_checkpoint(root / "hf", cfg, seed=1), out, progress=False)
    return out


def _spread(model) -> dict[str, tuple[int, int]]:
    """{layer name: (first stream, number of shards)} of every spread layer."""
    return {
        name: (m._first, len(m.parts))
        for name, m in model.named_modules()
        if isinstance(m, RowShards)
    }


@pytest.fixture(scope="module")
def models(folder):
    """Unsplit, and spread over 2, 3 (uneven) and 4 streams, every target layer large enough."""
    mp = pytest.MonkeyPatch()
    mp.setattr(sharding, "MIN_ROWS_PER_SHARD", 8)
    try:
        out = {t: load_model(folder, threads=t) for t in (1, 2, 3, 4)}
    finally:
        mp.undo()
    return out


def test_every_large_layer_is_spread(models):
    assert _spread(models[1]) == {}
    for t in (2, 3, 4):
        split = {"self_attn.q_proj", "self_attn.o_proj", "mlp.experts.down_proj"}
        want = {"lm_head": (0, t)}
        half = t // 2  # gate on the first half of the streams, up on the second
        for i in range(4):
            want |= {f"model.layers.{i}.{p}": (0, t) for p in split}
            if half > 1:
                want[f"model.layers.{i}.mlp.experts.gate_proj"] = (0, half)
            want[f"model.layers.{i}.mlp.experts.up_proj"] = (half, half)
        assert _spread(models[t]) == want
        assert sharding.threads_of(models[t]) == t
    assert sharding.threads_of(models[1]) == 1


def test_split_model_holds_the_same_weights(models):
    def nbytes(m):
        return sum(v.nbytes for _, v in tree_flatten(m.parameters()))

    assert nbytes(models[2]) == nbytes(models[3]) == nbytes(models[4]) == nbytes(models[1])


def _ids(n: int, batch: int, seed: int) -> mx.array:
    return mx.random.randint(0, 1024, (batch, n), key=mx.random.key(seed)).astype(mx.uint32)


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_prefill_and_compiled_decode_are_bit_identical(models, threads):
    # 70 prompt tokens in chunks of 35: the experts' sorted gather (>= 64 pairs) runs too.
    prompt, feed = _ids(70, 2, 1), _ids(12, 2, 2)
    outs = {}
    for t in (1, threads):
        m = models[t]
        cache = m.make_cache()
        first = generate.prefill_ids(m, prompt, cache, chunk=35)
        dec = CompiledDecoder.start(m, cache)
        steps = [dec.step(feed[:, i]) for i in range(feed.shape[1])]
        dec.finish()
        outs[t] = [first, *steps]
        mx.eval(outs[t])
    for i, (a, b) in enumerate(zip(outs[1], outs[threads], strict=True)):
        assert mx.array_equal(a, b).item(), f"position {i}"


def test_generation_and_batching_give_the_same_tokens(models):
    prompts = [_ids(n, 1, 10 + n)[0].tolist() for n in (5, 17, 9)]
    runs = {}
    for t in (1, 2):
        m = models[t]
        single = [
            list(generate.generate_tokens(m, p, max_tokens=10, sampling=GREEDY)) for p in prompts
        ]
        engine = BatchEngine(m, batch_size=2, stop_ids=())
        batched = {
            r.id: r.tokens
            for r in engine.run(
                BatchRequest(p, 10, GREEDY, id=str(i)) for i, p in enumerate(prompts)
            )
        }
        runs[t] = (single, [batched[str(i)] for i in range(len(prompts))])
    assert runs[2] == runs[1]
    assert all(len(s) == 10 for s in runs[1][0])


def test_small_layers_stay_whole(folder):
    # With the default 512 rows per shard only the 1024-row vocabulary projection is worth it.
    m = load_model(folder, threads=2)
    assert _spread(m) == {"lm_head": (0, 2)}


def test_threads_from_the_environment(monkeypatch):
    monkeypatch.setenv(sharding.THREADS_ENV, "3")
    assert sharding.default_threads() == 3
    for bad in ("0", "-2", "many", "257", "1000"):
        monkeypatch.setenv(sharding.THREADS_ENV, bad)
        with pytest.raises(UsageError, match=sharding.THREADS_ENV):
            sharding.default_threads()
    monkeypatch.setenv(sharding.THREADS_ENV, "")  # empty: as if unset
    n = sharding.default_threads()
    monkeypatch.delenv(sharding.THREADS_ENV)
    assert sharding.default_threads() == n
    if mx.default_device() == mx.cpu:
        assert 1 <= n <= sharding.MAX_THREADS
    else:
        assert n == 1


def test_splitting_at_load_holds_at_most_one_extra_expert_tensor(folder, monkeypatch):
    # Expert shards are copies: the loader lets each original go before copying the next one,
    # so loading a split model peaks at most one expert projection above loading a whole one.
    def peak_of_load(threads: int) -> int:
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        load_model(folder, threads=threads)
        return mx.get_peak_memory() - base

    monkeypatch.setattr(sharding, "MIN_ROWS_PER_SHARD", 8)
    cfg = make_tiny_config(num_hidden_layers=4, intermediate_size=96)
    E, W, H = cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size
    one_projection = E * W * H // 2 + E * W * H // 32 + E * W * 4  # MXFP4 values, scales, bias
    whole, split = peak_of_load(1), peak_of_load(2)
    assert split <= whole + one_projection, (split, whole, one_projection)
