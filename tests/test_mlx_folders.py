"""MLX conversions others made (mlx_lm.convert, mlx-community, LM Studio), loaded as they are.

Every folder here is written by mlx-lm's own converter from our tiny random Hugging Face
checkpoints, so the layout is the real one: quantization in config.json with per-module entries, a
quantized router, `lm_head.biases`, no manifest. The oracle is mlx-lm's own loader and gpt_oss
model on the same folder (tests/oracles.py), with its YaRN correction range unrounded as in the
parity tests of test_model.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_tiny_config
from gptoss_mlx import load, load_model
from gptoss_mlx.cli import main
from gptoss_mlx.convert.synthetic import write_hf_checkpoint
from gptoss_mlx.errors import CheckpointError, ConfigError
from gptoss_mlx.model.moe import ExpertLinear
from gptoss_mlx.weights.loading import inspect_folder
from gptoss_mlx.weights.mlx_folder import KIND, is_mlx_folder
from oracles import mlx_lm_forward

# head_dim 64 like the real model, so YaRN's ramp spans real dimensions (as in test_model.py).
WIDE = dict(head_dim=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=2048)
L0 = "model.layers.0."


def _override(path: str, module) -> bool | dict:
    """A mixed recipe of the kind mlx_lm.convert takes as quant_predicate: every module its own."""
    if path.endswith("mlp.router"):
        return False  # router kept in floating point
    if path == "lm_head":
        return {"group_size": 64, "bits": 6, "mode": "affine"}
    if path == "model.embed_tokens":
        return {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    if path.endswith("v_proj"):
        return {"group_size": 32, "bits": 8, "mode": "affine"}
    return True  # the command's default: 4 bits, group 64


# name -> (source folder name, keyword arguments of mlx_lm.convert.convert)
RECIPES = {
    # the mlx-community MXFP4-Q8 layout: experts MXFP4 as released, the rest (router too) 8-bit
    "q8-g64": ("hf", dict(quantize=True, q_bits=8, q_group_size=64)),
    "q4-g64": ("hf", dict(quantize=True, q_bits=4, q_group_size=64)),
    "q8-g32": ("hf", dict(quantize=True, q_bits=8, q_group_size=32)),
    "mxfp4": ("hf", dict(quantize=True, q_mode="mxfp4")),
    "override": ("hf", dict(quantize=True, quant_predicate=_override)),
    # the experts dequantized, then quantized again in other modes (mlx-community's "4bit" kind)
    "bf16": ("hf", dict(dequantize=True)),
    "experts-q4-g32": ("bf16", dict(quantize=True, q_bits=4, q_group_size=32)),
    "experts-nvfp4": ("bf16", dict(quantize=True, q_mode="nvfp4")),
    "experts-mxfp8": ("bf16", dict(quantize=True, q_mode="mxfp8")),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Every recipe of RECIPES written by mlx_lm.convert from one random checkpoint."""
    from mlx_lm.convert import convert as mlx_lm_convert

    root = tmp_path_factory.mktemp("mlx-lm")
    cfg = make_tiny_config(num_hidden_layers=4, **WIDE)
    out = {"hf": write_hf_checkpoint(root / "hf", cfg, seed=3)}
    for name, (src, kwargs) in RECIPES.items():
        out[name] = root / name
        mlx_lm_convert(str(out[src]), str(out[name]), **kwargs)
    return out


def prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def test_the_folders_have_the_layout_the_issue_names(folders):
    # What made the converter fail before: lm_head.biases, quantization in config.json, no
    # manifest; and what makes these folders different from ours: per-module entries.
    q8 = json.loads((folders["q8-g64"] / "config.json").read_text())["quantization"]
    assert q8[f"{L0}mlp.router"] == {"group_size": 64, "bits": 8}  # a quantized router
    assert (q8["mode"], q8["bits"]) == ("mxfp4", 4) and "gptoss_mlx" not in q8
    names = set(
        json.loads((folders["q8-g64"] / "model.safetensors.index.json").read_text())["weight_map"]
    )
    assert {"lm_head.biases", "lm_head.scales", f"{L0}mlp.router.scales"} <= names
    assert not (folders["q8-g64"] / "manifest.json").exists()
    assert all(is_mlx_folder(folders[n]) for n in RECIPES)
    assert not is_mlx_folder(folders["hf"])  # a Hugging Face checkpoint is converted, not read


EXPECTED_SCHEMES = {
    "q8-g64": {"model.embed_tokens": ("affine", 8, 64), f"{L0}mlp.router": ("affine", 8, 64),
               f"{L0}mlp.experts.up_proj": ("mxfp4", 4, 32), "lm_head": ("affine", 8, 64)},
    "mxfp4": {f"{L0}self_attn.q_proj": ("mxfp4", 4, 32), f"{L0}mlp.router": ("affine", 8, 64)},
    "override": {f"{L0}mlp.router": None, "lm_head": ("affine", 6, 64),
                 "model.embed_tokens": ("mxfp8", 8, 32), f"{L0}self_attn.v_proj": ("affine", 8, 32),
                 f"{L0}self_attn.q_proj": ("affine", 4, 64)},
    "bf16": {f"{L0}mlp.experts.gate_proj": None, "lm_head": None},
    "experts-q4-g32": {f"{L0}mlp.experts.down_proj": ("affine", 4, 32)},
    "experts-nvfp4": {f"{L0}mlp.experts.down_proj": ("nvfp4", 4, 16)},
    "experts-mxfp8": {f"{L0}mlp.experts.gate_proj": ("mxfp8", 8, 32)},
}  # fmt: skip


