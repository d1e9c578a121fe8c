"""Sharded models under `mlx.launch` on this machine's CPU (ring backend over loopback) against the
unsharded model: every mode, 2 ranks (and 4 for expert and pipeline), on random models shaped
like gpt-oss-20b (32 experts) and gpt-oss-120b (128 experts), small in every other width.

The ranks run tests/distributed_checks.py (prefill, chunked prefill and decode across the sliding
window, compiled decode, batch caches, the batch engine, prompt-cache reuse, greedy and seeded
generation) and write what they saw; this process runs the same checks on the unsharded model.
Logits must agree to a relative 1e-5 in float32, token streams exactly, on every rank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import distributed_checks as checks
from conftest import make_tiny_config
from gptoss_mlx.convert.convert import convert
from gptoss_mlx.convert.synthetic import write_hf_checkpoint
from gptoss_mlx.engine.shard_memory import Layout, rank_plan
from gptoss_mlx.model.parallel import ShardPlan
from gptoss_mlx.weights.loading import inspect_folder, load_model
from launch import MLX_LAUNCH, launch, python

WINDOW = 8
EXPERTS = {"20b": 32, "120b": 128}  # the two released shapes' expert counts (top 4 of each)
LOGITS = ("prefill", "chunked", "compiled", "batch", "reuse")
TOKENS = ("greedy", "seeded", "engine")


def shaped(experts: int, layers: int):
    # head_dim 64 and 4 heads: q is 256 wide, so each tensor-parallel half is whole 8-bit groups.
    return make_tiny_config(
        num_hidden_layers=layers,
        num_local_experts=experts,
        num_experts_per_tok=4,
        head_dim=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,  # experts hold most of the bytes, as in the real models
        vocab_size=2048,
        sliding_window=WINDOW,
    )


def convert_models(root: Path, layers: int, names=tuple(EXPERTS)) -> dict[str, Path]:
    out = {}
    for name in names:
        experts = EXPERTS[name]
        src = write_hf_checkpoint(root / f"hf-{name}", shaped(experts, layers), seed=5)
        out[name] = root / f"mlx-{name}"
        convert(src, out[name], recipe="mxfp4-bf16", dtype="float32", progress=False)
    return out


def run_ranks(
    root: Path, models: dict[str, Path], ranks: int, modes: list[str], full: bool, threads=1
):
    spec = {
        "cpu_streams": threads,
        "ranks": ranks,
        "modes": modes,
        "window": WINDOW,
        "full": full,
        "models": {k: str(v) for k, v in models.items()},
    }
    (root / "spec.json").write_text(json.dumps(spec))
    out = root / f"out{ranks}"
    out.mkdir()
    script = str(Path(checks.__file__))
    done = launch(ranks, python(script, str(root / "spec.json"), str(out)), timeout=400)
    assert "Traceback" not in done.stderr and "error" not in done.stderr, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist2")
    models = convert_models(root, layers=2)
    # Each rank also splits its matmuls over 2 CPU streams: the two kinds of splitting compose.
    return models, run_ranks(root, models, 2, ["expert", "tensor", "pipeline"], True, threads=2)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist4")
    # 4 ranks on 2 shared cores make every collective slow: the 128-expert shape alone (the
    # 32-expert one splits over 4 the same way), 4 layers since a pipeline of 4 needs them.
    models = convert_models(root, layers=4, names=("120b",))
    return models, run_ranks(root, models, 4, ["expert", "pipeline"], full=False)


def reference(folder: Path, full: bool) -> dict:
    return checks.measure(load_model(folder, dtype=mx.float32, threads=1), WINDOW, full=full)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def compare(out: Path, models: dict[str, Path], ranks: int, modes: list[str], full: bool):
    for name, folder in models.items():
        ref = reference(folder, full)
        for mode in modes:
            seen = [checks.load(out / f"rank{r}-{name}-{mode}.npz") for r in range(ranks)]
            where = f"{name} --shard {mode} over {ranks}"
            for key in LOGITS:
                if key in ref:
                    assert seen[0][key].shape == ref[key].shape, (where, key)
                    err = rel(seen[0][key], ref[key])
                    assert err <= 1e-5, f"{where}: {key} logits off by {err:.2e}"
            for key in TOKENS:
                if key in ref:
                    for r in range(ranks):  # every rank took the same tokens
                        assert seen[r][key] == ref[key], (where, key, r)


def test_mlx_launch_is_the_virtualenvs():
    assert MLX_LAUNCH.is_file() and MLX_LAUNCH.parent == Path(__import__("sys").executable).parent


def test_two_ranks_every_mode_equals_unsharded(two_ranks):
    models, out = two_ranks
    compare(out, models, 2, ["expert", "tensor", "pipeline"], full=True)


def test_four_ranks_expert_and_pipeline_equal_unsharded(four_ranks):
    models, out = four_ranks
    compare(out, models, 4, ["expert", "pipeline"], full=False)


def test_each_rank_holds_only_its_share(two_ranks):
    """Peak MLX memory of each rank right after loading its share of the 128-expert model: what
    the preflight planned for that rank (which is less than the whole model), not the whole."""
    models, out = two_ranks
    folder = inspect_folder(models["120b"])
    layout = Layout.of_folder(folder)
    whole = rank_plan(layout, mx.float32, ShardPlan("pipeline", 0, 1)).weights
    for mode in ("expert", "tensor", "pipeline"):
        for r in range(2):
            planned = rank_plan(layout, mx.float32, ShardPlan(mode, r, 2)).weights
            peak = checks.load(out / f"rank{r}-120b-{mode}.npz")["peak_after_load"][0]
            assert planned < 0.75 * whole, (mode, r, planned, whole)
            # Loading may hold a tensor twice while converting it; never the other ranks' shares.
            assert planned <= peak <= planned * 1.5 + (1 << 20), (mode, r, peak, planned)
    assert math.isfinite(whole)
