"""Shared fixtures and helpers: tiny gpt-oss configs, random checkpoints in the real file layouts
(as downloaded and converted), and a conversion slow enough to be interrupted."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gptoss_mlx.model.config import ModelConfig

# Shared helper modules whose asserts should report like a test's own (imported after this file).
pytest.register_assert_rewrite("scripted_chat", "vocabs")


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


def convert_chat_model(root: Path) -> Path:
    """A random 2-layer model with the real vocabulary size (harmony ids are ~200k): seed 0,
    written to root/hf and converted with the default recipe into root/mlx, which is returned."""
    from gptoss_mlx.convert.convert import convert
    from gptoss_mlx.convert.synthetic import write_hf_checkpoint

    cfg = make_tiny_config(num_hidden_layers=2, vocab_size=201088)
    out = root / "mlx"
    convert(write_hf_checkpoint(root / "hf", cfg, seed=0), out, progress=False)
    return out


@pytest.fixture
def tiny_hf_checkpoint(tmp_path: Path, tiny_cfg: ModelConfig) -> Path:
    """A random Hugging Face-layout checkpoint of `tiny_cfg` (seed 0) in tmp_path/hf."""
    from gptoss_mlx.convert.synthetic import write_hf_checkpoint

    return write_hf_checkpoint(tmp_path / "hf", tiny_cfg, seed=0)


# `gptoss-mlx convert SRC OUT --quiet` with every tensor write slowed down, so that a test can
# signal or kill the process while it is writing.
_SLOW_CONVERT = textwrap.dedent(
    """
    import sys, time
    from gptoss_mlx.convert.safetensors_io import SafetensorsWriter
    real = SafetensorsWriter.write
    def slow(self, name, data):
        time.sleep(0.02)
        return real(self, name, data)
    SafetensorsWriter.write = slow
    from gptoss_mlx.cli import main
    main(["convert", sys.argv[1], sys.argv[2], "--quiet"])
    """
)


def start_slow_convert(src: Path, out: Path, **popen_kwargs) -> subprocess.Popen:
    """Start a slowed-down conversion of `src` into `out` in a subprocess (stderr piped)."""
    return subprocess.Popen(
        [sys.executable, "-c", _SLOW_CONVERT, str(src), str(out)],
        stderr=subprocess.PIPE,
        **popen_kwargs,
    )
