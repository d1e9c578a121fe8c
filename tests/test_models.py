"""`gptoss-mlx models`, `models rm`, and `--model` with the names they print and with hub repos that
hold MLX conversions (mlx-community's), all without network: the Hugging Face cache is written in
huggingface_hub's real layout and read by huggingface_hub itself (tests/hub_fakes.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import gptoss_mlx.convert.convert as convert_module
from conftest import make_tiny_config
from gptoss_mlx import load_model
from gptoss_mlx.cli import main
from gptoss_mlx.convert.convert import convert
from gptoss_mlx.convert.resolve import resolve_model
from gptoss_mlx.convert.synthetic import write_hf_checkpoint
from gptoss_mlx.errors import CheckpointError

MLX_REPO = "mlx-community/gpt-oss-tiny-MXFP4-Q8"
LMS_NAME = "lmstudio-community/gpt-oss-tiny-MLX-8bit"

pytest_plugins = ["hub_fakes"]  # the hf_cache and hub fixtures


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A random checkpoint, its mlx_lm.convert MXFP4-Q8 conversion, and ours."""
    from mlx_lm.convert import convert as mlx_lm_convert

    root = tmp_path_factory.mktemp("models")
    hf = write_hf_checkpoint(root / "hf", make_tiny_config(num_hidden_layers=2), seed=5)
    mlx_lm_convert(str(hf), str(root / "mlx"), quantize=True, q_bits=8, q_group_size=64)
    convert(hf, root / "ours", progress=False)
    return {"hf": hf, "mlx": root / "mlx", "ours": root / "ours"}


@pytest.fixture(autouse=True)
def places(tmp_path, monkeypatch) -> dict[str, Path]:
    """An empty $GPTOSS_MLX_HOME and LM Studio folder."""
    home, lms = tmp_path / "home", tmp_path / "lmstudio"
    lms.mkdir()
    monkeypatch.setenv("GPTOSS_MLX_HOME", str(home))
    monkeypatch.setenv("GPTOSS_MLX_LMSTUDIO_MODELS", str(lms))
    monkeypatch.delenv("GPTOSS_MLX_MODEL", raising=False)
    return {"home": home, "models": home / "models", "lms": lms}


def never_convert(monkeypatch) -> None:
    def fail(*a, **kw):
        raise AssertionError("converted instead of using the folder as it is")

    monkeypatch.setattr(convert_module, "convert", fail)


@pytest.fixture
def machine(sources, places, hf_cache) -> dict[str, Path]:
    """One model in each place, plus things that must not be listed."""
    from hub_fakes import put_in_cache  # after pytest_plugins loaded it (assert rewriting)

    ours = places["models"] / "openai--gpt-oss-tiny-mxfp4-q8"
    shutil.copytree(sources["ours"], ours)
    (places["models"] / ".openai--x-mxfp4-q8.partial-123").mkdir()  # a conversion in progress
    mlx = put_in_cache(hf_cache, MLX_REPO, sources["mlx"])
    ckpt = put_in_cache(hf_cache, "openai/gpt-oss-tiny", sources["hf"])
    put_in_cache(hf_cache, "openai/gpt-oss-120b", sources["hf"], ["config.json"])  # info did it
    other = places["lms"].parent / "llama"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "llama"}')
    put_in_cache(hf_cache, "meta/llama-tiny", other)
    lms = places["lms"] / LMS_NAME
    shutil.copytree(sources["mlx"], lms)
    gguf = places["lms"] / "lmstudio-community" / "gpt-oss-20b-GGUF"
    gguf.mkdir()
    (gguf / "gpt-oss-20b-MXFP4.gguf").write_bytes(b"GGUF")
    return {"ours": ours, "mlx": mlx, "checkpoint": ckpt, "lms": lms}


def listed() -> dict[str, dict]:
    res = CliRunner().invoke(main, ["models", "--json"])
    assert res.exit_code == 0, res.output
    return {m["name"]: m for m in json.loads(res.stdout)}


def test_models_lists_each_place(machine):
    found = listed()
    assert set(found) == {
        "openai--gpt-oss-tiny-mxfp4-q8", MLX_REPO, "openai/gpt-oss-tiny", "openai/gpt-oss-120b",
        LMS_NAME,
    }  # fmt: skip
    ours = found["openai--gpt-oss-tiny-mxfp4-q8"]
    assert (ours["source"], ours["kind"], ours["quantization"]) == (
        "gptoss-mlx",
        "converted",
        "mxfp4-q8",
    )
    assert Path(ours["path"]) == machine["ours"]
    assert ours["size"] == sum(p.stat().st_size for p in machine["ours"].iterdir())
    mlx = found[MLX_REPO]
    assert (mlx["source"], mlx["kind"], mlx["note"]) == ("hf-cache", "mlx", "")
    assert "experts mxfp4" in mlx["quantization"] and "affine 8-bit g64" in mlx["quantization"]
    assert mlx["size"] == sum(p.stat().st_size for p in machine["mlx"].iterdir())
    assert found["openai/gpt-oss-tiny"]["kind"] == "checkpoint"
    assert found["openai/gpt-oss-120b"]["note"] == "config only (nothing downloaded)"
    assert [n for n, m in found.items() if not m["complete"]] == ["openai/gpt-oss-120b"]
    assert (found[LMS_NAME]["source"], found[LMS_NAME]["kind"]) == ("lm-studio", "mlx")


