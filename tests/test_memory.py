"""Memory preflight: exact cache arithmetic, default context choice, and advice when it won't fit."""

from __future__ import annotations

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from conftest import make_tiny_config
from gptoss_mlx.cli import main
from gptoss_mlx.convert.convert import convert
from gptoss_mlx.convert.synthetic import write_hf_checkpoint
from gptoss_mlx.engine import memory
from gptoss_mlx.engine.memory import (
    MemoryPlan,
    MemoryPreflightError,
    choose_max_context,
    plan_memory,
)
from gptoss_mlx.engine.runtime import load_for_inference
from gptoss_mlx.model import cpu_streams as sharding


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    cfg = make_tiny_config(num_hidden_layers=4)
    src = write_hf_checkpoint(root / "hf", cfg, seed=0)
    convert(src, root / "mlx", progress=False)
    return root / "mlx", cfg


def test_kv_cache_arithmetic_matches_real_caches(converted):
    folder, cfg = converted
    plan = plan_memory(folder, cfg, mx.float32)
    # 2 full layers x (k + v) x 2 kv heads x 16 dims x 4 bytes
    assert plan.kv_per_token == 2 * 2 * 2 * 16 * 4
    model, _, _ = load_for_inference(folder, dtype=mx.float32)
    cache = model.make_cache()
    model(mx.array([list(range(100))]), cache=cache)
    full = sum(
        c.nbytes for c, t in zip(cache, cfg.layer_types, strict=True) if t == "full_attention"
    )
    # KVCache grows in steps of 256 tokens
    assert full == plan.kv_per_token * 256
    # weights as loaded: float tensors upcast to float32
    loaded = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert abs(plan.weights - loaded) / loaded < 0.01


def plan_with_budget(budget: int) -> MemoryPlan:
    return MemoryPlan(
        weights=12 * 10**9,
        kv_per_token=24576,
        kv_fixed=10**7,
        working=10**9,
        budget=budget,
        budget_source="the GPU's recommended working set",
    )


def test_default_context_is_the_largest_that_fits():
    # 12 GB weights + 1 GB working leave ~2 GB for KV at 24 KiB/token: 64k fits, 128k doesn't.
    plan = plan_with_budget(15 * 10**9)
    assert choose_max_context(plan, None, 131072) == 65536
    assert choose_max_context(plan_with_budget(40 * 10**9), None, 131072) == 131072
    assert choose_max_context(plan_with_budget(40 * 10**9), None, 8192) == 8192


def test_too_large_request_names_what_to_change():
    plan = plan_with_budget(15 * 10**9)
    with pytest.raises(MemoryPreflightError) as e:
        choose_max_context(plan, 131072, 131072)
    msg = str(e.value)
    assert "--max-context 65536" in msg and "mxfp4-q4" in msg and "iogpu.wired_limit_mb=" in msg
    with pytest.raises(MemoryPreflightError, match="mxfp4-q4"):
        choose_max_context(plan_with_budget(10 * 10**9), None, 131072)


def test_cli_refuses_before_loading_when_nothing_fits(converted, monkeypatch):
    folder, _ = converted
    monkeypatch.setattr(memory, "device_budget", lambda: (1000, "the machine's RAM"))
    r = CliRunner().invoke(main, ["generate", "-m", str(folder), "-p", "hi", "-n", "2"])
    assert r.exit_code == 1
    assert r.output.strip().startswith("error: not enough memory")
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_info_prints_memory_table(converted):
    folder, _ = converted
    r = CliRunner().invoke(main, ["info", str(folder)])
    assert r.exit_code == 0, r.output
    assert "recipe:     mxfp4-q8" in r.output
    rows = [line.split() for line in r.output.splitlines() if line.startswith("  mxfp4-q8 ")]
    contexts = [row[1] for row in rows if "weights" not in row]  # not the "stored as" line
    assert contexts == ["4k", "8k", "16k", "32k", "64k", "128k"]
    if mx.default_device() == mx.cpu:
        threads = sharding.default_threads()
        assert f"matmuls split across {threads} CPU threads (GPTOSS_MLX_THREADS)" in r.output
    r = CliRunner().invoke(main, ["info", str(folder.parent / "nothing")])
    assert r.exit_code == 2 and "no such folder or model name" in r.output
