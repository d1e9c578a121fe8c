"""`--model` resolution (gptoss_mlx.convert.resolve): converted folders as they are, everything
else converted once into $GPTOSS_MLX_HOME and reused, offline included."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gptoss_mlx.convert.convert as convert_module
from conftest import make_tiny_config
from gptoss_mlx import load_model
from gptoss_mlx.convert.convert import convert
from gptoss_mlx.convert.resolve import (
    DEFAULT_MODEL,
    DEFAULT_RECIPE,
    cache_path,
    home,
    is_converted,
    resolve_model,
)
from gptoss_mlx.convert.synthetic import write_hf_checkpoint
from gptoss_mlx.errors import CheckpointError, UsageError


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory) -> Path:
    cfg = make_tiny_config(num_hidden_layers=1)
    return write_hf_checkpoint(tmp_path_factory.mktemp("src") / "gpt-oss-tiny", cfg, seed=4)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, hf_source) -> Path:
    out = tmp_path_factory.mktemp("conv") / "tiny-mlx"
    convert(hf_source, out, progress=False)
    return out


@pytest.fixture(autouse=True)
def model_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GPTOSS_MLX_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """No network and an empty Hugging Face cache."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def forbid_converting(monkeypatch) -> None:
    def fail(*a, **kw):
        raise AssertionError("resolve_model converted again instead of reusing the cache")

    monkeypatch.setattr(convert_module, "convert", fail)


def test_home_follows_the_environment(model_home, monkeypatch):
    assert home() == model_home
    monkeypatch.delenv("GPTOSS_MLX_HOME")
    assert home() == Path("~/.cache/gptoss-mlx").expanduser()


def test_a_converted_folder_is_used_as_it_is(converted, model_home, monkeypatch):
    forbid_converting(monkeypatch)
    assert resolve_model(str(converted)) == converted
    assert not model_home.exists()  # nothing was written to the cache


def test_an_hf_folder_is_converted_once_then_reused(hf_source, model_home, monkeypatch, capsys):
    first = resolve_model(str(hf_source))
    assert first == cache_path(str(hf_source))
    assert first.parent == model_home / "models"
    assert first.name.startswith("gpt-oss-tiny-") and first.name.endswith(DEFAULT_RECIPE)
    assert is_converted(first)
    load_model(first)  # a complete, loadable folder
    assert f"First use of {hf_source}" in capsys.readouterr().err
    mtime = (first / "manifest.json").stat().st_mtime_ns

    forbid_converting(monkeypatch)
    assert resolve_model(str(hf_source)) == first
    assert capsys.readouterr().err == ""
    assert (first / "manifest.json").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in (model_home / "models").iterdir()) == [first.name]


def test_two_folders_with_the_same_name_get_their_own_cache_entry(tmp_path, hf_source):
    twin = tmp_path / "elsewhere" / hf_source.name
    shutil.copytree(hf_source, twin)
    a = resolve_model(str(hf_source), progress=False)
    b = resolve_model(str(twin), progress=False)
    assert a != b and is_converted(a) and is_converted(b)


def test_a_hub_id_already_in_the_cache_needs_no_network(converted, offline_hub, monkeypatch):
    target = cache_path(DEFAULT_MODEL)
    shutil.copytree(converted, target)
    forbid_converting(monkeypatch)
    assert resolve_model(None) == target
    assert resolve_model(DEFAULT_MODEL) == target


@pytest.mark.parametrize("spec", [None, "someone/some-model"], ids=["default", "repo-id"])
def test_a_hub_id_offline_and_not_cached_is_one_checkpoint_error(
    spec, offline_hub, model_home, capsys
):
    with pytest.raises(CheckpointError) as info:
        resolve_model(spec, progress=False)
    msg = str(info.value)
    name = spec or DEFAULT_MODEL
    assert "\n" not in msg
    assert msg.startswith(f"{name}: ")
    assert f"hf download {name}" in msg and "--model" in msg  # what to download, what to pass
    assert not (model_home / "models").exists() or not any((model_home / "models").iterdir())


def test_offline_hub_id_in_a_process_is_one_error_line(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "GPTOSS_MLX_HOME": str(tmp_path / "home"),
    }
    env.pop("HF_HUB_CACHE", None)
    env.pop("GPTOSS_MLX_MODEL", None)
    cmd = [sys.executable, "-m", "gptoss_mlx.cli", *"generate -m someone/some-model -p Hi".split()]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stdout == ""
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "someone/some-model" in errors[0], p.stderr
    assert "hf download someone/some-model" in errors[0]


@pytest.mark.parametrize("spec", ["not a model!!", "a/b/c", "../x/y", "/no/such/folder"], ids=str)
def test_a_garbage_spec_is_a_usage_error(spec):
    with pytest.raises(UsageError, match="no such folder"):
        resolve_model(spec, progress=False)


def test_a_file_is_a_usage_error(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(UsageError, match="is a file"):
        resolve_model(str(f), progress=False)


def test_a_folder_that_is_no_checkpoint_fails_cleanly(tmp_path, model_home):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises((CheckpointError, UsageError)) as info:
        resolve_model(str(empty), progress=False)
    assert str(empty) in str(info.value) and "\n" not in str(info.value)
    assert not is_converted(cache_path(str(empty)))
    leftovers = list((model_home / "models").iterdir()) if (model_home / "models").exists() else []
    assert leftovers == []
