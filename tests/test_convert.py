"""The checkpoint converter: header parsing, layouts, recipes, atomic output, CLI, mlx-lm interop.

Every test writes tiny random checkpoints in the real file layouts (convert/synthetic.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_tiny_config, start_slow_convert
from gptoss_mlx.cli import main as cli_main
from gptoss_mlx.convert import convert as convert_mod
from gptoss_mlx.convert.convert import (
    clean_stale,
    convert,
    estimate_output_size,
    parse_size,
)
from gptoss_mlx.convert.recipes import repack_mxfp4_blocks
from gptoss_mlx.convert.safetensors_io import (
    SafetensorsFile,
    SafetensorsWriter,
    TensorSpec,
    build_header,
    write_tensors,
)
from gptoss_mlx.convert.synthetic import (
    write_byte_level_tokenizer_json,
    write_hf_checkpoint,
    write_original_checkpoint,
)
from gptoss_mlx.errors import CheckpointError, ConfigError, GptOssError, UsageError
from gptoss_mlx.model.config import ModelConfig

RECIPES = ["mxfp4-q8", "mxfp4-q4", "mxfp4-bf16"]
FP4 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def read_all(folder: Path) -> dict[str, tuple[str, np.ndarray]]:
    """{name: (dtype, raw values)} of every tensor in every *.safetensors file of a folder."""
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        with SafetensorsFile(p) as f:
            for name, info in f.tensors.items():
                out[name] = (info.dtype, f.read(name))
    return out


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def mxfp4_reference(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """OpenAI's decode, from the README: lut[nibble] * 2^(scale - 127), low nibble first."""
    nib = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    vals = FP4[nib] * np.exp2(scales.astype(np.float64) - 127)[..., None]
    return vals.reshape(*scales.shape[:-1], scales.shape[-1] * 32)


