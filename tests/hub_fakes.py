"""A Hugging Face cache written in huggingface_hub's real layout, and a hub that "downloads" into it
(imported like `conftest`).

`put_in_cache` lays a folder's files out exactly as huggingface_hub does (blobs named by their
sha256, snapshots/<commit>/ links to them, refs/main), so huggingface_hub's own scan_cache_dir and
snapshot_download(local_files_only=True) read it. `FakeHub` stands in for the network only: its
snapshot_download copies what allow_patterns select from a local folder into that cache, records
every call, and hands local_files_only calls to the real function.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from pathlib import Path

import pytest


def put_in_cache(cache: Path, repo_id: str, src: Path, patterns: list[str] | None = None) -> Path:
    """Copy the files of `src` that match `patterns` (all when None) into `cache` as revision
    main of `repo_id`; returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for f in sorted(src.iterdir()):
        if not f.is_file() or (patterns and not any(fnmatch.fnmatch(f.name, p) for p in patterns)):
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / f.name
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, snap))
    return snap


class FakeHub:
    """Repos the fake network serves: {repo id: local folder}."""

    def __init__(self, cache: Path):
        from huggingface_hub import snapshot_download

        self.real = snapshot_download  # taken before the fixture replaces it
        self.cache = cache
        self.repos: dict[str, Path] = {}
        self.calls: list[tuple[str, tuple[str, ...] | None]] = []  # (repo id, allow_patterns)

    def snapshot_download(self, repo_id, *, revision=None, allow_patterns=None, **kw):
        from huggingface_hub.errors import RepositoryNotFoundError

        if kw.get("local_files_only"):
            return self.real(
                repo_id, revision=revision, local_files_only=True, cache_dir=self.cache
            )
        self.calls.append((repo_id, tuple(allow_patterns) if allow_patterns else None))
        if repo_id not in self.repos:
            import httpx2  # huggingface_hub's own HTTP client: its errors carry a response

            url = f"https://huggingface.co/api/models/{repo_id}"
            response = httpx2.Response(404, request=httpx2.Request("GET", url))
            raise RepositoryNotFoundError(f"404: {repo_id}", response=response)
        return str(put_in_cache(self.cache, repo_id, self.repos[repo_id], allow_patterns))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache that huggingface_hub uses, offline."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def hub(hf_cache, monkeypatch) -> FakeHub:
    """The fake network in front of `hf_cache`: huggingface_hub.snapshot_download is replaced."""
    import huggingface_hub

    fake = FakeHub(hf_cache)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake
