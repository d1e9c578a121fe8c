"""Our own safetensors reader and streaming writer: validated headers, per-tensor reads, no torch.

Headers are parsed and validated by the library (gptoss_mlx.safetensors_header, shared with the
loader); this module adds what only the converter needs: reading tensors and writing shards.

Reads go through seek + readv into fresh numpy buffers (no mmap), so a process's RSS only ever holds the
tensor, or the row range, it asked for. bfloat16 has no numpy dtype: it is read as uint16 bits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptoss_mlx.errors import CheckpointError
from gptoss_mlx.weights.safetensors_header import (  # noqa: F401 - re-exported for the converter
    DTYPES,
    MAX_HEADER_BYTES,
    REDOWNLOAD,
    TensorInfo,
    parse_header,
    read_header,
    read_header_fd,
)


class SafetensorsFile:
    """A validated safetensors file read tensor by tensor (or row range by row range).

    Use as a context manager, or call close(). Nothing is read until asked for.
    """

    def __init__(self, path: str | Path, max_header: int = MAX_HEADER_BYTES):
        self.path = Path(path)
        where = str(self.path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(f"{where}: not found") from None
        except OSError as e:
            raise CheckpointError(f"{where}: cannot open ({e.strerror})") from None
        try:
            header = read_header_fd(self._fd, where, max_header)
            self.tensors, self.metadata, self.size = header.tensors, header.metadata, header.size
        except BaseException:
            os.close(self._fd)
            raise

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name!r}") from None

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Raw values of `name` (bf16 as uint16), optionally only rows [start, stop) of axis 0."""
        info = self.info(name)
        start, stop = (0, info.shape[0] if info.shape else 1) if rows is None else rows
        nrows = info.shape[0] if info.shape else 1
        if not 0 <= start <= stop <= nrows:
            raise ValueError(f"rows {rows} out of range for {name} with {nrows} rows")
        offset = info.begin + start * info.row_bytes
        want = (stop - start) * info.row_bytes
        out = np.empty(want, dtype=np.uint8)
        view = memoryview(out)
        got = 0
        while got < want:
            # Reads may come back short (large requests, signals): loop until done.
            os.lseek(self._fd, offset + got, os.SEEK_SET)
            chunk = os.readv(self._fd, [view[got:]])
            if chunk == 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} truncated; {REDOWNLOAD}")
            got += chunk
        shape = info.shape if rows is None else (stop - start, *info.shape[1:])
        return out.view(DTYPES[info.dtype][1]).reshape(shape)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor planned for writing: name, safetensors dtype, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][0]


def build_header(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """Header bytes (length prefix included) for tensors laid out in the given order."""
    obj: dict = {}
    if metadata:
        obj["__metadata__"] = dict(metadata)
    pos = 0
    for s in specs:
        if s.name in obj or s.name == "__metadata__":
            raise ValueError(f"duplicate tensor name {s.name!r}")
        obj[s.name] = {
            "dtype": s.dtype,
            "shape": list(s.shape),
            "data_offsets": [pos, pos + s.nbytes],
        }
        pos += s.nbytes
    head = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    # Pad with spaces so the data buffer starts 8-byte aligned, as the reference writer does.
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head


class SafetensorsWriter:
    """Write a safetensors file in one pass: header first, then each planned tensor's bytes in order.

    `write(name, data)` takes the next chunk of the tensor being written (any number of chunks per
    tensor, in the planned order); sizes are checked per tensor so nothing is silently misplaced.
    The sha256 of the whole file is computed while writing (`sha256` after close()).
    """

    def __init__(
        self,
        path: str | Path,
        specs: Sequence[TensorSpec],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.specs = list(specs)
        header = build_header(self.specs, metadata)
        self.size = len(header) + sum(s.nbytes for s in self.specs)
        self._hash = hashlib.sha256()
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._i = 0
        self._done = 0  # bytes of specs[_i] written so far
        self._emit(header)
        self.sha256: str | None = None

    def _emit(self, data) -> None:
        self._f.write(data)
        self._hash.update(data)

    @property
    def current(self) -> TensorSpec | None:
        """The tensor the next write() continues (skipping zero-size tensors), or None when done."""
        while self._i < len(self.specs) and self.specs[self._i].nbytes == 0:
            self._i += 1
        return self.specs[self._i] if self._i < len(self.specs) else None

    def write(self, name: str, data: np.ndarray | bytes | memoryview) -> None:
        spec = self.current
        if spec is None or spec.name != name:
            want = repr(spec.name) if spec else "nothing"
            raise ValueError(f"{self.path.name}: got bytes for {name!r}, expected {want}")
        buf = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data)
        buf = buf.cast("B")
        if self._done + buf.nbytes > spec.nbytes:
            raise ValueError(
                f"{self.path.name}: {name!r} got {self._done + buf.nbytes} bytes, "
                f"planned {spec.nbytes}"
            )
        self._emit(buf)
        self._done += buf.nbytes
        if self._done == spec.nbytes:
            self._i += 1
            self._done = 0

    def close(self) -> str:
        """Check every planned tensor was written, flush, fsync; returns the file's sha256."""
        if self._f.closed:
            return self.sha256 or ""
        try:
            spec = self.current
            if spec is not None:
                raise ValueError(
                    f"{self.path.name}: {spec.name!r} incomplete ({self._done}/{spec.nbytes} bytes)"
                )
            self._f.flush()
            os.fsync(self._f.fileno())
        finally:
            self._f.close()
        self.sha256 = self._hash.hexdigest()
        return self.sha256

    def abort(self) -> None:
        """Close without checks (the caller removes the file)."""
        if not self._f.closed:
            self._f.close()


def write_tensors(
    path: str | Path,
    tensors: Iterable[tuple[str, str, np.ndarray]],
    metadata: dict[str, str] | None = None,
) -> str:
    """Write small in-memory tensors [(name, dtype, raw array)] in one go; returns the sha256."""
    items = list(tensors)
    specs = [TensorSpec(n, d, tuple(a.shape)) for n, d, a in items]
    w = SafetensorsWriter(path, specs, metadata)
    try:
        for n, _, a in items:
            if a.size:
                w.write(n, a)
        return w.close()
    except BaseException:
        w.abort()
        raise