def rewrite_single_shard(folder: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """Replace an HF checkpoint's shards and index by one model.safetensors holding `tensors`."""
    for p in folder.glob("model*.safetensors*"):
        p.unlink()
    write_tensors(folder / "model.safetensors", [(n, d, a) for n, (d, a) in tensors.items()])


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ---------------------------------------------------------------- safetensors header parser


def st_bytes(header: object, data: bytes = b"", raw_header: bytes | None = None) -> bytes:
    head = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def entry(dtype="U8", shape=(4,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


MALFORMED = {
    "empty": (b"", "empty"),
    "lfs pointer": (
        b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n",
        "Git LFS pointer",
    ),
    "shorter than 8 bytes": (b"\x01\x02", "truncated"),
    "header over the limit": (struct.pack("<Q", 200 * 1024 * 1024) + b"{}", "exceeds"),
    "header past end of file": (struct.pack("<Q", 1000) + b"{}", "truncated"),
    "not utf-8": (st_bytes(None, raw_header=b'{"\xff": 1}'), "not UTF-8"),
    "not json": (st_bytes(None, raw_header=b"{nope"), "not valid JSON"),
    "not an object": (st_bytes([1, 2]), "not a JSON object"),
    "duplicate key": (
        st_bytes(
            None,
            b"\0" * 8,
            b'{"a":'
            + json.dumps(entry()).encode()
            + b',"a":'
            + json.dumps(entry()).encode()
            + b"}",
        ),
        "duplicate",
    ),
    "unknown dtype": (st_bytes({"t": entry(dtype="Q7")}, b"\0" * 4), "unknown dtype"),
    "negative dim": (st_bytes({"t": entry(shape=(-4,))}, b"\0" * 4), "non-negative"),
    "float dim": (st_bytes({"t": entry(shape=(4.0,))}, b"\0" * 4), "non-negative"),
    "bool dim": (st_bytes({"t": entry(shape=(True,), offsets=(0, 1))}, b"\0"), "non-negative"),
    "huge dims": (st_bytes({"t": entry(shape=(2**40, 2**40))}, b"\0" * 4), "needs"),
    "missing field": (st_bytes({"t": {"dtype": "U8", "shape": [4]}}, b"\0" * 4), "exactly"),
    "offsets not two ints": (st_bytes({"t": entry(offsets=(0, 4, 8))}, b"\0" * 4), "two integers"),
    "offsets out of bounds": (
        st_bytes({"t": entry(offsets=(0, 8), shape=(8,))}, b"\0" * 4),
        "outside",
    ),
    "size mismatch": (st_bytes({"t": entry(dtype="F32", shape=(4,))}, b"\0" * 4), "needs 16"),
    "gap": (
        st_bytes({"a": entry(offsets=(0, 4)), "b": entry(offsets=(6, 10))}, b"\0" * 10),
        "gap",
    ),
    "overlap": (
        st_bytes({"a": entry(offsets=(0, 4)), "b": entry(offsets=(2, 6))}, b"\0" * 6),
        "overlaps",
    ),
    "not starting at 0": (st_bytes({"a": entry(offsets=(2, 6))}, b"\0" * 6), "gap"),
    "trailing bytes": (st_bytes({"a": entry()}, b"\0" * 9), "trailing"),
    "bad metadata": (st_bytes({"__metadata__": {"k": 1}, "a": entry()}, b"\0" * 4), "__metadata__"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_header_parser_rejects_malformed(tmp_path, case):
    data, needle = MALFORMED[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(path)
    msg = str(e.value)
    assert needle in msg
    assert str(path) in msg and "\n" not in msg
    tensor_level = case in (
        "unknown dtype",
        "negative dim",
        "size mismatch",
        "offsets out of bounds",
    )
    if tensor_level:
        assert "'t'" in msg  # names the tensor


def test_truncated_and_lfs_say_download_again(tmp_path):
    path = tmp_path / "x.safetensors"
    write_tensors(path, [("a", "U8", np.arange(100, dtype=np.uint8))])
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="download it again"):
        SafetensorsFile(path)
    path.write_bytes(MALFORMED["lfs pointer"][0])
    with pytest.raises(CheckpointError, match="download it again"):
        SafetensorsFile(path)


def test_writer_roundtrip_with_mlx_and_safetensors(tmp_path):
    from safetensors import safe_open

    rng = np.random.default_rng(0)
    x32 = rng.standard_normal((5, 7), dtype=np.float32)
    bf = mx.array(x32).astype(mx.bfloat16)
    tensors = [
        ("w.bf16", "BF16", np.array(bf.view(mx.uint16))),
        ("w.f32", "F32", x32),
        ("w.u32", "U32", rng.integers(0, 2**32, (3, 4), dtype=np.uint32)),
        ("w.u8", "U8", rng.integers(0, 256, (2, 3, 5), dtype=np.uint8)),
        ("empty", "F32", np.zeros((0, 3), np.float32)),
    ]
    path = tmp_path / "rt.safetensors"
    sha = write_tensors(path, tensors, metadata={"format": "mlx"})
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = mx.load(str(path))
    assert mx.array_equal(loaded["w.bf16"], bf).item()
    assert np.array_equal(np.array(loaded["w.f32"]), x32)
    with safe_open(str(path), "np") as f:
        assert set(f.keys()) == {n for n, _, _ in tensors}
        assert np.array_equal(f.get_tensor("w.u32"), tensors[2][2])
        assert np.array_equal(f.get_tensor("w.u8"), tensors[3][2])
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "mlx"}
        assert np.array_equal(f.read("w.u8", (1, 2)), tensors[3][2][1:2])
        assert np.array_equal(f.read("w.bf16"), tensors[0][2])


def test_writer_checks_sizes_and_order(tmp_path):
    specs = [TensorSpec("a", "F32", (2,)), TensorSpec("b", "U8", (3,))]
    w = SafetensorsWriter(tmp_path / "w.safetensors", specs)
    with pytest.raises(ValueError, match="expected 'a'"):
        w.write("b", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="planned 8"):
        w.write("a", np.zeros(3, np.float32))
    w.write("a", np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="incomplete"):
        w.close()
    assert len(build_header(specs)) % 8 == 0


# ---------------------------------------------------------------- MXFP4 repack


def test_mxfp4_repack_matches_reference_decode_exactly():
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (3, 10, 6, 16), dtype=np.uint8)
    scales = rng.integers(0, 255, (3, 10, 6), dtype=np.uint8)  # every exponent but NaN
    w = mx.array(repack_mxfp4_blocks(blocks))
    assert w.dtype == mx.uint32 and w.shape == (3, 10, 24)
    got = mx.dequantize(w, mx.array(scales), group_size=32, bits=4, mode="mxfp4", dtype=mx.float32)
    assert np.array_equal(np.array(got).astype(np.float64), mxfp4_reference(blocks, scales))


def test_converted_experts_dequantize_to_reference(tmp_path, tiny_cfg, tiny_hf_checkpoint):
    out = convert(tiny_hf_checkpoint, tmp_path / "out", progress=False).out
    src, dst = read_all(tiny_hf_checkpoint), read_all(out)
    p = "model.layers.1.mlp.experts."
    blocks, scales = src[p + "gate_up_proj_blocks"][1], src[p + "gate_up_proj_scales"][1]
    ref = mxfp4_reference(blocks, scales)
    for name, rows in (("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2))):
        w, s = mx.array(dst[p + name + ".weight"][1]), mx.array(dst[p + name + ".scales"][1])
        got = mx.dequantize(w, s, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32)
        assert np.array_equal(np.array(got).astype(np.float64), ref[:, rows])


# ---------------------------------------------------------------- recipes


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_converts(tmp_path, tiny_cfg, tiny_hf_checkpoint, recipe):
    res = convert(tiny_hf_checkpoint, tmp_path / "out", recipe=recipe, progress=False)
    out = res.out
    assert out == (tmp_path / "out").absolute() and res.recipe == recipe and res.layout == "hf"
    names = files_in(out)
    assert names == {
        "config.json",
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "generation_config.json",
        "manifest.json",
    }
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]

    # manifest: every other file, with its size and sha256
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "gptoss-mlx" and manifest["format_version"] == 1
    assert set(manifest["files"]) == names - {"manifest.json"}
    for name, meta in manifest["files"].items():
        data = (out / name).read_bytes()
        assert meta == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert res.size_bytes == sum((out / n).stat().st_size for n in names)

    # config.json: the model config round-trips; quantization and provenance are recorded
    config = json.loads((out / "config.json").read_text())
    assert ModelConfig.from_dict(config) == tiny_cfg
    q = config["quantization"]
    assert config["quantization_config"] == q
    if recipe == "mxfp4-bf16":
        assert {k: q[k] for k in ("group_size", "bits", "mode")} == {
            "group_size": 32,
            "bits": 4,
            "mode": "mxfp4",
        }
    else:
        bits = 8 if recipe == "mxfp4-q8" else 4
        assert {k: q[k] for k in ("group_size", "bits", "mode")} == {
            "group_size": 64,
            "bits": bits,
            "mode": "affine",
        }
    for i in range(tiny_cfg.num_hidden_layers):
        assert q[f"model.layers.{i}.mlp.router"] is False
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert q[f"model.layers.{i}.mlp.experts.{proj}"] == {
                "group_size": 32,
                "bits": 4,
                "mode": "mxfp4",
            }
    meta = config["gptoss_mlx"]
    assert meta["format_version"] == 1 and meta["recipe"] == recipe
    assert meta["dtype"] == "bfloat16" and meta["converter"].startswith("gptoss-mlx ")
    assert meta["source"] == {
        "id": str(tiny_hf_checkpoint.absolute()),
        "revision": None,
        "layout": "hf",
    }

    # index: covers exactly the tensors in the shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    dst, src = read_all(out), read_all(tiny_hf_checkpoint)
    assert set(index["weight_map"]) == set(dst)
    assert index["metadata"]["total_size"] == sum(a.nbytes for _, a in dst.values())
    assert tokenizer_same(tiny_hf_checkpoint, out)

    for i in range(tiny_cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        # router, norms, sinks and biases: never quantized, bytes exactly as released
        for name in (
            "mlp.router.weight",
            "mlp.router.bias",
            "self_attn.sinks",
            "input_layernorm.weight",
            "self_attn.q_proj.bias",
        ):
            assert dst[p + name][0] == "BF16"
            assert np.array_equal(dst[p + name][1], src[p + name][1]), name
        assert p + "mlp.router.scales" not in dst
        # experts: bit for bit, gate = even rows, up = odd rows of gate_up
        x = p + "mlp.experts."
        for out_name, src_name, rows in (
            ("gate_proj", "gate_up_proj", slice(0, None, 2)),
            ("up_proj", "gate_up_proj", slice(1, None, 2)),
            ("down_proj", "down_proj", slice(None)),
        ):
            w = dst[f"{x}{out_name}.weight"]
            assert w[0] == "U32"
            assert (
                w[1].tobytes()
                == np.ascontiguousarray(src[f"{x}{src_name}_blocks"][1][:, rows]).tobytes()
            )
            s = dst[f"{x}{out_name}.scales"]
            assert s[0] == "U8"
            assert np.array_equal(s[1], src[f"{x}{src_name}_scales"][1][:, rows])
            b = dst[f"{x}{out_name}.bias"]
            assert np.array_equal(b[1], src[f"{x}{src_name}_bias"][1][:, rows])
        # dense matrices: as released (bf16) or affine-quantized within the grid's error
        qname = p + "self_attn.q_proj"
        ref = bf16_to_f32(src[qname + ".weight"][1])
        if recipe == "mxfp4-bf16":
            assert np.array_equal(dst[qname + ".weight"][1], src[qname + ".weight"][1])
            assert qname + ".scales" not in dst
        else:
            w, s, b = (mx.array(dst[qname + k][1]) for k in (".weight", ".scales", ".biases"))
            s, b = s.view(mx.bfloat16), b.view(mx.bfloat16)
            deq = np.array(mx.dequantize(w, s, b, group_size=64, bits=bits).astype(mx.float32))
            # One grid step (MLX shifts the grid so zero is exact), plus bf16 rounding
            # (2^-8 relative) of the bias, of scale * q and of the output.
            sg, bg = (np.repeat(np.array(t.astype(mx.float32)), 64, axis=1) for t in (s, b))
            tol = np.abs(sg) + 2**-8 * (np.abs(bg) + (2**bits - 1) * np.abs(sg) + np.abs(ref))
            assert (np.abs(deq - ref) <= tol * 1.01).all()
            assert np.abs(sg).max() <= np.abs(ref).max() * 2 / (2**bits - 1) * 1.01


def tokenizer_same(a: Path, b: Path) -> bool:
    return (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_float32_dtype_widens_exactly(tmp_path, tiny_hf_checkpoint):
    out = convert(
        tiny_hf_checkpoint, tmp_path / "o", recipe="mxfp4-bf16", dtype="float32", progress=False
    ).out
    src, dst = read_all(tiny_hf_checkpoint), read_all(out)
    for name in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.sinks",
        "model.layers.2.mlp.experts.down_proj.bias",
    ):
        assert dst[name][0] == "F32"
    assert np.array_equal(
        dst["model.embed_tokens.weight"][1], bf16_to_f32(src["model.embed_tokens.weight"][1])
    )
    assert json.loads((out / "config.json").read_text())["gptoss_mlx"]["dtype"] == "float32"
    q8 = read_all(convert(tiny_hf_checkpoint, tmp_path / "q", dtype="float32", progress=False).out)
    assert q8["lm_head.scales"][0] == "F32" and q8["lm_head.biases"][0] == "F32"


def test_float32_source_is_rounded_to_bfloat16(tmp_path, tiny_cfg):
    src = write_hf_checkpoint(tmp_path / "hf", tiny_cfg, dtype="float32")
    out = convert(src, tmp_path / "o", recipe="mxfp4-bf16", progress=False).out
    a, b = read_all(src), read_all(out)
    name = "model.layers.0.self_attn.o_proj.weight"
    assert a[name][0] == "F32" and b[name][0] == "BF16"
    rounded = np.array(mx.array(a[name][1]).astype(mx.bfloat16).view(mx.uint16))
    assert np.array_equal(b[name][1], rounded)
    blocks = "model.layers.0.mlp.experts.down_proj"
    assert b[blocks + ".weight"][1].tobytes() == a[blocks + "_blocks"][1].tobytes()


def test_float16_refused(tmp_path, tiny_hf_checkpoint):
    with pytest.raises(UsageError, match="float16.*overflow"):
        convert(tiny_hf_checkpoint, tmp_path / "o", dtype="float16", progress=False)
    assert not (tmp_path / "o").exists()


def test_unknown_recipe_refused(tmp_path, tiny_hf_checkpoint):
    with pytest.raises(UsageError, match="mxfp4-q8"):
        convert(tiny_hf_checkpoint, tmp_path / "o", recipe="q3", progress=False)


def test_affine_needs_multiple_of_64(tmp_path, tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, hidden_size=96, intermediate_size=96)
    src = write_hf_checkpoint(tmp_path / "hf", cfg)
    with pytest.raises(UsageError, match="mxfp4-bf16"):
        convert(src, tmp_path / "o", progress=False)
    convert(src, tmp_path / "o", recipe="mxfp4-bf16", progress=False)


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("recipe", ["mxfp4-q8", "mxfp4-bf16"])
def test_hf_and_original_layouts_convert_identically(tmp_path, tiny_cfg, recipe):
    hf = write_hf_checkpoint(tmp_path / "hf", tiny_cfg, seed=7)
    orig = write_original_checkpoint(tmp_path / "orig", tiny_cfg, seed=7)
    a = convert(hf, tmp_path / "a", recipe=recipe, progress=False)
    b = convert(orig, tmp_path / "b", recipe=recipe, progress=False)
    assert b.layout == "original"
    shards = sorted(p.name for p in a.out.glob("*.safetensors"))
    assert shards == sorted(p.name for p in b.out.glob("*.safetensors"))
    for name in shards:
        assert (a.out / name).read_bytes() == (b.out / name).read_bytes()
    ca, cb = (json.loads((r.out / "config.json").read_text()) for r in (a, b))
    assert ModelConfig.from_dict(ca) == ModelConfig.from_dict(cb)
    assert cb["gptoss_mlx"]["source"]["layout"] == "original"


def test_hf_folder_with_only_original_inside(tmp_path, tiny_cfg):
    hf = write_hf_checkpoint(tmp_path / "hf", tiny_cfg, seed=3)
    for p in hf.glob("model*"):
        p.unlink()
    write_original_checkpoint(hf / "original", tiny_cfg, seed=3)
    res = convert(hf, tmp_path / "o", progress=False)
    assert res.layout == "original"
    assert tokenizer_same(hf, res.out)  # tokenizer still comes from the top folder
    ref = convert(
        write_hf_checkpoint(tmp_path / "ref", tiny_cfg, seed=3), tmp_path / "r", progress=False
    )
    name = "model-00001-of-00001.safetensors"
    assert (res.out / name).read_bytes() == (ref.out / name).read_bytes()


def test_hf_cache_snapshot_records_sha(tmp_path, tiny_cfg):
    sha = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "models--openai--gpt-oss-20b" / "snapshots" / sha
    write_hf_checkpoint(snap, tiny_cfg)
    config = json.loads(
        (convert(snap, tmp_path / "o", progress=False).out / "config.json").read_text()
    )
    assert config["gptoss_mlx"]["source"]["revision"] == sha


def test_hub_repo_id_downloads_only_hf_files(tmp_path, tiny_cfg, monkeypatch):
    import huggingface_hub

    sha = "89abcdef0123456789abcdef0123456789abcdef"
    snap = write_hf_checkpoint(
        tmp_path / "models--openai--gpt-oss-20b" / "snapshots" / sha, tiny_cfg
    )
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, allow_patterns))
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    res = convert("openai/gpt-oss-20b", tmp_path / "o", revision="main", progress=False)
    assert calls[0][:2] == ("openai/gpt-oss-20b", "main")
    patterns = calls[0][2]
    assert "model*.safetensors" in patterns and "config.json" in patterns
    assert not any(p.startswith(("original", "metal")) or p in ("*", "**") for p in patterns)
    assert res.source_id == "openai/gpt-oss-20b" and res.revision == sha
    meta = json.loads((res.out / "config.json").read_text())["gptoss_mlx"]["source"]
    assert meta == {"id": "openai/gpt-oss-20b", "revision": sha, "layout": "hf"}


def test_hub_unreachable_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*a, **kw):
        raise LocalEntryNotFoundError("Cannot find the requested files in the cache\nmore")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError) as e:
        convert("openai/gpt-oss-20b", tmp_path / "o", progress=False)
    assert "openai/gpt-oss-20b" in str(e.value) and "pass the folder" in str(e.value)
    assert "\n" not in str(e.value)


def test_revision_for_local_folder_refused(tmp_path, tiny_hf_checkpoint):
    with pytest.raises(UsageError, match="revision"):
        convert(tiny_hf_checkpoint, tmp_path / "o", revision="main", progress=False)


# ---------------------------------------------------------------- source validation


def tensors_of(folder: Path) -> dict[str, tuple[str, np.ndarray]]:
    return read_all(folder)


def test_missing_tensor(tmp_path, tiny_hf_checkpoint):
    t = tensors_of(tiny_hf_checkpoint)
    del t["model.layers.1.self_attn.sinks"]
    rewrite_single_shard(tiny_hf_checkpoint, t)
    with pytest.raises(
        CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.sinks'"
    ):
        convert(tiny_hf_checkpoint, tmp_path / "o", progress=False)


def test_extra_tensor(tmp_path, tiny_hf_checkpoint):
    t = tensors_of(tiny_hf_checkpoint)
    t["model.layers.0.mlp.mystery"] = ("BF16", np.zeros(3, np.uint16))
    rewrite_single_shard(tiny_hf_checkpoint, t)
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.mlp.mystery'"):
        convert(tiny_hf_checkpoint, tmp_path / "o", progress=False)


def test_duplicate_tensor_across_shards(tmp_path, tiny_hf_checkpoint):
    t = tensors_of(tiny_hf_checkpoint)
    rewrite_single_shard(tiny_hf_checkpoint, t)
    write_tensors(
        tiny_hf_checkpoint / "model-extra.safetensors",
        [("model.norm.weight", *t["model.norm.weight"])],
    )
    with pytest.raises(CheckpointError, match="'model.norm.weight' appears more than once"):
        convert(tiny_hf_checkpoint, tmp_path / "o", progress=False)


@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_wrong_shape_or_dtype(tmp_path, tiny_hf_checkpoint, change):
    t = tensors_of(tiny_hf_checkpoint)
    name = "model.layers.2.mlp.router.weight"
    d, a = t[name]
    t[name] = (d, a[:-1]) if change == "shape" else ("F16", a.view(np.float16))
    rewrite_single_shard(tiny_hf_checkpoint, t)
    with pytest.raises(CheckpointError, match=f"'{name}' has {change}"):
        convert(tiny_hf_checkpoint, tmp_path / "o", progress=False)


def test_mxfp4_pair_mismatch(tmp_path, tiny_hf_checkpoint):
    t = tensors_of(tiny_hf_checkpoint)
    name = "model.layers.0.mlp.experts.down_proj_scales"
    t[name] = ("U8", t[name][1][:, :, :-1].copy())
    rewrite_single_shard(tiny_hf_checkpoint, t)
    with pytest.raises(CheckpointError, match="MXFP4 pair"):
        convert(tiny_hf_checkpoint, tmp_path / "o", progress=False)


def test_nan_scale_rejected(tmp_path, tiny_hf_checkpoint):
    name = "model.layers.1.mlp.experts.gate_up_proj_scales"
    index = json.loads((tiny_hf_checkpoint / "model.safetensors.index.json").read_text())
    shard = tiny_hf_checkpoint / index["weight_map"][name]
    with SafetensorsFile(shard) as f:
        offset = f.info(name).begin + 5
    data = bytearray(shard.read_bytes())
    data[offset] = 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"'{name}'.*0xFF"):
        convert(tiny_hf_checkpoint, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("bad", ["../evil.safetensors", "/etc/passwd", "sub/x.safetensors"])
def test_index_entries_must_stay_inside(tmp_path, tiny_hf_checkpoint, bad):
    path = tiny_hf_checkpoint / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["model.norm.weight"] = bad
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="plain file name"):
        convert(tiny_hf_checkpoint, tmp_path / "o", progress=False)


