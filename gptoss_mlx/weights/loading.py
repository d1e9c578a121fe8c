"""Load a converted folder: check it, build the model, map the weights lazily.

Two kinds of folder load: ours (`gptoss-mlx convert`, with a manifest of sizes and sha256) and MLX
conversions others made for gpt_oss (mlx_lm.convert, mlx-community, LM Studio), read as they are
(mlx_folder.py). Both go through the same checks of headers, shapes and index before MLX opens a
shard, and the same loader.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import CheckpointError
from ..model.config import ModelConfig
from ..model.cpu_streams import default_threads, shard_model
from ..model.moe import MXFP4, ExpertLinear
from ..model.transformer import GptOss
from .layout import Scheme, check_weights, float_dtype, layout_weights, resolve_schemes
from .safetensors_header import Header, read_header

MANIFEST = "manifest.json"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
FORMAT = "gptoss-mlx"
FORMAT_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONVERT_AGAIN = "convert the checkpoint again"


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
    except ValueError as e:  # bad UTF-8 or JSON, or a number of over 4300 digits
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None


def read_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Return {relative name: {"size", "sha256"}}; refuse folders that are not ours."""
    if not (folder / MANIFEST).exists():
        raise CheckpointError(
            f"{folder}: no {MANIFEST}; this is not a gptoss-mlx folder "
            "(convert a checkpoint with `gptoss-mlx convert SRC OUT`)"
        )
    m = read_json(folder / MANIFEST)
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("files"), dict):
        raise CheckpointError(f"{folder / MANIFEST}: not a gptoss-mlx manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder / MANIFEST}: format_version {m.get('format_version')!r} is not supported "
            f"(expected {FORMAT_VERSION}); convert the checkpoint again with this version"
        )
    for name, meta in m["files"].items():
        _check_manifest_entry(folder / MANIFEST, name, meta)
    return m["files"]


def _check_manifest_entry(where: Path, name: str, meta: Any) -> None:
    """A manifest entry names a plain relative path inside the folder and its size and sha256."""
    parts = PurePosixPath(name).parts
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\0" in name
        or ".." in parts
        or "." in name.split("/")
        or "" in name.split("/")
        or name == MANIFEST
    ):
        raise CheckpointError(
            f"{where}: entry {name!r} is not a file name inside the folder; {_CONVERT_AGAIN}"
        )
    size = meta.get("size") if isinstance(meta, dict) else None
    sha = meta.get("sha256") if isinstance(meta, dict) else None
    if type(size) is not int or size < 0 or not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise CheckpointError(
            f"{where}: entry {name!r} needs an integer size and a sha256; {_CONVERT_AGAIN}"
        )