@pytest.mark.parametrize("name", list(EXPECTED_SCHEMES))
def test_each_module_is_read_as_stored(folders, name):
    checked = inspect_folder(folders[name])
    assert checked.kind == KIND and not checked.has_manifest
    for path, scheme in EXPECTED_SCHEMES[name].items():
        assert checked.schemes[path] == scheme, path


@pytest.mark.parametrize("name", list(RECIPES))
def test_logits_equal_mlx_lm_on_the_same_folder(folders, name):
    toks = prompt(300, WIDE["vocab_size"], seed=7)
    theirs = mlx_lm_forward(folders[name], toks, unrounded_yarn=True)
    model = load_model(folders[name], dtype=mx.float32)
    ours = np.array(model(mx.array([toks]))[0], dtype=np.float64)
    err = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    assert err <= 1e-4, f"{name}: relative max error {err:.2e} vs mlx-lm"
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_experts_stay_in_their_stored_mode(folders):
    # Never dequantized on load: the gather kernels run on what the folder holds.
    model = load_model(folders["experts-nvfp4"], dtype=mx.float32, threads=1)
    up = model.layers[0].mlp.experts.up_proj
    assert isinstance(up, ExpertLinear) and (up.mode, up.bits, up.group_size) == ("nvfp4", 4, 16)
    assert up.weight.dtype == mx.uint32
    plain = load_model(folders["bf16"], dtype=mx.float32, threads=1).layers[0].mlp.experts.up_proj
    assert plain.mode is None and plain.weight.dtype == mx.float32


def test_threads_split_a_foreign_folder_without_changing_a_bit(folders):
    toks = mx.array([prompt(40, WIDE["vocab_size"], seed=8)])
    for name in ("experts-q4-g32", "bf16"):
        one = load_model(folders[name], dtype=mx.float32, threads=1)(toks)
        two = load_model(folders[name], dtype=mx.float32, threads=2)(toks)
        assert mx.array_equal(one, two).item(), name


@pytest.mark.parametrize("name", ["experts-nvfp4", "bf16", "override"])
def test_cached_and_compiled_decoding_equal_one_pass(folders, name):
    # The engine's paths (prefill into caches, the compiled one-token step) on experts stored
    # another way, across the sliding window (8) and beyond.
    from gptoss_mlx.engine.generate import prefill_ids
    from gptoss_mlx.model.compiled_decode import CompiledDecoder

    model = load_model(folders[name], dtype=mx.float32)
    toks = mx.array([prompt(40, WIDE["vocab_size"], seed=9)], dtype=mx.uint32)
    full = model(toks)[0]
    cache = model.make_cache()
    prefill_ids(model, toks[:, :13], cache, chunk=5)
    dec = CompiledDecoder.start(model, cache)
    steps = mx.stack([dec.step(toks[:, t])[0] for t in range(13, 40)])
    dec.finish()
    scale = mx.abs(full).max().item()
    assert mx.abs(steps - full[13:]).max().item() / scale <= 1e-5


def test_load_returns_the_folders_tokenizer(folders):
    model, tok = load(folders["q8-g64"])
    assert model.config.num_hidden_layers == 4 and tok.encode("hi")


def _copy(folders, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(folders[name], dst)
    return dst


def test_header_validation_runs_before_mlx_opens_a_shard(folders, tmp_path, monkeypatch):
    folder = _copy(folders, "q8-g64", tmp_path)
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # a truncated download

    def never(*a, **kw):
        raise AssertionError("MLX opened a shard before its header was validated")

    monkeypatch.setattr(mx, "load", never)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert str(shard) in str(e.value) and "download or convert it again" in str(e.value)


def test_float_tensors_of_mixed_dtypes_load_as_mlx_lm_loads_them(folders, tmp_path):
    # Some converters keep norms or sinks in float32 next to bf16 weights; mlx-lm casts each.
    folder = _copy(folders, "q4-g64", tmp_path)
    weights = mx.load(str(folder / "model.safetensors"))
    for name in ("model.norm.weight", f"{L0}self_attn.sinks", "lm_head.scales"):
        weights[name] = weights[name].astype(mx.float32)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    toks = mx.array([prompt(20, WIDE["vocab_size"])])
    mixed = load_model(folder, dtype=mx.float32)(toks)
    assert mx.array_equal(mixed, load_model(folders["q4-g64"], dtype=mx.float32)(toks)).item()
    weights["lm_head.weight"] = weights["lm_head.weight"].astype(mx.int32)  # not a float: refused
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    with pytest.raises(CheckpointError, match="'lm_head.weight' has dtype I32"):
        load_model(folder)


def test_config_that_disagrees_with_the_tensors_names_them(folders, tmp_path):
    folder = _copy(folders, "q8-g64", tmp_path)
    d = json.loads((folder / "config.json").read_text())
    d["quantization"]["lm_head"] = {"group_size": 32, "bits": 4, "mode": "affine"}
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="'lm_head.weight' has shape"):
        load_model(folder)


