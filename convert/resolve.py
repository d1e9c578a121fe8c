"""`--model` resolution: a converted folder (ours, or an MLX conversion made by mlx-lm,
mlx-community or LM Studio) is used as it is; so are the names `gptoss-mlx models` prints. A hub
repo id holding an MLX conversion is downloaded and used as it is; a Hugging Face-layout folder or
a hub repo id holding a checkpoint is converted once (default recipe) into the model cache and
reused after that.

The cache lives in $GPTOSS_MLX_HOME (default ~/.cache/gptoss-mlx). Once a model is there (or in
the Hugging Face cache, for MLX conversions) nothing touches the network again, so `gptoss-mlx
chat` works offline after its first run.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

from gptoss_mlx.errors import CheckpointError, UsageError
from gptoss_mlx.weights.loading import MANIFEST
from gptoss_mlx.weights.mlx_folder import is_mlx_folder

from . import download as hub
from .download import looks_like_repo_id
from .local_models import find_local, home

DEFAULT_MODEL = "openai/gpt-oss-20b"
DEFAULT_RECIPE = "mxfp4-q8"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "--", text).strip("-") or "model"


def cache_path(spec: str, recipe: str = DEFAULT_RECIPE) -> Path:
    """Where the converted copy of `spec` (a repo id or a local folder) lives in the cache."""
    local = Path(spec).expanduser()
    if local.exists():
        # Two folders with the same name must not share a cache entry: key on the full path.
        key = hashlib.sha256(str(local.resolve()).encode()).hexdigest()[:10]
        return home() / "models" / f"{_slug(local.resolve().name)}-{key}-{recipe}"
    return home() / "models" / f"{_slug(spec)}-{recipe}"


def is_converted(path: Path) -> bool:
    return (path / MANIFEST).is_file() and (path / "config.json").is_file()


def usable_as_is(path: Path) -> bool:
    """A folder the loader reads without converting: ours, or an MLX conversion made by others."""
    return path.is_dir() and (is_converted(path) or is_mlx_folder(path))


def _hub_mlx(spec: str, progress: bool) -> Path | None:
    """The snapshot of hub repo `spec` when it holds an MLX conversion (downloaded), else None
    (a checkpoint, to convert). (find_local has already looked in the Hugging Face cache.)"""
    probe = hub.snapshot(spec, hub.PROBE_PATTERNS)  # config.json and the index: kilobytes
    if not is_mlx_folder(probe):
        return None
    if progress:
        print(f"{spec} is an MLX conversion: downloading it to use as it is", file=sys.stderr)
    return hub.snapshot(spec, hub.HF_PATTERNS)


def resolve_model(spec: str | None, *, progress: bool = True) -> Path:
    """Return a folder the loader reads for `spec`, converting into the cache on first use."""
    spec = spec or DEFAULT_MODEL
    local = Path(spec).expanduser()
    if usable_as_is(local):
        return local
    if local.exists() and not local.is_dir():
        raise UsageError(f"--model {spec}: is a file; pass a model folder or a hub repo id")
    if not local.exists():
        named = find_local(spec)  # a name `gptoss-mlx models` printed
        if named is not None:
            return named
        if not looks_like_repo_id(spec):
            raise UsageError(
                f"--model {spec}: no such folder or model name (gptoss-mlx models lists them), "
                f"and not a Hugging Face repo id like {DEFAULT_MODEL}"
            )
    target = cache_path(spec)
    if is_converted(target):
        return target
    try:
        if not local.exists() and (mlx := _hub_mlx(spec, progress)) is not None:
            return mlx
        from .convert import convert

        if progress:
            print(f"First use of {spec}: converting it once into {target}", file=sys.stderr)
        convert(spec, target, recipe=DEFAULT_RECIPE, progress=progress)
    except CheckpointError as e:
        raise CheckpointError(
            f"{e} (no converted copy in {home()}; pass --model with a converted folder)"
        ) from None
    return target
