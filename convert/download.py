"""Fetch a gpt-oss checkpoint from the Hugging Face Hub: only the files the HF layout needs."""

from __future__ import annotations

import re
from pathlib import Path

from gptoss_mlx.errors import CheckpointError

from .source import cache_revision

# The HF layout only. original/ (a second copy of the weights) and metal/ are never fetched.
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


def looks_like_repo_id(s: str) -> bool:
    """True for `owner/name` strings that are not an existing local path."""
    return bool(_REPO_ID_RE.fullmatch(s)) and ".." not in s and not Path(s).exists()


def download(repo_id: str, revision: str | None = None) -> tuple[Path, str | None]:
    """Download (or find in the local cache) the HF-layout files of `repo_id`.

    Returns (snapshot folder, commit sha). Raises CheckpointError with one line saying what to
    download or pass when the hub cannot be reached or refuses.
    """
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
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HF_PATTERNS))
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
    return path, cache_revision(path)
