"""`gptoss-mlx verify`: check a converted folder against its manifest, byte for byte."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .loading import MANIFEST, read_manifest

_CHUNK = 8 << 20


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


@dataclass
class Problem:
    name: str
    what: str

    def __str__(self) -> str:
        return f"{self.name}: {self.what}"


def verify_folder(
    folder: str | Path, progress: Callable[[int], None] | None = None
) -> list[Problem]:
    """Return every difference between `folder` and its manifest (empty when intact).

    Checks that each listed file exists with its size and sha256, and reports files that the
    manifest does not list (other than the manifest itself)."""
    folder = Path(folder).expanduser()
    files = read_manifest(folder)
    problems: list[Problem] = []
    root = folder.resolve()
    for name, meta in sorted(files.items()):
        p = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(Problem(name, "path leaves the folder"))
            continue
        if not p.resolve().is_relative_to(root):
            problems.append(Problem(name, "a link leading outside the folder"))
            continue
        if not p.is_file():
            problems.append(Problem(name, "missing"))
            continue
        size = p.stat().st_size
        if size != meta.get("size"):
            problems.append(Problem(name, f"size {size}, manifest says {meta.get('size')}"))
            continue
        if sha256_file(p, progress) != meta.get("sha256"):
            problems.append(Problem(name, "sha256 differs from the manifest (file changed)"))
    listed = set(files) | {MANIFEST}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in listed:
            problems.append(Problem(rel, "not in the manifest"))
    return problems
