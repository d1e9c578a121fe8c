"""`gptoss-mlx info` before the download: the memory table of every recipe x context x batch, for
hub ids (OpenAI's configs ship with gptoss-mlx; others' config.json alone is fetched) and
unconverted folders, and where each row fits. Its figures must equal `info` on the converted
folder: the same model of weights, KV cache and working memory, from the converter's own plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import make_tiny_config
from gptoss_mlx.cli import main
from gptoss_mlx.convert.convert import convert
from gptoss_mlx.convert.recipes import RECIPES
from gptoss_mlx.convert.synthetic import original_config, write_hf_checkpoint
from gptoss_mlx.engine.memory_table import CONTEXTS, MAC_RAM_GB, mac_limits

GIB = 1 << 30
FIGURES = ("weights_bytes", "kv_cache_bytes", "working_bytes", "total_bytes", "mac_total_bytes")

pytest_plugins = ["hub_fakes"]  # the hf_cache and hub fixtures


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTOSS_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GPTOSS_MLX_LMSTUDIO_MODELS", "")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = make_tiny_config(num_hidden_layers=4)
    return write_hf_checkpoint(tmp_path_factory.mktemp("table") / "hf", cfg, seed=2)


def info_json(*args: str) -> dict:
    res = CliRunner().invoke(main, ["info", *args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def rows_of(table: dict, storage: str) -> list[dict]:
    return [r for r in table["rows"] if r["storage"] == storage]


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_each_recipe_before_converting_equals_info_after(checkpoint, tmp_path, recipe):
    before = info_json(str(checkpoint), "--batch", "1", "--batch", "3")
    out = convert(checkpoint, tmp_path / recipe, recipe=recipe, progress=False).out
    after = info_json(str(out), "--batch", "1", "--batch", "3")
    assert [s["name"] for s in after["storages"]] == [recipe]
    expected = rows_of(before, recipe)
    assert len(expected) == len(after["rows"]) == 2 * len(CONTEXTS)
    for b, a in zip(expected, after["rows"], strict=True):
        assert (b["context"], b["batch"]) == (a["context"], a["batch"])
        assert {k: b[k] for k in FIGURES} == {k: a[k] for k in FIGURES}
        assert (b["fits_here"], b["macs"]) == (a["fits_here"], a["macs"])
    shards = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    disk = {s["name"]: s["disk_bytes"] for s in before["storages"]}
    assert disk[recipe] == shards
    assert after["folder"]["format"] == "gptoss-mlx" and after["folder"]["recipe"] == recipe


def test_an_original_layout_folder_is_sized_too(checkpoint, tmp_path):
    folder = tmp_path / "orig"
    (folder / "original").mkdir(parents=True)
    cfg = make_tiny_config(num_hidden_layers=4)
    (folder / "original" / "config.json").write_text(json.dumps(original_config(cfg)))
    ours = info_json(str(folder))
    hf = info_json(str(checkpoint))
    assert [r["total_bytes"] for r in ours["rows"]] == [r["total_bytes"] for r in hf["rows"]]


def test_openai_models_need_no_network(hub):
    t20 = info_json("openai/gpt-oss-20b")
    t120 = info_json("openai/gpt-oss-120b")
    assert hub.calls == []  # nothing asked of the hub, not even the config
    assert t20["config_from"] == "built into gptoss-mlx"
    assert (t20["architecture"]["layers"], t120["architecture"]["experts"]) == (24, 128)
    # The sizes on disk the README gives for gpt-oss-20b's recipes.
    disk = {s["name"]: round(s["disk_bytes"] / 1e9, 2) for s in t20["storages"]}
    assert disk == {"mxfp4-q8": 12.08, "mxfp4-q4": 11.18, "mxfp4-bf16": 13.76}
    assert len(t20["rows"]) == len(RECIPES) * len(CONTEXTS)
    big = {s["name"]: s["disk_bytes"] for s in t120["storages"]}
    assert 60e9 < big["mxfp4-q8"] < 66e9  # OpenAI: the 120b checkpoint is about 61-65 GB


def test_the_kv_cache_is_the_full_layers_at_bf16_on_a_mac():
    # README: the full-attention layers need 24 KiB per token in bf16 (3.2 GB at 128k).
    t = info_json("openai/gpt-oss-20b")
    a, b = (r for r in t["rows"] if r["storage"] == "mxfp4-q8" and r["context"] in (4096, 131072))
    per_token_bf16 = (b["mac_total_bytes"] - a["mac_total_bytes"]) / (131072 - 4096)
    assert per_token_bf16 == 12 * 2 * 8 * 64 * 2  # 12 full layers x (k, v) x 8 heads x 64 x 2 B


def test_mac_columns_follow_the_limits():
    for gb in MAC_RAM_GB:
        default, raised = mac_limits(gb)
        share = 2 / 3 if gb <= 36 else 3 / 4
        assert abs(default - share * gb * GIB) < 1 and raised == max(default, gb * GIB - 4 * GIB)
    assert round(mac_limits(16)[0] / GIB, 2) == 10.67 and mac_limits(64)[0] == 48 * GIB
    t = info_json("openai/gpt-oss-120b", "--batch", "1", "--batch", "8")
    for r in t["rows"]:
        for gb, verdict in r["macs"].items():
            default, raised = mac_limits(int(gb))
            need = r["mac_total_bytes"]
            assert verdict == (
                "default" if need <= default else "wired" if need <= raised else "no"
            )
    # 120b does not fit 16..48 GB Macs in any recipe; it fits a 128 GB one at 4k.
    small = [r["macs"][str(gb)] for r in t["rows"] for gb in (16, 24, 32, 48)]
    assert set(small) == {"no"}
    assert any(r["macs"]["128"] == "default" for r in t["rows"] if r["context"] == 4096)


def test_text_table_names_recipes_contexts_and_macs():
    res = CliRunner().invoke(main, ["info", "openai/gpt-oss-20b", "--batch", "2"])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "config built into gptoss-mlx; no weights downloaded" in out
    for needle in ("mxfp4-q8", "mxfp4-q4", "mxfp4-bf16", "4k", "128k", "Mac with GB:", "w once"):
        assert needle in out
    rows = [line for line in out.splitlines() if line.strip().startswith("mxfp4-q4 ")]
    assert len(rows) == 7 and all(line.split()[2] == "2" for line in rows[1:])  # batch column


def test_an_mlx_repo_is_sized_from_its_config_alone(tmp_path, hub):
    from mlx_lm.convert import convert as mlx_lm_convert

    hf = write_hf_checkpoint(tmp_path / "hf", make_tiny_config(num_hidden_layers=2), seed=1)
    mlx_lm_convert(str(hf), str(tmp_path / "mlx"), quantize=True, q_bits=4, q_group_size=32)
    hub.repos["mlx-community/gpt-oss-tiny-4bit"] = tmp_path / "mlx"
    before = info_json("mlx-community/gpt-oss-tiny-4bit")
    assert hub.calls == [("mlx-community/gpt-oss-tiny-4bit", ("config.json",))]
    assert [s["name"] for s in before["storages"]] == ["as stored"]
    assert "affine 4-bit g32" in before["storages"][0]["quantization"]
    # What config.json implies is what the downloaded folder's headers hold.
    after = info_json(str(tmp_path / "mlx"))
    assert after["folder"]["format"] == "mlx-lm" and not after["folder"]["manifest"]
    for b, a in zip(before["rows"], after["rows"], strict=True):
        assert {k: b[k] for k in FIGURES} == {k: a[k] for k in FIGURES}


@pytest.mark.parametrize(
    "spec, code, needle",
    [
        ("/no/such/folder", 2, "no such folder or model name"),
        ("not a repo!", 2, "no such folder or model name"),
        ("someone/missing", 1, "someone/missing: no such repo"),
    ],
)
def test_bad_targets_are_one_line(hub, spec, code, needle):
    res = CliRunner().invoke(main, ["info", spec])
    assert res.exit_code == code and needle in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_a_config_of_another_model_is_refused(tmp_path, hub):
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "llama"}')
    hub.repos["meta/llama-tiny"] = other
    res = CliRunner().invoke(main, ["info", "meta/llama-tiny"])
    assert res.exit_code == 1 and "not a gpt-oss model" in res.stderr
