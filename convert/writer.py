"""Write a converted MLX folder: safetensors shards, index, JSON files, copied files, manifest.

Every file is hashed while it is written (sha256 for manifest.json) and fsynced before the folder
is renamed into place, so a folder that exists is a folder that is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .safetensors_io import SafetensorsWriter, TensorSpec, build_header

MANIFEST_NAME = "manifest.json"
INDEX_NAME = "model.safetensors.index.json"
FORMAT = "gptoss-mlx"
FORMAT_VERSION = 1
SHARD_METADATA = {"format": "mlx"}
_COPY_CHUNK = 8 << 20


def shard_name(i: int, n: int) -> str:
    """Hugging Face style, 1-based: model-00001-of-00003.safetensors."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def plan_shards(specs: Iterable[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    """Split tensors, kept in order, into shards whose data stays under `shard_size` bytes.

    A tensor larger than `shard_size` gets a shard of its own.
    """
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards if shards[0] else []


def shard_file_size(specs: list[TensorSpec]) -> int:
    """Bytes on disk of a shard: header plus data."""
    return len(build_header(specs, SHARD_METADATA)) + sum(s.nbytes for s in specs)


@dataclass
class FileRecord:
    size: int
    sha256: str


@dataclass
class FolderWriter:
    """Writes files into `folder` and remembers size + sha256 of each for the manifest."""

    folder: Path
    records: dict[str, FileRecord] = field(default_factory=dict)

    def write_bytes(self, name: str, data: bytes) -> None:
        path = self.folder / name
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.records[name] = FileRecord(len(data), hashlib.sha256(data).hexdigest())

    def write_json(self, name: str, obj: object) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))

    def copy_in(self, src: Path, name: str | None = None) -> None:
        """Copy a file (following symlinks, e.g. in the Hugging Face cache), hashing as it goes."""
        name = name or src.name
        h = hashlib.sha256()
        size = 0
        with open(src, "rb") as fin, open(self.folder / name, "wb") as fout:
            while chunk := fin.read(_COPY_CHUNK):
                h.update(chunk)
                fout.write(chunk)
                size += len(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        self.records[name] = FileRecord(size, h.hexdigest())

    def write_manifest(self) -> None:
        files = {n: {"size": r.size, "sha256": r.sha256} for n, r in sorted(self.records.items())}
        obj = {"format": FORMAT, "format_version": FORMAT_VERSION, "files": files}
        data = (json.dumps(obj, indent=2) + "\n").encode("utf-8")
        with open(self.folder / MANIFEST_NAME, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


class ShardedWriter:
    """Streams tensors, in plan order, into consecutive shards; one shard file open at a time."""

    def __init__(self, out: FolderWriter, shards: list[list[TensorSpec]]):
        self.out = out
        self.shards = shards
        self.names = [shard_name(i, len(shards)) for i in range(len(shards))]
        self._where = {s.name: i for i, shard in enumerate(shards) for s in shard}
        self._i = -1
        self._w: SafetensorsWriter | None = None

    def write(self, name: str, data: np.ndarray) -> None:
        i = self._where.get(name)
        if i is None:
            raise ValueError(f"tensor {name!r} is not in the plan")
        while self._i < i:
            self._next()
        self._w.write(name, data)

    def _next(self) -> None:
        self._finish_current()
        self._i += 1
        path = self.out.folder / self.names[self._i]
        self._w = SafetensorsWriter(path, self.shards[self._i], SHARD_METADATA)

    def _finish_current(self) -> None:
        if self._w is not None:
            sha = self._w.close()
            self.out.records[self._w.path.name] = FileRecord(self._w.size, sha)
            self._w = None

    def close(self) -> None:
        """Finish the last shard (and any trailing shards whose tensors are all empty)."""
        while self._i < len(self.shards) - 1:
            self._next()
        self._finish_current()

    def abort(self) -> None:
        if self._w is not None:
            self._w.abort()
            self._w = None

    def index(self) -> dict:
        total = sum(s.nbytes for shard in self.shards for s in shard)
        weight_map = {s.name: self.names[i] for i, shard in enumerate(self.shards) for s in shard}
        return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


def fsync_dir(path: Path) -> None:
    """Make a rename or new directory entry durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
