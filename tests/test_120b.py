"""gpt-oss-120b everywhere 20b works: 36 layers and 128 experts instead of 24 and 32, nothing else.

Random checkpoints with 128 experts (top 4) and small other widths: the parity tests of 20b
(test_model.py's own test functions, run here on this module's `lossless` fixture), both source
layouts in every recipe, the hub id openai/gpt-oss-120b through `convert` and through `--model` of
generate, chat and batch, and the sizes `convert --help` advertises for the real 120b.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import gptoss_mlx.convert.convert as convert_module
from conftest import make_tiny_config
from gptoss_mlx.cli import main
from gptoss_mlx.convert.convert import convert, estimate_output_size
from gptoss_mlx.convert.recipes import RECIPES
from gptoss_mlx.convert.resolve import cache_path
from gptoss_mlx.convert.synthetic import write_hf_checkpoint, write_original_checkpoint
from gptoss_mlx.model.config import ModelConfig
from gptoss_mlx.weights.loading import inspect_folder, load_model

# The parity tests of gpt-oss-20b, collected again here with this module's `lossless` fixture.
from test_model import (  # noqa: F401
    WIDE,
    test_batch_rows_are_independent,
    test_incremental_and_chunked_prefill_equal_one_pass,
    test_last_only_equals_last_row,
    test_logits_match_mlx_lm_with_unrounded_yarn,
    test_logits_match_numpy_float64_reference,
)

HUB_ID = "openai/gpt-oss-120b"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "gpt-oss-120b"


def experts128(**kw) -> ModelConfig:
    return make_tiny_config(num_local_experts=128, num_experts_per_tok=4, **kw)


@pytest.fixture(scope="module", params=[128, 8], ids=["window128", "window8"])
def lossless(request, tmp_path_factory) -> tuple[Path, Path]:
    """(HF source, lossless float32 conversion) of a 4-layer, 128-expert model."""
    root = tmp_path_factory.mktemp(f"e128w{request.param}")
    cfg = experts128(num_hidden_layers=4, sliding_window=request.param, **WIDE)
    src = write_hf_checkpoint(root / "hf", cfg, seed=11)
    out = root / "mlx"
    convert(src, out, recipe="mxfp4-bf16", dtype="float32", progress=False)
    return src, out


def test_the_real_config_is_gpt_oss_20b_with_36_layers_and_128_experts():
    hf = ModelConfig.from_file(SHARED / "config.json")
    original = ModelConfig.from_original(json.loads((SHARED / "original-config.json").read_text()))
    assert hf == original
    assert (hf.num_hidden_layers, hf.num_local_experts, hf.num_experts_per_tok) == (36, 128, 4)
    assert hf.layer_types[:2] == ["sliding_attention", "full_attention"]


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_both_layouts_convert_identically_in_every_recipe(tmp_path, recipe):
    cfg = experts128(num_hidden_layers=2)
    hf = write_hf_checkpoint(tmp_path / "hf", cfg, seed=7)
    orig = write_original_checkpoint(tmp_path / "orig", cfg, seed=7)
    a = convert(hf, tmp_path / "a", recipe=recipe, progress=False)
    b = convert(orig, tmp_path / "b", recipe=recipe, progress=False)
    assert b.layout == "original"
    for shard in sorted(p.name for p in a.out.glob("*.safetensors")):
        assert (a.out / shard).read_bytes() == (b.out / shard).read_bytes()
    checked = inspect_folder(a.out)
    assert checked.config.num_local_experts == 128
    experts = load_model(a.out).layers[0].mlp.experts
    assert experts.down_proj.weight.shape[0] == 128


def test_convert_help_gives_the_120b_sizes():
    text = CliRunner().invoke(main, ["convert", "--help"]).stdout
    assert HUB_ID in text
    cfg = ModelConfig.from_file(SHARED / "config.json")
    for recipe in RECIPES:
        gb = estimate_output_size(cfg, recipe) / 1e9
        assert f"~{gb:.1f} GB" in text, (recipe, gb)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """openai/gpt-oss-120b on a hub that serves a random 128-expert checkpoint (harmony-sized
    vocabulary, so that chat, generate and batch can run it); records what was asked for."""
    import huggingface_hub

    sha = "120b0000000000000000000000000000000120b0"
    cfg = experts128(num_hidden_layers=2, vocab_size=201088)
    snap = write_hf_checkpoint(tmp_path / "models--openai--gpt-oss-120b" / "snapshots" / sha, cfg)
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append(repo_id)
        if repo_id != HUB_ID:
            raise AssertionError(repo_id)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("GPTOSS_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GPTOSS_MLX_MODEL", raising=False)
    return calls


def test_convert_the_hub_id(tmp_path, fake_hub):
    res = convert(HUB_ID, tmp_path / "o", progress=False)
    meta = json.loads((res.out / "config.json").read_text())
    assert meta["gptoss_mlx"]["source"]["id"] == HUB_ID and meta["num_local_experts"] == 128
    assert fake_hub == [HUB_ID]


def test_model_option_resolves_the_hub_id_like_20b(tmp_path, fake_hub, monkeypatch):
    """--model openai/gpt-oss-120b: converted once into the cache on first use, then reused by
    generate, chat and batch without converting again."""
    args = ["-m", HUB_ID, "-t", "0", "-n", "3"]
    first = CliRunner().invoke(main, ["generate", "-p", "Hello", *args, "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["usage"]["completion_tokens"] == 3
    cached = cache_path(HUB_ID)
    assert cached.name == "openai--gpt-oss-120b-mxfp4-q8" and inspect_folder(cached)
    assert set(fake_hub) == {HUB_ID}

    def no_second_conversion(*a, **kw):
        raise AssertionError("converted again instead of reusing the cache")

    monkeypatch.setattr(convert_module, "convert", no_second_conversion)
    again = CliRunner().invoke(main, ["generate", "-p", "Hello", *args, "--json"])
    assert again.exit_code == 0 and again.stdout == first.stdout
    chat = CliRunner().invoke(main, ["chat", *args], input="Hello\n")
    assert chat.exit_code == 0, chat.output
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"id": 1, "prompt": "Hello"}\n')
    batch = CliRunner().invoke(main, ["batch", str(lines), *args, "-q"])
    assert batch.exit_code == 0, batch.output
    assert json.loads(batch.stdout)["usage"]["completion_tokens"] == 3
    info = CliRunner().invoke(main, ["info", HUB_ID])
    assert str(cached) in info.stdout and "128 experts" in info.stdout
    shutil.rmtree(cached)
