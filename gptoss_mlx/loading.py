"""Load a converted gptoss-mlx folder: check its manifest, build the model, map the weights lazily."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .errors import CheckpointError
from .model import GptOss

MANIFEST = "manifest.json"
FORMAT = "gptoss-mlx"
FORMAT_VERSION = 1


def default_dtype() -> mx.Dtype:
    """The activation dtype for this machine's default device.

    MLX's CPU backend runs its quantized kernels far faster with float32 inputs than with
    bfloat16 ones (an MXFP4 5760x2880 matrix-vector product: 4.4 ms vs 62 ms, mlx 0.32.4); on
    Metal/CUDA bfloat16 halves memory traffic, which is what bounds decoding there.
    """
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Return {relative name: {"size", "sha256"}}; refuse folders that are not ours."""
    m = read_json(folder / MANIFEST) if (folder / MANIFEST).exists() else None
    if m is None:
        raise CheckpointError(
            f"{folder}: no {MANIFEST}; this is not a gptoss-mlx folder "
            "(convert a checkpoint with `gptoss-mlx convert SRC OUT`)"
        )
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("files"), dict):
        raise CheckpointError(f"{folder / MANIFEST}: not a gptoss-mlx manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder / MANIFEST}: format_version {m.get('format_version')!r} is not supported "
            f"(expected {FORMAT_VERSION}); convert the checkpoint again with this version"
        )
    return m["files"]


def check_files(folder: Path, files: dict[str, dict[str, Any]]) -> None:
    """Cheap integrity check at every load: every listed file exists with its recorded size.
    (`gptoss-mlx verify` also checks the sha256 of each file.)"""
    problems = []
    for name, meta in files.items():
        p = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{name} (path leaves the folder)")
        elif not p.is_file():
            problems.append(f"{name} (missing)")
        elif p.stat().st_size != meta.get("size"):
            problems.append(f"{name} (size {p.stat().st_size}, manifest says {meta.get('size')})")
    if problems:
        shown = ", ".join(problems[:3]) + (
            f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        raise CheckpointError(f"{folder}: files changed since conversion: {shown}; convert again")


def _quantize_like_checkpoint(model: nn.Module, qcfg: dict[str, Any], names: set[str]) -> None:
    """Swap Linear/Embedding layers for quantized ones wherever the checkpoint has scales."""
    default = {k: qcfg[k] for k in ("group_size", "bits", "mode") if k in qcfg}

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in names:
            return False
        spec = qcfg.get(path, default)
        if spec is False or not isinstance(spec, dict):
            raise CheckpointError(
                f"config.json: quantization for {path} is {spec!r} but it has scales"
            )
        return dict(spec)

    nn.quantize(model, class_predicate=predicate)


def load_model(path: str | Path, dtype: mx.Dtype | None = None) -> GptOss:
    """Load the model of a converted folder. Weights are mapped lazily from the shards that the
    manifest lists; nothing else in the folder is read."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    files = read_manifest(folder)
    check_files(folder, files)
    raw = read_json(folder / "config.json")
    cfg = ModelConfig.from_dict(raw, source=str(folder / "config.json"))
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    if not shards:
        raise CheckpointError(f"{folder / MANIFEST}: lists no .safetensors shards")
    weights: dict[str, mx.array] = {}
    for name in shards:
        try:
            part = mx.load(str(folder / name))
        except Exception as e:  # MLX raises RuntimeError/ValueError for corrupt files
            raise CheckpointError(f"{folder / name}: cannot be read ({e}); convert again") from None
        dup = weights.keys() & part.keys()
        if dup:
            raise CheckpointError(f"{folder / name}: tensor {sorted(dup)[0]} is in two shards")
        weights.update(part)

    dtype = dtype or default_dtype()
    model = GptOss(cfg, dtype=dtype)
    _quantize_like_checkpoint(model, raw.get("quantization") or {}, set(weights))
    # Float weights run in the activation dtype; quantized payloads (uint32/uint8) stay as stored.
    weights = {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
    }
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise CheckpointError(f"{folder}: weights do not match config.json ({e})") from None
    mx.eval(model.parameters())
    model.eval()
    return model


def load(path: str | Path, dtype: mx.Dtype | None = None) -> tuple[GptOss, Any]:
    """Load a converted folder: `model, tokenizer = gptoss_mlx.load(path)`.

    `dtype` is the activation dtype (default: float32 on MLX's CPU backend, bfloat16 on a GPU).
    """
    from .tokenizer import load_tokenizer

    model = load_model(path, dtype)
    return model, load_tokenizer(Path(path).expanduser())


def load_for_inference(
    path: str | Path, max_context: int | None = None, batch: int = 1, dtype: mx.Dtype | None = None
) -> tuple[GptOss, Any, int]:
    """Preflight memory, then load: returns (model, tokenizer, context limit to enforce).

    The context limit is `max_context` when it fits, else (when None) the largest of
    128k/64k/32k/16k/8k/4k tokens that fits this device next to the weights. Raises
    MemoryPreflightError, saying what to change, before anything is loaded when nothing fits.
    """
    from .memory import choose_max_context, plan_memory, set_wired_limit

    folder = Path(path).expanduser()
    check_files(folder, read_manifest(folder))
    cfg = ModelConfig.from_dict(
        read_json(folder / "config.json"), source=str(folder / "config.json")
    )
    dtype = dtype or default_dtype()
    plan = plan_memory(folder, cfg, dtype)
    context = choose_max_context(plan, max_context, cfg.max_position_embeddings, batch)
    set_wired_limit()
    model, tokenizer = load(folder, dtype)
    return model, tokenizer, context
