"""The sharding plan, each rank's reading of its share and its memory, in one process (no ranks
needed: a rank's structure and share are built with a stand-in group that never communicates).
The sharded forward passes themselves run under mlx.launch in test_distributed.py."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from conftest import make_tiny_config
from gptoss_mlx.cli import main
from gptoss_mlx.convert.convert import convert
from gptoss_mlx.convert.synthetic import write_hf_checkpoint
from gptoss_mlx.engine.shard_memory import Layout, rank_plan, rank_plans
from gptoss_mlx.errors import UsageError
from gptoss_mlx.model import cpu_streams
from gptoss_mlx.model.config import ModelConfig
from gptoss_mlx.model.parallel import PlannedGroup, ShardPlan
from gptoss_mlx.weights.loading import inspect_folder, load_model
from gptoss_mlx.weights.partial import read_slice, share_of
from gptoss_mlx.weights.sharded import load_share
from oracles import read_safetensors

SHARED = Path(__file__).resolve().parents[2] / "shared"


def real(name: str) -> ModelConfig:
    return ModelConfig.from_file(SHARED / name / "config.json")


@pytest.fixture(scope="module", params=["mxfp4-q8", "mxfp4-bf16"])
def folder(request, tmp_path_factory):
    """A 4-layer, 8-expert model, 64-wide heads (so that every split divides)."""
    root = tmp_path_factory.mktemp(request.param)
    cfg = make_tiny_config(
        num_hidden_layers=4, head_dim=64, num_local_experts=8, intermediate_size=128
    )
    out = root / "mlx"
    convert(
        write_hf_checkpoint(root / "hf", cfg, seed=3), out, recipe=request.param, progress=False
    )
    return inspect_folder(out)


# --------------------------------------------------------------------------- the plan


def test_who_holds_what():
    assert ShardPlan("expert", 1, 4).expert_range(128) == (32, 32)
    # Rank N-1 runs the first layers, rank 0 the last ones (it holds the head and samples); the
    # extra layers go to the ranks far from the head.
    ranges = [ShardPlan("pipeline", r, 4).layer_range(10) for r in range(4)]
    assert ranges == [(8, 10), (6, 8), (3, 6), (0, 3)]
    assert [ShardPlan("pipeline", r, 3).holds_embedding for r in range(3)] == [False, False, True]
    assert [ShardPlan(m, 1, 2).holds_head for m in ("expert", "tensor", "pipeline")] == [False] * 3
    assert ShardPlan("tensor", 0, 2).holds_head and ShardPlan("tensor", 1, 2).holds_embedding


def test_refusals_are_one_line_that_say_what_to_do():
    cfg20, cfg120 = real("gpt-oss-20b"), real("gpt-oss-120b")
    for n in (2, 4, 8):
        ShardPlan("expert", 0, n).check(cfg20)
        ShardPlan("expert", 0, n).check(cfg120)
    with pytest.raises(UsageError, match=r"32 experts .* \(2, 4, 8, 16\)"):
        ShardPlan("expert", 0, 3).check(cfg20)
    ShardPlan("tensor", 0, 2).check(cfg120)
    for n in (3, 4, 8):
        with pytest.raises(UsageError) as e:
            ShardPlan("tensor", 0, n).check(cfg120)
        msg = str(e.value)
        assert "\n" not in msg and "exactly 2 ranks" in msg and "--shard expert" in msg
        # The widths that would not divide: 8 kv heads by 3; 90 scale groups by 4 and 8.
        assert ("8 key/value heads" in msg) == (n == 3)
        assert ("90 MXFP4 scale groups per expert row" in msg) == (n != 3)
    with pytest.raises(UsageError, match="needs at least 30 layers; the model has 24"):
        ShardPlan("pipeline", 0, 30).check(cfg20)
    # A split tensor that does not halve is named: 8-bit experts with group 64 keep 45 scale
    # columns of the 2880-wide down projection (what stops mlx-lm's tensor split of such models).
    down = "model.layers.0.mlp.experts.down_proj.scales"
    with pytest.raises(UsageError, match=f"{down} has 45 entries"):
        ShardPlan("tensor", 0, 2).check(cfg20, {down: (32, 2880, 45)})


def test_the_rules_by_name_are_what_mlx_cuts(folder):
    """plan.split_axis (used to refuse a split early) against the shapes MLX's shard_linear /
    shard_inplace leave in each rank's structure (what the loader reads): the same tensors, the
    same axis, the same part for each rank."""
    stored = {t.name: t.shape for h in folder.headers.values() for t in h.tensors.values()}
    layout = Layout.of_folder(folder)
    from gptoss_mlx.weights.sharded import build_share

    for mode, n in (("expert", 2), ("expert", 4), ("tensor", 2), ("pipeline", 2)):
        for r in range(n):
            plan = ShardPlan(mode, r, n)
            model = build_share(*vars(layout).values(), mx.float32, plan, PlannedGroup(r, n))
            held = {}
            for name, p in tree_flatten(model.parameters()):
                g = model.global_name(name)
                held[g] = share_of(stored[g], p.shape, r, n)
            for name, shape in stored.items():
                if name not in held:
                    continue
                axis = plan.split_axis(name, len(shape))
                want = (
                    None
                    if axis is None
                    else (axis, r * shape[axis] // n, (r + 1) * shape[axis] // n)
                )
                assert held[name] == want, (mode, r, name)
            if mode == "pipeline":
                start, end = plan.layer_range(4)
                layers = {int(k.split(".")[2]) for k in held if k.startswith("model.layers.")}
                assert layers == set(range(start, end))
            assert ("lm_head.weight" in held) == (r == 0)


def test_read_slice_reads_the_slice(folder):
    shard = sorted(folder.headers)[0]
    path = folder.path / shard
    tensors = read_safetensors(path)  # the oracle's own reader, whole tensors
    for t in folder.headers[shard].tensors.values():
        if len(t.shape) < 2:
            continue
        for axis in range(len(t.shape)):
            n = t.shape[axis]
            if n < 2:
                continue
            lo, hi = n // 4, n // 4 + max(1, n // 2)
            got = read_slice(path, t, axis, lo, hi)
            want = np.take(tensors[t.name], np.arange(lo, hi), axis=axis)
            assert np.array_equal(np.array(got.astype(mx.float32)), want.astype(np.float32)), (
                t.name,
                axis,
            )


@pytest.mark.parametrize("mode,n", [("expert", 2), ("expert", 4), ("tensor", 2), ("pipeline", 4)])
def test_a_rank_loads_exactly_its_slices(folder, mode, n):
    whole = dict(tree_flatten(load_model(folder.path, dtype=mx.float32, threads=1).parameters()))
    for r in range(n):
        plan = ShardPlan(mode, r, n)
        model = load_share(folder, plan, PlannedGroup(r, n), mx.float32, threads=1)
        for name, p in tree_flatten(model.parameters()):
            full = whole[model.global_name(name)]
            share = share_of(full.shape, p.shape, r, n)
            if share is not None:
                axis, lo, hi = share
                full = mx.take(full, mx.arange(lo, hi), axis=axis)
            if mode == "tensor" and name.endswith("down_proj.bias"):
                assert r == 0  # added once, by rank 0
            assert mx.array_equal(p, full), (mode, r, name)


def test_cpu_streams_leave_communicating_layers_whole(folder, monkeypatch):
    """A rank may spread its share over CPU streams (cpu_streams.py), except a layer that
    all_sums inside (tensor parallelism's o_proj: each row shard would be a collective)."""
    monkeypatch.setattr(cpu_streams, "MIN_ROWS_PER_SHARD", 8)
    model = load_share(folder, ShardPlan("tensor", 1, 2), PlannedGroup(1, 2), mx.float32, 2)
    attn = model.layers[0].self_attn
    assert isinstance(attn.o_proj, (nn.ShardedToAllLinear, nn.QuantizedShardedToAllLinear))
    assert isinstance(attn.q_proj, cpu_streams.RowShards)
    assert "lm_head" not in model  # rank 1 holds no head, and nothing tried to split one


# --------------------------------------------------------------------------- memory per rank


def _bytes(model, dtype: mx.Dtype, part: str) -> int:
    """Bytes of the parameters whose name holds `part`, loaded (floats in `dtype`)."""
    return sum(
        p.size * dtype.size if mx.issubdtype(p.dtype, mx.floating) else p.nbytes
        for name, p in tree_flatten(model.parameters())
        if part in name
    )


def test_memory_per_rank_of_the_real_models():
    """From the converter's plan of the default recipe (nothing downloaded): the experts (84% of
    20b's bytes, 96% of 120b's) split over the ranks, the head stays on rank 0, the rest on every rank."""
    from gptoss_mlx.weights.sharded import build_share

    for name, share in (("gpt-oss-20b", 0.8), ("gpt-oss-120b", 0.95)):
        layout = Layout.of_recipe(real(name), "mxfp4-q8")
        bf16 = mx.bfloat16
        whole_model = build_share(
            *vars(layout).values(), bf16, ShardPlan("pipeline", 0, 1), PlannedGroup(0, 1)
        )
        whole = rank_plan(layout, bf16, ShardPlan("pipeline", 0, 1))
        experts = _bytes(whole_model, bf16, ".mlp.experts.")
        head = _bytes(whole_model, bf16, "lm_head.")
        assert whole.weights == _bytes(whole_model, bf16, "")
        assert experts > share * whole.weights
        for n in (2, 4, 8):
            plans = rank_plans(layout, bf16, "expert", n)
            assert plans[0].weights == whole.weights - experts * (n - 1) // n
            assert all(
                p.weights == whole.weights - head - experts * (n - 1) // n for p in plans[1:]
            )
        tp = rank_plans(layout, bf16, "tensor", 2)
        assert all(2 * p.kv_per_token == whole.kv_per_token for p in tp)  # half the kv heads
        pp = rank_plans(layout, bf16, "pipeline", 4)
        assert sum(p.kv_per_token for p in pp) == whole.kv_per_token  # a range of layers each
    # 120b over two Macs: each rank fits a 48 GB Mac at 32k, within macOS's default GPU limit.
    plans = rank_plans(Layout.of_recipe(real("gpt-oss-120b"), "mxfp4-q8"), mx.bfloat16, "expert", 2)
    assert all(p.total(32768) < 48 * (1 << 30) * 3 // 4 for p in plans)


def test_info_shows_each_rank():
    res = CliRunner().invoke(main, ["info", "openai/gpt-oss-120b", "--shard", "expert"])
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert "--shard expert over 2 ranks (mxfp4-q8)" in text
    rows = [
        ln.split() for ln in text.splitlines() if ln.strip()[:1].isdigit() and len(ln.split()) >= 6
    ]
    assert [r[0] for r in rows[-2:]] == ["0", "1"]
    assert float(rows[-1][1]) < 34  # GB of weights on rank 1: about half of 63
    as_json = json.loads(
        CliRunner()
        .invoke(
            main, ["info", "openai/gpt-oss-20b", "--shard", "pipeline", "--ranks", "4", "--json"]
        )
        .stdout
    )
    assert [r["rank"] for r in as_json["sharded"]["per_rank"]] == [0, 1, 2, 3]
    bad = CliRunner().invoke(
        main, ["info", "openai/gpt-oss-120b", "--shard", "tensor", "--ranks", "4"]
    )
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "exactly 2 ranks" in bad.stderr