def test_symlink_leading_out_rejected(tmp_path, tiny_hf_checkpoint):
    index = json.loads((tiny_hf_checkpoint / "model.safetensors.index.json").read_text())
    shard = tiny_hf_checkpoint / index["weight_map"]["model.norm.weight"]
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match="leads outside"):
        convert(tiny_hf_checkpoint, tmp_path / "o", progress=False)


def test_lfs_pointer_shard(tmp_path, tiny_hf_checkpoint):
    index = json.loads((tiny_hf_checkpoint / "model.safetensors.index.json").read_text())
    shard = tiny_hf_checkpoint / index["weight_map"]["lm_head.weight"]
    shard.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    with pytest.raises(CheckpointError, match=f"{shard.name}.*Git LFS pointer.*download"):
        convert(tiny_hf_checkpoint, tmp_path / "o", progress=False)


def test_pickles_ignored_and_mentioned(tmp_path, tiny_hf_checkpoint, capsys):
    (tiny_hf_checkpoint / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    (tiny_hf_checkpoint / "modeling.py").write_text("raise SystemExit('executed!')\n")
    convert(tiny_hf_checkpoint, tmp_path / "o", progress=False)
    err = capsys.readouterr().err
    assert err.count("ignoring") == 1 and "pytorch_model.bin" in err and "modeling.py" in err


def test_bad_configs(tmp_path, tiny_hf_checkpoint):
    cfg_path = tiny_hf_checkpoint / "config.json"
    d = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**d, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type"):
        convert(tiny_hf_checkpoint, tmp_path / "o", progress=False)
    cfg_path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ConfigError, match="neither"):
        convert(tiny_hf_checkpoint, tmp_path / "o", progress=False)
    cfg_path.unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        convert(tiny_hf_checkpoint, tmp_path / "o", progress=False)