def test_affine_experts_claimed_over_mxfp4_ones_is_one_line(folders, tmp_path):
    # What test_reliability's config faults once refused outright, now a layout disagreement.
    folder = _copy(folders, "q8-g64", tmp_path)
    d = json.loads((folder / "config.json").read_text())
    d["quantization"][f"{L0}mlp.experts.up_proj"] = {"group_size": 64, "bits": 8, "mode": "affine"}
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert f"missing '{L0}mlp.experts.up_proj.biases'" in str(e.value)
    assert "\n" not in str(e.value)


def test_quantization_mlx_lacks_is_refused(folders, tmp_path):
    folder = _copy(folders, "q8-g64", tmp_path)
    d = json.loads((folder / "config.json").read_text())
    d["quantization"]["lm_head"] = {"group_size": 64, "bits": 7}
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="quantization for lm_head .* is not one MLX supports"):
        load_model(folder)


def test_nvfp4_global_scales_are_refused_with_the_reason(folders, tmp_path):
    folder = _copy(folders, "experts-nvfp4", tmp_path)
    d = json.loads((folder / "config.json").read_text())
    d["quantization"][f"{L0}mlp.experts.up_proj"] = {
        "group_size": 16, "bits": 4, "mode": "nvfp4", "global_scale": True,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="uses an nvfp4 global scale"):
        load_model(folder)


def test_a_missing_shard_of_the_index_is_named(folders, tmp_path):
    folder = _copy(folders, "q4-g64", tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: not found"):
        load_model(folder)


def test_without_an_index_the_shards_are_found_as_mlx_lm_finds_them(folders, tmp_path):
    folder = _copy(folders, "q4-g64", tmp_path)
    (folder / "model.safetensors.index.json").unlink()
    toks = mx.array([prompt(20, WIDE["vocab_size"])])
    a = load_model(folder, dtype=mx.float32)(toks)
    b = load_model(folders["q4-g64"], dtype=mx.float32)(toks)
    assert mx.array_equal(a, b).item()


def test_our_folder_without_its_manifest_is_still_refused(tmp_path):
    # A gptoss-mlx folder whose manifest was deleted is a damaged folder of ours, not a foreign
    # one: it says to convert again (test_reliability covers the message).
    from gptoss_mlx.convert.convert import convert

    cfg = make_tiny_config(num_hidden_layers=1)
    out = convert(write_hf_checkpoint(tmp_path / "hf", cfg), tmp_path / "o", progress=False).out
    (out / "manifest.json").unlink()
    assert not is_mlx_folder(out)
    with pytest.raises(CheckpointError, match="not a gptoss-mlx folder"):
        load_model(out)


# --------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory) -> Path:
    """mlx_lm.convert's MXFP4-Q8 layout of a random 2-layer model with the real vocabulary size
    (harmony's control ids are ~200k)."""
    from mlx_lm.convert import convert as mlx_lm_convert

    root = tmp_path_factory.mktemp("mlx-lm-chat")
    cfg = make_tiny_config(num_hidden_layers=2, vocab_size=201088)
    src = write_hf_checkpoint(root / "hf", cfg, seed=0)
    mlx_lm_convert(str(src), str(root / "mlx"), quantize=True, q_bits=8, q_group_size=64)
    return root / "mlx"


def test_generate_and_chat_run_on_it_without_converting(chat_folder, tmp_path, monkeypatch):
    import gptoss_mlx.convert.convert as convert_module

    def fail(*a, **kw):
        raise AssertionError("an MLX folder was converted")

    monkeypatch.setattr(convert_module, "convert", fail)
    monkeypatch.setenv("GPTOSS_MLX_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    res = runner.invoke(
        main, ["generate", "-m", str(chat_folder), "-p", "Hi", "-n", "4", "--seed", "1", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["usage"]["completion_tokens"] <= 4
    res = runner.invoke(main, ["chat", "-m", str(chat_folder), "-n", "3"], input="Hello\n")
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "home").exists()


def test_info_says_what_the_folder_is(chat_folder, tmp_path):
    res = CliRunner().invoke(main, ["info", str(chat_folder)])
    assert res.exit_code == 0, res.output
    assert "MLX folder made by mlx-lm or another tool (no gptoss-mlx manifest)" in res.output
    assert "embeddings/attention/router/lm_head affine 8-bit g64; experts mxfp4" in res.output


def test_verify_says_what_it_can_check(chat_folder, tmp_path):
    res = CliRunner().invoke(main, ["verify", str(chat_folder)])
    assert res.exit_code == 0, res.output
    assert "no manifest" in res.output and "not checked" in res.output
    broken = tmp_path / "broken"
    shutil.copytree(chat_folder, broken)
    shard = broken / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    res = CliRunner().invoke(main, ["verify", str(broken)])
    assert res.exit_code == 1 and "truncated" in res.output
