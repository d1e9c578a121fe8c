"""`--model` resolution: a converted folder is used as it is; a Hugging Face-layout folder or a
hub repo id is converted once (default recipe) into the model cache and reused after that.

The cache lives in $GPTOSS_MLX_HOME (default ~/.cache/gptoss-mlx). Once a model is there nothing
touches the network again, so `gptoss-mlx chat` works offline after its first run.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from gptoss_mlx.errors import CheckpointError, UsageError
from gptoss_mlx.weights.loading import MANIFEST

from .download import looks_like_repo_id

DEFAULT_MODEL = "openai/gpt-oss-20b"
DEFAULT_RECIPE = "mxfp4-q8"


def home() -> Path:
    """The folder holding converted models ($GPTOSS_MLX_HOME, default ~/.cache/gptoss-mlx)."""
    return Path(os.environ.get("GPTOSS_MLX_HOME") or "~/.cache/gptoss-mlx").expanduser()


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


def resolve_model(spec: str | None, *, progress: bool = True) -> Path:
    """Return a converted folder for `spec`, converting into the cache on first use."""
    spec = spec or DEFAULT_MODEL
    local = Path(spec).expanduser()
    if local.is_dir() and is_converted(local):
        return local
    if local.exists() and not local.is_dir():
        raise UsageError(f"--model {spec}: is a file; pass a model folder or a hub repo id")
    if not local.exists() and not looks_like_repo_id(spec):
        raise UsageError(
            f"--model {spec}: no such folder, and not a Hugging Face repo id like {DEFAULT_MODEL}"
        )
    target = cache_path(spec)
    if is_converted(target):
        return target
    from .convert import convert

    if progress:
        import sys

        print(f"First use of {spec}: converting it once into {target}", file=sys.stderr)
    try:
        convert(spec, target, recipe=DEFAULT_RECIPE, progress=progress)
    except CheckpointError as e:
        raise CheckpointError(
            f"{e} (no converted copy in {home()}; pass --model with a converted folder)"
        ) from None
    return target
