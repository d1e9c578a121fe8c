"""Fetch from the Hugging Face Hub only what is needed: a checkpoint's HF-layout files, an MLX
conversion's weights and tokenizer, or just the config and index to tell the two apart."""

from __future__ import annotations

import re
from pathlib import Path

from gptoss_mlx.errors import CheckpointError

from .source import cache_revision

# The HF layout only. original/ (a second copy of the weights) and metal/ are never fetched. An
# MLX conversion (mlx-community, LM Studio's downloads) needs exactly these files too, and is used
# as it is. Code files (*.py) are never fetched.
HF_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template.jinja",
]
_REPO_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


# Enough to tell an MLX conversion from a checkpoint before downloading gigabytes.
PROBE_PATTERNS = ["config.json", "model.safetensors.index.json"]


def looks_like_repo_id(s: str) -> bool:
    """True for `owner/name` strings that are not an existing local path."""
    return bool(_REPO_ID_RE.fullmatch(s)) and ".." not in s and not Path(s).exists()


def snapshot(repo_id: str, patterns: list[str], revision: str | None = None) -> Path:
    """The snapshot folder of `repo_id` with the files matching `patterns`, downloaded (or found
    in the local Hugging Face cache when offline). Raises CheckpointError with one line saying what
    to download or pass when the hub cannot be reached or refuses."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = f" at revision {revision!r}" if revision else ""
    hint = (
        f"download it elsewhere (hf download {repo_id} --exclude 'original/*' "
        "'metal/*') and pass the folder instead"
    )
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise CheckpointError(
            f"{repo_id}: gated on the Hugging Face Hub; accept its terms and log in "
            "(hf auth login), or pass a local folder"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: no such repo on the Hugging Face Hub (or it is private); check the id, "
            "or pass a local folder"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(
            f"{repo_id}: no revision {revision!r} on the Hugging Face Hub"
        ) from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo_id}{rev}: not in the local cache and the Hugging Face Hub cannot be reached "
            f"(offline?); {hint}"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{repo_id}{rev}: download failed ({first}); {hint}") from None


def cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot of `repo_id`'s main revision in the local Hugging Face cache, without touching
    the network (None when it is not there)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def download(repo_id: str, revision: str | None = None) -> tuple[Path, str | None]:
    """Download (or find in the local cache) the HF-layout files of `repo_id`.

    Returns (snapshot folder, commit sha). Raises CheckpointError as `snapshot` does.
    """
    path = snapshot(repo_id, HF_PATTERNS, revision)
    return path, cache_revision(path)


def fetch_config(repo_id: str) -> dict:
    """The config.json of hub repo `repo_id` and nothing else (from the local cache offline).
    Raises CheckpointError as `snapshot` does, or when the file is not a JSON object."""
    import json

    path = snapshot(repo_id, ["config.json"]) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{repo_id}: the repo has no config.json") from None
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{repo_id}: config.json is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{repo_id}: config.json is not a JSON object")
    return raw