def test_models_text_names_what_and_where(machine):
    res = CliRunner().invoke(main, ["models"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith(MLX_REPO))
    assert "MLX conversion, used as it is (Hugging Face cache)" in lines[row]
    assert str(machine["mlx"]) in lines[row + 2]


def test_nothing_found_says_where_it_looked(places, hf_cache):
    res = CliRunner().invoke(main, ["models"])
    assert res.exit_code == 0 and "no gpt-oss models found" in res.stdout
    assert str(places["models"]) in res.stdout and str(places["lms"]) in res.stdout


def test_every_listed_name_works_with_model_offline(machine, monkeypatch):
    never_convert(monkeypatch)
    assert resolve_model("openai--gpt-oss-tiny-mxfp4-q8") == machine["ours"]
    assert resolve_model(MLX_REPO) == machine["mlx"]
    assert resolve_model(LMS_NAME) == machine["lms"]
    assert (machine["mlx"] / "model.safetensors").is_symlink()  # the cache links to its blobs
    assert load_model(machine["mlx"]).config.num_hidden_layers == 2


def test_info_on_a_listed_name_reads_the_folder(machine):
    # Offline (hf_cache): the MLX repo in the cache is sized from its own headers.
    for name, fmt in (
        (MLX_REPO, "mlx-lm"),
        (LMS_NAME, "mlx-lm"),
        ("openai--gpt-oss-tiny-mxfp4-q8", "gptoss-mlx"),
    ):
        res = CliRunner().invoke(main, ["info", name, "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["folder"]["format"] == fmt


def test_the_checkpoint_name_is_converted_once_from_the_cache(machine, places):
    folder = resolve_model("openai/gpt-oss-tiny", progress=False)
    assert folder.parent == places["models"] and (folder / "manifest.json").is_file()


def test_chat_on_an_lm_studio_name(machine, monkeypatch):
    never_convert(monkeypatch)
    res = CliRunner().invoke(main, ["chat", "-m", LMS_NAME, "-n", "2"], input="Hi\n")
    assert res.exit_code == 0, res.output


def test_an_mlx_repo_is_downloaded_and_used_as_it_is(sources, hub, monkeypatch, capsys):
    never_convert(monkeypatch)
    hub.repos[MLX_REPO] = sources["mlx"]
    (sources["mlx"] / "modeling_evil.py").write_text("raise SystemExit('never fetched')\n")
    try:
        folder = resolve_model(MLX_REPO)
    finally:
        (sources["mlx"] / "modeling_evil.py").unlink()
    # First the config and index alone (to tell an MLX conversion from a checkpoint), then the
    # weights and tokenizer; never code.
    (first, probe), (second, full) = hub.calls
    assert first == second == MLX_REPO
    assert probe == ("config.json", "model.safetensors.index.json")
    assert "model*.safetensors" in full and not any(p.endswith(".py") for p in full)
    assert not (folder / "modeling_evil.py").exists()
    assert "is an MLX conversion" in capsys.readouterr().err
    assert resolve_model(MLX_REPO) == folder  # then from the cache alone
    assert len(hub.calls) == 2


def test_a_checkpoint_repo_is_still_converted(sources, hub, places):
    hub.repos["openai/gpt-oss-tiny"] = sources["hf"]
    folder = resolve_model("openai/gpt-oss-tiny", progress=False)
    assert (folder / "manifest.json").is_file() and folder.parent == places["models"]
    assert hub.calls[0] == ("openai/gpt-oss-tiny", ("config.json", "model.safetensors.index.json"))


def test_an_unknown_repo_is_one_line(hub):
    with pytest.raises(CheckpointError) as e:
        resolve_model("someone/nothing-here", progress=False)
    assert str(e.value).startswith("someone/nothing-here: no such repo") and "\n" not in str(
        e.value
    )


# --------------------------------------------------------------------------- models rm


def test_rm_removes_ours_after_asking(machine):
    name = "openai--gpt-oss-tiny-mxfp4-q8"
    res = CliRunner().invoke(main, ["models", "rm", name], input="n\n")
    assert res.exit_code == 1 and "not removed" in res.output
    assert machine["ours"].is_dir()
    res = CliRunner().invoke(main, ["models", "rm", name], input="y\n")
    assert res.exit_code == 0, res.output
    assert "Remove " in res.stderr and f"removed {machine['ours']}" in res.stdout
    assert not machine["ours"].exists()


def test_rm_yes_does_not_ask(machine):
    res = CliRunner().invoke(main, ["models", "rm", "openai--gpt-oss-tiny-mxfp4-q8", "--yes"])
    assert res.exit_code == 0 and "Remove " not in res.stderr
    assert not machine["ours"].exists()


def test_rm_with_nothing_on_stdin_removes_nothing(machine):
    res = CliRunner().invoke(main, ["models", "rm", "openai--gpt-oss-tiny-mxfp4-q8"], input="")
    assert res.exit_code != 0 and machine["ours"].is_dir()


@pytest.mark.parametrize(
    "name, needle",
    [
        (MLX_REPO, f"remove it with `hf cache rm model/{MLX_REPO}`"),
        (LMS_NAME, "remove it in LM Studio"),
        ("no-such-model", "no such model in"),
        ("../home", "no such model in"),
    ],
)
def test_rm_refuses_what_is_not_ours(machine, name, needle):
    res = CliRunner().invoke(main, ["models", "rm", name, "--yes"])
    assert res.exit_code == 2 and needle in res.stderr, res.output
    assert machine["mlx"].is_dir() and machine["lms"].is_dir() and machine["ours"].is_dir()


def test_rm_refuses_a_folder_it_cannot_prove_it_wrote(machine):
    (machine["ours"] / "my-notes.txt").write_text("keep me")
    res = CliRunner().invoke(main, ["models", "rm", "openai--gpt-oss-tiny-mxfp4-q8", "--yes"])
    assert res.exit_code == 2
    assert "my-notes.txt in it is not a file gptoss-mlx convert writes" in res.stderr
    assert (machine["ours"] / "my-notes.txt").read_text() == "keep me"
