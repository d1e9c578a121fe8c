"""MLX conversions of gpt-oss that others made, read as they are: folders written by
`mlx_lm.convert`, published by mlx-community, downloaded by LM Studio.

They use mlx-lm's tensor names (as ours do) and declare their quantization in config.json: a
top-level default plus per-module entries (a quantized router, 8-bit attention next to MXFP4
experts, affine 2-8 bits at group 32/64/128, mxfp8, nvfp4), or none at all. They carry no manifest,
so nothing records their files' sizes or hashes: what can be checked is what the files say about
themselves. Every shard's header is validated (safetensors_header) and the tensors' names, shapes
and dtypes compared with config.json (layout) before MLX opens a shard, exactly as for our folders.

A folder counts as such a conversion when its config.json is gpt_oss, not ours (no "gptoss_mlx"
entry, no manifest.json), and either declares MLX's "quantization" or holds MLX tensor names
(split expert projections, `.scales`). Hugging Face checkpoints have neither, so they are never
mistaken for one (and are converted instead).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..model.config import ModelConfig
from .layout import check_weights, layout_weights, resolve_schemes
from .loading import (
    CONFIG,
    INDEX,
    MANIFEST,
    ConvertedFolder,
    check_index,
    collect_tensors,
    read_json,
)
from .safetensors_header import read_header

KIND = "mlx-lm"  # ConvertedFolder.kind of these folders
DOWNLOAD_AGAIN = "download or convert it again"
# Floating-point dtypes such a folder may store (mlx_lm.convert --dtype); all are cast to the
# activation dtype when loaded.
FLOAT_CODES = ("BF16", "F16", "F32")
# Tensor names only converted MLX folders hold, never a checkpoint: quantization ("x.scales",
# where checkpoints say "x_scales") and the experts split into gate/up/down projections.
MLX_NAME = re.compile(r".+\.(?:scales|biases)|.+\.mlp\.experts\.(?:gate|up|down)_proj\..+")
_SHARD = re.compile(r"model[A-Za-z0-9_.-]*\.safetensors")  # what mlx-lm's loader globs
_SMALL_JSON = 16 << 20  # config.json and the index are kilobytes; never parse a stranger's giant
# Files of such a folder besides the shards (their sizes count towards its size on disk).
_EXTRAS = (
    CONFIG,
    INDEX,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def small_json(path: Path) -> Any:
    """A small JSON file's content, or None when missing, too large or not JSON (never raises)."""
    try:
        if not path.is_file() or path.stat().st_size > _SMALL_JSON:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def _tensor_names(folder: Path) -> list[str]:
    """Stored tensor names, from the index or else the first shard's header (never raises)."""
    index = small_json(folder / INDEX)
    if isinstance(index, dict) and isinstance(index.get("weight_map"), dict):
        return [str(k) for k in index["weight_map"]]
    for shard in sorted(folder.glob("model*.safetensors"))[:1]:
        try:
            return list(read_header(shard).tensors)
        except CheckpointError:
            return []
    return []


def is_mlx_folder(folder: str | Path) -> bool:
    """True for a folder holding an MLX conversion of gpt-oss that gptoss-mlx did not write."""
    folder = Path(folder).expanduser()
    if not folder.is_dir() or (folder / MANIFEST).exists():
        return False
    raw = small_json(folder / CONFIG)
    if not isinstance(raw, dict) or raw.get("model_type") != "gpt_oss" or "gptoss_mlx" in raw:
        return False
    return "quantization" in raw or any(MLX_NAME.fullmatch(n) for n in _tensor_names(folder))


def shard_names(folder: Path) -> list[str]:
    """The shard files: those the index maps tensors to, else every model*.safetensors (as
    mlx-lm's loader finds them). Only plain file names inside the folder are accepted."""
    index_path = folder / INDEX
    if index_path.exists():
        index = read_json(index_path)
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointError(
                f"{index_path}: no weight_map of tensor -> file; {DOWNLOAD_AGAIN}"
            )
        names = sorted(set(wm.values()))
        for name in names:
            if not _SHARD.fullmatch(name):
                raise CheckpointError(
                    f"{index_path}: {name!r} is not a shard file name inside the folder; "
                    f"{DOWNLOAD_AGAIN}"
                )
    else:
        names = sorted(p.name for p in folder.glob("model*.safetensors"))
    if not names:
        raise CheckpointError(f"{folder}: no model*.safetensors shards; {DOWNLOAD_AGAIN}")
    return names


def float_code(found: dict[str, tuple], source: str) -> str:
    """The dtype of the folder's floating-point tensors, read from the final norm's header entry
    (mlx_lm.convert writes every float tensor in one dtype)."""
    shape_dtype = found.get("model.norm.weight")
    if shape_dtype is None:
        return "BF16"  # the layout check reports the missing tensor by name
    dtype = shape_dtype[1]
    if dtype not in FLOAT_CODES:
        raise CheckpointError(
            f"{shape_dtype[2]}: tensor 'model.norm.weight' has dtype {dtype}, expected one of "
            f"{', '.join(FLOAT_CODES)}; {DOWNLOAD_AGAIN}"
        )
    return dtype


def inspect_mlx_folder(path: str | Path) -> ConvertedFolder:
    """Check an MLX conversion made by others as far as it can be checked before MLX opens a file.

    config.json's bounds, every shard's safetensors header, the tensors' names, shapes and dtypes
    against config.json and its quantization (see layout.resolve_schemes), and the index when there
    is one. Shards may be symbolic links (the Hugging Face cache links them to its blobs).
    Raises CheckpointError or ConfigError with one line naming the file (and tensor) at fault.
    """
    folder = Path(path).expanduser()
    source = str(folder / CONFIG)
    raw = read_json(folder / CONFIG)
    cfg = ModelConfig.from_dict(raw, source=source)
    shards = shard_names(folder)
    headers = {name: read_header(folder / name, advice=DOWNLOAD_AGAIN) for name in shards}
    found = collect_tensors(folder, headers, DOWNLOAD_AGAIN)
    schemes = resolve_schemes(cfg, raw.get("quantization") or {}, found, source, stored=found)
    f = float_code(found, source)
    expected = layout_weights(cfg, f, schemes, source)
    # mlx-lm loads float tensors of any float dtype (all are cast to the activation dtype), and
    # some converters mix them: only integer payloads must have exactly the dtype implied.
    as_checked = {n: (sh, f if d in FLOAT_CODES else d, w) for n, (sh, d, w) in found.items()}
    check_weights(as_checked, expected, str(folder), DOWNLOAD_AGAIN)
    if (folder / INDEX).exists():
        check_index(folder, headers, DOWNLOAD_AGAIN)
    files = {
        name: {"size": (folder / name).stat().st_size}
        for name in (*shards, *_EXTRAS)
        if (folder / name).is_file()
    }
    return ConvertedFolder(
        folder, files, raw, cfg, headers, schemes, kind=KIND, advice=DOWNLOAD_AGAIN
    )