def test_config_disagreeing_with_tensors(tmp_path, tiny_cfg):
    src = write_hf_checkpoint(tmp_path / "hf", tiny_cfg)
    d = json.loads((src / "config.json").read_text())
    d["num_local_experts"] = 8
    (src / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="router.weight' has shape"):
        convert(src, tmp_path / "o", progress=False)


# ---------------------------------------------------------------- output folder safety


def test_existing_out_refused_without_force(tmp_path, tiny_hf_checkpoint):
    out = convert(tiny_hf_checkpoint, tmp_path / "o", progress=False).out
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(UsageError, match="--force"):
        convert(tiny_hf_checkpoint, out, recipe="mxfp4-bf16", progress=False)
    assert (out / "manifest.json").read_bytes() == before
    res = convert(tiny_hf_checkpoint, out, recipe="mxfp4-bf16", force=True, progress=False)
    assert json.loads((out / "config.json").read_text())["gptoss_mlx"]["recipe"] == "mxfp4-bf16"
    assert res.out == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "o"]


def test_force_refuses_folders_that_are_not_models(tmp_path, tiny_hf_checkpoint):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="is not a folder gptoss-mlx convert wrote"):
        convert(tiny_hf_checkpoint, precious, force=True, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"
    with pytest.raises(UsageError, match="source"):
        convert(tiny_hf_checkpoint, tiny_hf_checkpoint, force=True, progress=False)


class Boom(CheckpointError):
    pass


def fail_after(monkeypatch, n: int) -> None:
    real = SafetensorsWriter.write
    count = {"n": 0}

    def write(self, name, data):
        count["n"] += 1
        if count["n"] > n:
            raise Boom("simulated failure mid-conversion")
        return real(self, name, data)

    monkeypatch.setattr(SafetensorsWriter, "write", write)


def test_error_mid_conversion_leaves_nothing(tmp_path, tiny_hf_checkpoint, monkeypatch):
    fail_after(monkeypatch, 20)
    with pytest.raises(Boom):
        convert(tiny_hf_checkpoint, tmp_path / "o", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_failed_force_keeps_the_old_folder(tmp_path, tiny_hf_checkpoint, monkeypatch):
    out = convert(tiny_hf_checkpoint, tmp_path / "o", progress=False).out
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fail_after(monkeypatch, 20)
    with pytest.raises(Boom):
        convert(tiny_hf_checkpoint, out, recipe="mxfp4-q4", force=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "o"]


def test_stale_partial_folders_are_cleaned(tmp_path, tiny_hf_checkpoint):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".o.partial-{dead.pid}"
    stale.mkdir()
    (stale / "model-00001-of-00001.safetensors").write_bytes(b"half")
    alive = tmp_path / f".o.partial-{os.getppid()}"  # a live process: never touched
    alive.mkdir()
    other = tmp_path / f".other.partial-{dead.pid}"  # another OUT's leftovers: not ours
    other.mkdir()
    assert clean_stale(tmp_path / "o") == [stale]
    assert alive.exists() and other.exists()
    stale.mkdir()
    convert(tiny_hf_checkpoint, tmp_path / "o", progress=False)
    assert not stale.exists()


def test_not_enough_disk_space(tmp_path, tiny_hf_checkpoint, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(convert_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(GptOssError, match="not enough free disk space"):
        convert(tiny_hf_checkpoint, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_unwritable_target(tmp_path, tiny_hf_checkpoint, monkeypatch):
    """OUT's parent cannot be created (a file in the path: see test_out_through_a_plain_file...)."""
    import errno

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.mkdir

    def mkdir(path, *args, **kwargs):  # as the kernel answers anyone but root in a 0o555 folder
        if Path(path).parent == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(
        GptOssError, match=r"locked/sub: cannot create the output folder \(Permission denied\)"
    ):
        convert(tiny_hf_checkpoint, locked / "sub" / "o", progress=False)


def test_small_shard_size_splits_and_loads(tmp_path, tiny_hf_checkpoint):
    out = convert(tiny_hf_checkpoint, tmp_path / "o", shard_size=100_000, progress=False).out
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in shards:
        with SafetensorsFile(shard) as f:
            assert {n for n, s in index["weight_map"].items() if s == shard.name} == set(f.tensors)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1234") == 1234
    for bad in ("", "GB", "-1GB", "5XB"):
        with pytest.raises(UsageError):
            parse_size(bad)


# ---------------------------------------------------------------- signals (subprocess)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_run_leaves_no_output(tmp_path, tiny_hf_checkpoint, sig):
    out = tmp_path / "o"
    proc = start_slow_convert(tiny_hf_checkpoint, out, text=True)
    deadline = time.monotonic() + 60
    while not any(".partial-" in p.name for p in tmp_path.iterdir()):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == "interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# ---------------------------------------------------------------- CLI


def test_cli_help_teaches_and_sizes_match_the_plan():
    res = CliRunner().invoke(cli_main, ["convert", "--help"])
    assert res.exit_code == 0
    text = res.output
    for needle in (
        "openai/gpt-oss-20b",
        "original/",
        "mxfp4-q8",
        "mxfp4-q4",
        "mxfp4-bf16",
        "--force",
        "--revision",
        "--shard-size",
        "Example",
    ):
        assert needle in text
    # The advertised sizes are the planned sizes of the real 20b shapes (to 0.1 GB).
    cfg = ModelConfig()
    for recipe in RECIPES:
        gb = estimate_output_size(cfg, recipe) / 1e9
        line = next(ln for ln in text.splitlines() if f"~{gb:.1f} GB" in ln and ln.strip())
        assert line


def test_cli_bad_src_is_one_line(tmp_path):
    res = CliRunner().invoke(cli_main, ["convert", str(tmp_path / "nope"), str(tmp_path / "o")])
    assert res.exit_code != 0
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_cli_converts_quietly(tmp_path, tiny_hf_checkpoint):
    out = tmp_path / "o"
    res = CliRunner().invoke(
        cli_main,
        [
            "convert",
            str(tiny_hf_checkpoint),
            str(out),
            "-q",
            "--recipe",
            "mxfp4-q4",
            "--shard-size",
            "200KB",
        ],
    )
    assert res.exit_code == 0, res.output
    assert res.output == ""
    assert json.loads((out / "config.json").read_text())["gptoss_mlx"]["recipe"] == "mxfp4-q4"
    res = CliRunner().invoke(cli_main, ["convert", str(tiny_hf_checkpoint), str(out)])
    assert res.exit_code == 2 and "--force" in res.output
    res = CliRunner().invoke(
        cli_main, ["convert", str(tiny_hf_checkpoint), str(tmp_path / "x"), "--dtype", "float16"]
    )
    assert res.exit_code == 2 and "float16" in res.output and "Traceback" not in res.output


def test_summary_on_stderr(tmp_path, tiny_hf_checkpoint, capsys):
    convert(tiny_hf_checkpoint, tmp_path / "o")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "mxfp4-q8" in captured.err and "tensors" in captured.err and "on disk" in captured.err


# ---------------------------------------------------------------- synthetic files, interop


def test_synthetic_tokenizer_is_valid(tmp_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(write_byte_level_tokenizer_json(tmp_path / "tokenizer.json")))
    expected = {
        "<|startoftext|>": 199998,
        "<|endoftext|>": 199999,
        "<|return|>": 200002,
        "<|constrain|>": 200003,
        "<|channel|>": 200005,
        "<|start|>": 200006,
        "<|end|>": 200007,
        "<|message|>": 200008,
        "<|call|>": 200012,
        "<|reserved_200000|>": 200000,
        "<|reserved_201087|>": 201087,
    }
    for text, i in expected.items():
        assert tok.token_to_id(text) == i
    ids = tok.encode("<|start|>user<|message|>the café<|end|>").ids
    assert ids[0] == 200006 and 200008 in ids and ids[-1] == 200007
    assert tok.decode(ids, skip_special_tokens=True) == "userthe café"


def test_synthetic_same_seed_same_weights(tmp_path, tiny_cfg):
    a = read_all(write_hf_checkpoint(tmp_path / "a", tiny_cfg, seed=5))
    b = read_all(write_hf_checkpoint(tmp_path / "b", tiny_cfg, seed=5))
    c = read_all(write_hf_checkpoint(tmp_path / "c", tiny_cfg, seed=6))
    name = "model.layers.0.mlp.experts.gate_up_proj_blocks"
    assert all(np.array_equal(a[n][1], b[n][1]) for n in a)
    assert not np.array_equal(a[name][1], c[name][1])
    assert len(list((tmp_path / "a").glob("model-*.safetensors"))) == 3
    scales = a["model.layers.0.mlp.experts.down_proj_scales"][1]
    assert scales.min() >= 118 and scales.max() <= 125


@pytest.mark.parametrize("recipe", RECIPES)
def test_mlx_lm_loads_converted_folder(tmp_path, tiny_hf_checkpoint, recipe):
    from mlx_lm.utils import load_model

    out = convert(tiny_hf_checkpoint, tmp_path / "o", recipe=recipe, progress=False).out
    model, _ = load_model(Path(out))
    logits = model(mx.array([[1, 2, 3, 4]]))
    assert logits.shape == (1, 4, 1024)
    assert mx.isfinite(logits).all().item()
    experts = model.model.layers[0].mlp.experts.gate_proj
    assert type(experts).__name__ == "QuantizedSwitchLinear" and experts.mode == "mxfp4"
    assert type(model.model.layers[0].mlp.router).__name__ == "Linear"


# ---------------------------------------------------------------- --force replaces only our folders


def tree_of(root: Path) -> dict[str, object]:
    """Every entry under `root` (links not followed): file bytes, link targets, folders."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def converted_tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny HF checkpoint, its conversion), shared: tests copy the conversion before changing it."""
    root = tmp_path_factory.mktemp("converted")
    src = write_hf_checkpoint(root / "hf", make_tiny_config(num_hidden_layers=2), seed=1)
    return src, convert(src, root / "mlx", progress=False).out


def _converted_copy(converted_tiny, out: Path) -> Path:
    import shutil

    shutil.copytree(converted_tiny[1], out)
    return out


def _web_app(out: Path, converted_tiny) -> Path:  # the repro
    (out / "src").mkdir(parents=True)
    (out / "manifest.json").write_text('{"name": "pwa"}')
    (out / "src" / "app.js").write_text("code")
    return out


def _other_checkpoint(out: Path, converted_tiny) -> Path:
    import shutil

    shutil.copytree(converted_tiny[0], out)
    (out / "original").mkdir()
    (out / "original" / "model.safetensors").write_bytes(b"weights")
    (out / "notes.txt").write_text("keep me")
    return out


def _config_and_safetensors(out: Path, converted_tiny) -> Path:  # what --force used to accept
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "mine.safetensors").write_bytes(b"data")
    return out


def _ours_plus_a_note(out: Path, converted_tiny) -> Path:
    (_converted_copy(converted_tiny, out) / "notes.txt").write_text("keep me")
    return out


def _ours_plus_a_subfolder(out: Path, converted_tiny) -> Path:
    (_converted_copy(converted_tiny, out) / "runs").mkdir()
    (out / "runs" / "log.txt").write_text("keep me")
    return out


def _ours_missing_a_file(out: Path, converted_tiny) -> Path:
    (_converted_copy(converted_tiny, out) / "tokenizer.json").unlink()
    return out


def _ours_with_another_manifest(out: Path, converted_tiny) -> Path:
    m = _converted_copy(converted_tiny, out) / "manifest.json"
    m.write_text(json.dumps({**json.loads(m.read_text()), "format": "something-else"}))
    return out


def _link_to_ours(out: Path, converted_tiny) -> Path:
    out.symlink_to(converted_tiny[1], target_is_directory=True)
    return out


def _plain_file(out: Path, converted_tiny) -> Path:
    out.write_text("keep me")
    return out


NOT_OURS = {
    "web app with a manifest.json": (_web_app, "(src in it is a folder)"),
    "another checkpoint with original/ and notes": (
        _other_checkpoint,
        "model.safetensors in it is not",
    ),
    "config.json and a .safetensors": (_config_and_safetensors, "mine.safetensors in it"),
    "converted folder plus notes.txt": (_ours_plus_a_note, "notes.txt in it is not a file"),
    "converted folder plus a subfolder": (_ours_plus_a_subfolder, "runs in it is a folder"),
    "converted folder missing a listed file": (_ours_missing_a_file, "tokenizer.json, listed"),
    "manifest of another format": (_ours_with_another_manifest, "not a gptoss-mlx manifest"),
    "link to a converted folder": (_link_to_ours, "symbolic link"),
    "plain file": (_plain_file, "it is not a folder"),
}


@pytest.mark.parametrize("case", list(NOT_OURS))
def test_force_never_replaces_what_convert_did_not_write(tmp_path, converted_tiny, case):
    build, why = NOT_OURS[case]
    out = build(tmp_path / "w", converted_tiny)
    before, beside = tree_of(tmp_path), sorted(p.name for p in tmp_path.iterdir())
    res = CliRunner().invoke(
        cli_main, ["convert", str(converted_tiny[0]), str(out), "--force", "-q"]
    )
    assert res.exit_code == 2, res.output
    lines = res.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out} is not a folder gptoss-mlx")
    assert why in lines[0] and "remove it yourself or choose another OUT" in lines[0]
    assert tree_of(tmp_path) == before  # nothing touched, no temporary folder left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == beside
    if out.is_symlink():
        assert tree_of(converted_tiny[1]) == tree_of(tmp_path / "w")  # the link's target intact


def test_force_replaces_our_folder_and_an_empty_one(tmp_path, converted_tiny):
    src = converted_tiny[0]
    ours = _converted_copy(converted_tiny, tmp_path / "ours")
    res = convert(src, ours, recipe="mxfp4-q4", force=True, progress=False)
    assert json.loads((res.out / "config.json").read_text())["gptoss_mlx"]["recipe"] == "mxfp4-q4"
    (tmp_path / "empty").mkdir()
    convert(src, tmp_path / "empty", force=True, progress=False)
    assert (tmp_path / "empty" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "ours"]


def test_force_rechecks_out_when_the_conversion_ends(tmp_path, converted_tiny, monkeypatch):
    """A notes file saved into OUT while the conversion runs: OUT is no longer ours, so kept."""
    out = _converted_copy(converted_tiny, tmp_path / "o")
    real = SafetensorsWriter.write

    def write(self, name, data):
        (out / "notes.txt").write_text("written meanwhile")
        return real(self, name, data)

    monkeypatch.setattr(SafetensorsWriter, "write", write)
    with pytest.raises(UsageError, match="notes.txt in it is not a file gptoss-mlx convert writes"):
        convert(converted_tiny[0], out, recipe="mxfp4-q4", force=True, progress=False)
    assert (out / "notes.txt").read_text() == "written meanwhile"
    assert json.loads((out / "config.json").read_text())["gptoss_mlx"]["recipe"] == "mxfp4-q8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_out_must_not_be_contain_or_be_inside_the_source(tmp_path, tiny_cfg):
    hf = write_hf_checkpoint(tmp_path / "hf", tiny_cfg)
    before = tree_of(tmp_path)
    for out in (hf, hf / "o", tmp_path):
        for force in (False, True):
            with pytest.raises(UsageError, match=r"must not be, contain or be inside the source"):
                convert(hf, out, force=force, progress=False)
    # A Hugging Face folder holding only original/ (read from there): the top folder counts too.
    for p in hf.glob("model*"):
        p.unlink()
    write_original_checkpoint(hf / "original", tiny_cfg)
    before = tree_of(tmp_path)
    with pytest.raises(UsageError, match="inside the source folder"):
        convert(hf, hf / "mlx", progress=False)
    with pytest.raises(UsageError, match="inside the source folder"):
        convert(hf / "original", hf, force=True, progress=False)
    assert tree_of(tmp_path) == before


def test_stale_cleanup_removes_only_our_leftovers(tmp_path):
    """Leftovers of dead conversions are removed only if they hold nothing but files we write."""
    dead = []
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-c", "pass"])
        p.wait()
        dead.append(p.pid)
    ours = tmp_path / f".o.partial-{dead[0]}"
    ours.mkdir()
    (ours / "model-00001-of-00002.safetensors").write_bytes(b"half")
    (ours / "tokenizer.json").write_text("{}")
    theirs = tmp_path / f".o.old-{dead[0]}"  # named like ours, but holding a user's file
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    nested = tmp_path / f".o.partial-{dead[1]}"
    (nested / "sub").mkdir(parents=True)
    link = tmp_path / f".o.old-{dead[2]}"
    link.symlink_to(ours, target_is_directory=True)
    assert clean_stale(tmp_path / "o") == [ours]
    assert (theirs / "notes.txt").read_text() == "keep me"
    assert (nested / "sub").is_dir() and link.is_symlink()


@pytest.mark.parametrize("below", ["o", "o/deeper"])
def test_out_through_a_plain_file_names_the_file(tmp_path, tiny_hf_checkpoint, below):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / below
    res = CliRunner().invoke(cli_main, ["convert", str(tiny_hf_checkpoint), str(out), "-q"])
    assert res.exit_code == 2
    assert res.output == (
        f"error: {out}: {blocker} is a file, not a folder; choose an output path inside a folder\n"
    )
    assert blocker.read_text() == "x"
    res = CliRunner().invoke(cli_main, ["convert", str(tiny_hf_checkpoint), str(blocker), "-q"])
    assert res.exit_code == 2 and "exists and is not a folder" in res.output
    assert blocker.read_text() == "x"


# ---------------------------------------------------------------- NaN / inf in float tensors


def _poke(folder: Path, tensor: str, index: tuple[int, ...], value: bytes) -> Path:
    """Overwrite one element of `tensor` in whichever .safetensors file of `folder` holds it."""
    for shard in sorted(folder.glob("*.safetensors")):
        with SafetensorsFile(shard) as f:
            if tensor not in f.tensors:
                continue
            info = f.info(tensor)
        flat = int(np.ravel_multi_index(index, info.shape))
        offset = info.begin + flat * len(value)
        data = bytearray(shard.read_bytes())
        data[offset : offset + len(value)] = value
        shard.write_bytes(bytes(data))
        return shard
    raise AssertionError(f"{tensor} not found in {folder}")


NAN_BF16, INF_BF16, NEG_INF_BF16 = b"\xff\xff", b"\x80\x7f", b"\x80\xff"
NON_FINITE = {
    "lm_head NaN (0xFF bytes), q8": ("lm_head.weight", (7, 3), NAN_BF16, "mxfp4-q8"),
    "embedding inf, bf16": ("model.embed_tokens.weight", (1000, 63), INF_BF16, "mxfp4-bf16"),
    "attention bias -inf, q4": (
        "model.layers.2.self_attn.k_proj.bias",
        (5,),
        NEG_INF_BF16,
        "mxfp4-q4",
    ),
    "sinks NaN": ("model.layers.1.self_attn.sinks", (0,), NAN_BF16, "mxfp4-q8"),
    "norm inf": ("model.norm.weight", (2,), INF_BF16, "mxfp4-q8"),
    "expert bias NaN": (
        "model.layers.0.mlp.experts.gate_up_proj_bias",
        (3, 17),
        NAN_BF16,
        "mxfp4-q8",
    ),
}


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_nan_or_inf_in_a_float_tensor_is_refused(tmp_path, tiny_hf_checkpoint, case):
    name, index, value, recipe = NON_FINITE[case]
    shard = _poke(tiny_hf_checkpoint, name, index, value)
    with pytest.raises(CheckpointError) as e:
        convert(tiny_hf_checkpoint, tmp_path / "o", recipe=recipe, progress=False)
    assert str(e.value) == (
        f"{shard}: tensor {name!r} has a NaN or inf value at {list(index)}; the checkpoint is "
        "corrupt, download it again"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no OUT, no partial folder


def test_nan_dense_weights_through_the_cli(tmp_path, tiny_hf_checkpoint):
    """The issue's repro: 0xFF bytes in lm_head.weight, default (q8) recipe."""
    shard = _poke(tiny_hf_checkpoint, "lm_head.weight", (0, 0), NAN_BF16 * 4)
    out = tmp_path / "o"
    res = CliRunner().invoke(cli_main, ["convert", str(tiny_hf_checkpoint), str(out), "-q"])
    assert res.exit_code == 1
    assert res.output.splitlines() == [
        f"error: {shard}: tensor 'lm_head.weight' has a NaN or inf value at [0, 0]; the "
        "checkpoint is corrupt, download it again"
    ]
    assert not out.exists()


def test_nan_in_float32_and_original_layout_sources(tmp_path, tiny_cfg):
    src = write_hf_checkpoint(tmp_path / "f32", tiny_cfg, dtype="float32")
    name = "model.layers.1.self_attn.o_proj.weight"
    _poke(src, name, (4, 9), np.float32(np.inf).tobytes())
    with pytest.raises(CheckpointError, match=rf"'{name}' has a NaN or inf value at \[4, 9\]"):
        convert(src, tmp_path / "o", recipe="mxfp4-bf16", progress=False)
    # original/: q, k and v are rows of one stored qkv tensor; the position is in that tensor.
    orig = write_original_checkpoint(tmp_path / "orig", tiny_cfg)
    q_rows = tiny_cfg.num_attention_heads * tiny_cfg.head_dim
    _poke(orig, "block.2.attn.qkv.weight", (q_rows + 3, 1), NAN_BF16)
    with pytest.raises(
        CheckpointError,
        match=rf"'block\.2\.attn\.qkv\.weight' has a NaN or inf value at \[{q_rows + 3}, 1\]",
    ):
        convert(orig, tmp_path / "o", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f32", "orig"]


def test_check_finite_flags_exactly_nan_and_inf():
    from gptoss_mlx.convert.recipes import check_finite
    from gptoss_mlx.convert.source import SourceTensor

    class FakeFile:
        path = Path("x.safetensors")

    t = SourceTensor("t", "BF16", (8,), FakeFile(), "t")
    finite = [0x0000, 0x8000, 0x0001, 0x7F7F, 0xFF7F, 0x3F80, 0x807F]  # ±0, tiny, ±max, 1
    check_finite(np.array(finite, np.uint16), t)
    for bits in (0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFFF):
        with pytest.raises(CheckpointError, match=r"at \[1\]"):
            check_finite(np.array([0x3F80, bits], np.uint16), t)
    t32 = SourceTensor("t", "F32", (3,), FakeFile(), "t")
    check_finite(np.array([0.0, np.finfo(np.float32).max, -1e-45], np.float32), t32)
    with pytest.raises(CheckpointError, match=r"at \[2\]"):
        check_finite(np.array([0.0, 1.0, np.nan], np.float32), t32)


# ---------------------------------------------------------------- already converted folders


@pytest.mark.parametrize("recipe", ["mxfp4-q8", "mxfp4-bf16"])
def test_converting_our_converted_folder_says_use_it(tmp_path, tiny_hf_checkpoint, recipe):
    m = convert(tiny_hf_checkpoint, tmp_path / "m", recipe=recipe, progress=False).out
    res = CliRunner().invoke(cli_main, ["convert", str(m), str(tmp_path / "again"), "-q"])
    assert res.exit_code == 2
    assert res.output == f"error: {m} is already a converted MLX folder; use it with -m\n"
    # Even with its config.json stripped of every MLX hint, the tensor names give it away.
    cfg = json.loads((m / "config.json").read_text())
    for key in ("quantization", "quantization_config", "gptoss_mlx"):
        cfg.pop(key)
    (m / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="is already a converted MLX folder; use it with -m"):
        convert(m, tmp_path / "again", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m"]


@pytest.mark.parametrize("hints", ["config as written", "config without quantization"])
def test_converting_an_mlx_lm_folder_says_what_it_is(tmp_path, hints):
    mlx_lm_convert = pytest.importorskip("mlx_lm").convert
    src = write_hf_checkpoint(tmp_path / "hf", make_tiny_config(num_hidden_layers=2))
    lm = tmp_path / "lm"
    mlx_lm_convert(hf_path=str(src), mlx_path=str(lm), quantize=True, q_bits=8)
    with SafetensorsFile(next(lm.glob("*.safetensors"))) as f:
        assert "model.embed_tokens.scales" in f.tensors
    if hints == "config without quantization":
        cfg = json.loads((lm / "config.json").read_text())
        cfg.pop("quantization"), cfg.pop("quantization_config")
        (lm / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError) as e:
        convert(lm, tmp_path / "o", progress=False)
    assert str(e.value) == (
        f"{lm} is already a converted MLX folder, made by mlx-lm or another tool (no "
        "gptoss-mlx manifest.json); gptoss-mlx reads it as it is: use it with -m"
    )
    assert not (tmp_path / "o").exists()


def test_a_folder_named_like_our_temporary_one_is_never_removed(tmp_path, tiny_hf_checkpoint):
    """The temporary folder is removed on failure only if this run created it."""
    squatter = tmp_path / f".o.partial-{os.getpid()}"
    squatter.mkdir()
    (squatter / "notes.txt").write_text("keep me")
    with pytest.raises(GptOssError, match=f"{squatter}: in the way of the temporary folder"):
        convert(tiny_hf_checkpoint, tmp_path / "o", progress=False)
    assert (squatter / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "o").exists()