def check_files(folder: Path, files: dict[str, dict[str, Any]]) -> None:
    """Cheap integrity check at every load: every listed file exists with its recorded size.
    (`gptoss-mlx verify` also checks the sha256 of each file.)"""
    problems = []
    root = folder.resolve()
    for name, meta in files.items():
        p = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{name} (path leaves the folder)")
        elif not p.resolve().is_relative_to(root):
            problems.append(f"{name} (a link leading outside the folder)")
        elif not p.is_file():
            problems.append(f"{name} (missing)")
        elif p.stat().st_size != meta.get("size"):
            problems.append(f"{name} (size {p.stat().st_size}, manifest says {meta.get('size')})")
    if problems:
        shown = ", ".join(problems[:3]) + (
            f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        raise CheckpointError(
            f"{folder}: files changed since conversion: {shown}; {_CONVERT_AGAIN}"
        )


def _quantize_like_checkpoint(model: GptOss, schemes: dict[str, Scheme | None]) -> None:
    """Store every matrix the way the folder does (`schemes`, from layout.resolve_schemes):
    quantized Linear/Embedding layers where it has scales, experts in their stored mode."""
    cfg = model.config
    H, I, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts  # noqa: E741
    shapes = {"gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}  # (in, out)
    for i, block in enumerate(model.layers):
        for proj, (cols, rows) in shapes.items():
            scheme = schemes.get(f"model.layers.{i}.mlp.experts.{proj}")
            if scheme != MXFP4:  # the model is built with the experts as released
                block.mlp.experts[proj] = ExpertLinear(E, cols, rows, scheme)

    def predicate(path: str, module: nn.Module) -> bool | dict:
        scheme = schemes.get(path)
        if not hasattr(module, "to_quantized") or scheme is None:
            return False
        return dict(zip(("mode", "bits", "group_size"), scheme, strict=True))

    nn.quantize(model, class_predicate=predicate)


@dataclass
class ConvertedFolder:
    """A converted folder whose manifest (ours), file sizes, config and shard headers were all
    checked."""

    path: Path
    files: dict[str, dict[str, Any]]  # ours: the manifest's entries; others: {"size"} per file
    raw_config: dict[str, Any]
    config: ModelConfig
    headers: dict[str, Header]  # shard file name -> its validated header
    schemes: dict[str, Scheme | None] = field(default_factory=dict)  # module -> how stored
    kind: str = FORMAT  # FORMAT (ours, with a manifest) or mlx_folder.KIND
    advice: str = _CONVERT_AGAIN  # what to do when the folder turns out broken

    @property
    def has_manifest(self) -> bool:
        return self.kind == FORMAT


def collect_tensors(
    folder: Path, headers: dict[str, Header], advice: str
) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """{tensor name: (shape, dtype, file)} over every shard; a name in two shards is refused."""
    found: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for name, header in headers.items():
        for t in header.tensors.values():
            if t.name in found:
                raise CheckpointError(
                    f"{folder / name}: tensor {t.name!r} is also in {found[t.name][2]}; {advice}"
                )
            found[t.name] = (t.shape, t.dtype, str(folder / name))
    return found


def inspect_folder(path: str | Path) -> ConvertedFolder:
    """Check everything about a converted folder that can be checked before MLX opens a file.

    In order: the manifest (well-formed, plain names inside the folder), every listed file's
    presence and size, config.json's bounds, each shard's safetensors header (see
    safetensors_header), the tensors' names, shapes and dtypes against config.json, and the index.
    Raises CheckpointError or ConfigError with one line naming the file (and tensor) at fault.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    from .mlx_folder import inspect_mlx_folder, is_mlx_folder  # it builds on this module

    if not (folder / MANIFEST).exists() and is_mlx_folder(folder):
        return inspect_mlx_folder(folder)
    files = read_manifest(folder)
    for needed in (CONFIG, INDEX):
        if needed not in files:
            raise CheckpointError(f"{folder / MANIFEST}: does not list {needed}; {_CONVERT_AGAIN}")
    check_files(folder, files)
    raw = read_json(folder / CONFIG)
    cfg = ModelConfig.from_dict(raw, source=str(folder / CONFIG))
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    if not shards:
        raise CheckpointError(f"{folder / MANIFEST}: lists no .safetensors shards")
    headers = {name: read_header(folder / name, advice=_CONVERT_AGAIN) for name in shards}
    found = collect_tensors(folder, headers, _CONVERT_AGAIN)
    source = str(folder / CONFIG)
    f = float_dtype(raw, source)
    schemes = resolve_schemes(cfg, raw.get("quantization") or {}, found, source)
    check_weights(found, layout_weights(cfg, f, schemes, source), str(folder))
    check_index(folder, headers, _CONVERT_AGAIN)
    return ConvertedFolder(folder, files, raw, cfg, headers, schemes)


def check_index(folder: Path, headers: dict[str, Header], advice: str) -> None:
    """The index must map exactly the stored tensors to the shards that hold them (mlx-lm and the
    memory preflight read it)."""
    where = folder / INDEX
    index = read_json(where)
    wm = index.get("weight_map") if isinstance(index, dict) else None
    held = {t: shard for shard, h in headers.items() for t in h.tensors}
    if wm != held:
        diff = sorted(set(wm) ^ set(held)) if isinstance(wm, dict) else []
        what = f" (first difference: {diff[0]!r})" if diff else ""
        raise CheckpointError(f"{where}: weight_map disagrees with the shards{what}; {advice}")


def load_model(
    path: str | Path, dtype: mx.Dtype | None = None, threads: int | None = None
) -> GptOss:
    """Load the model of a converted folder. Every shard's header is validated against
    config.json first (inspect_folder); then weights are mapped lazily from the shards that the
    manifest lists; nothing else in the folder is read.

    On MLX's CPU backend the large matmuls are split across `threads` CPU streams (default:
    sharding.default_threads(), i.e. $GPTOSS_MLX_THREADS or the usable cores); 1 splits nothing.
    """
    return load_checked(inspect_folder(path), dtype, threads)


def load_checked(folder: ConvertedFolder, dtype: mx.Dtype | None, threads: int | None) -> GptOss:
    weights: dict[str, mx.array] = {}
    for name in folder.headers:
        path = folder.path / name
        try:
            weights.update(mx.load(str(path)))
        except Exception as e:  # changed since inspect_folder; MLX raises RuntimeError/ValueError
            raise CheckpointError(f"{path}: cannot be read ({e}); {folder.advice}") from None

    dtype = dtype or default_dtype()
    model = GptOss(folder.config, dtype=dtype)
    _quantize_like_checkpoint(model, folder.schemes)
    # Float weights run in the activation dtype; quantized payloads (uint32/uint8) stay as stored.
    weights = {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
    }
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise CheckpointError(f"{folder.path}: weights do not match config.json ({e})") from None
    mx.eval(model.parameters())
    model.eval()
    del weights  # sharding copies expert weights layer by layer: let each original go in turn
    if mx.default_device() == mx.cpu:
        shard_model(model, default_threads() if threads is None else threads)
    return model
