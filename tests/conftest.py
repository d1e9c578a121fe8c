"""Shared fixtures: tiny gpt-oss configs and random checkpoints in the real file layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptoss_mlx.config import ModelConfig


def make_tiny_config(**overrides) -> ModelConfig:
    """A gpt-oss-shaped model small enough for CPU tests (3 layers so HF writes 3 shards)."""
    kw = dict(
        num_hidden_layers=3,
        hidden_size=64,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        vocab_size=1024,
    )
    kw.update(overrides)
    return ModelConfig(**kw)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return make_tiny_config()


@pytest.fixture
def tiny_hf_checkpoint(tmp_path: Path, tiny_cfg: ModelConfig) -> Path:
    """A random Hugging Face-layout checkpoint of `tiny_cfg` (seed 0) in tmp_path/hf."""
    from gptoss_mlx.convert.synthetic import write_hf_checkpoint

    return write_hf_checkpoint(tmp_path / "hf", tiny_cfg, seed=0)
