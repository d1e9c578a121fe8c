"""Our own safetensors reader and streaming writer: validated headers, per-tensor reads, no torch.

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, then N
bytes of UTF-8 JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the data buffer. Offsets are relative to the buffer, which they must cover exactly.

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

# safetensors dtype -> (bytes per element, numpy dtype used to hold the raw bits).
DTYPES: dict[str, tuple[int, np.dtype]] = {
    "BOOL": (1, np.dtype(np.bool_)),
    "U8": (1, np.dtype(np.uint8)),
    "I8": (1, np.dtype(np.int8)),
    "F8_E4M3": (1, np.dtype(np.uint8)),
    "F8_E5M2": (1, np.dtype(np.uint8)),
    "F8_E8M0": (1, np.dtype(np.uint8)),
    "U16": (2, np.dtype(np.uint16)),
    "I16": (2, np.dtype(np.int16)),
    "F16": (2, np.dtype(np.float16)),
    "BF16": (2, np.dtype(np.uint16)),
    "U32": (4, np.dtype(np.uint32)),
    "I32": (4, np.dtype(np.int32)),
    "F32": (4, np.dtype(np.float32)),
    "U64": (8, np.dtype(np.uint64)),
    "I64": (8, np.dtype(np.int64)),
    "F64": (8, np.dtype(np.float64)),
}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit
_MAX_DIM = 1 << 62
_LFS_MAGIC = b"version https://git-lfs"
_REDOWNLOAD = "download it again"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry; `begin`/`end` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along axis 0 (the whole tensor for a scalar)."""
        if not self.shape:
            return self.nbytes
        return DTYPES[self.dtype][0] * math.prod(self.shape[1:])


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {k!r}")
        seen[k] = v
    return seen


def parse_header(head: bytes, file_size: int, where: str) -> tuple[dict[str, TensorInfo], dict]:
    """Validate a safetensors header (the JSON bytes after the 8-byte length) against the file size.

    Returns ({name: TensorInfo}, metadata). Raises CheckpointError naming `where` and the tensor.
    """
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{where}: header is not UTF-8; {_REDOWNLOAD}") from None
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates)
    except ValueError as e:
        raise CheckpointError(f"{where}: header is not valid JSON ({e}); {_REDOWNLOAD}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: header is not a JSON object")
    meta = obj.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings")
    data_start = 8 + len(head)
    buffer_size = file_size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        infos[name] = _parse_entry(name, entry, data_start, buffer_size, where)
    # The buffer must be covered exactly: contiguous from 0, no holes, no overlaps, no tail.
    pos = 0
    for info in sorted(infos.values(), key=lambda t: (t.begin, t.end)):
        if info.begin - data_start != pos:
            what = (
                "overlaps the previous tensor" if info.begin - data_start < pos else "leaves a gap"
            )
            raise CheckpointError(f"{where}: tensor {info.name!r} {what} (data_offsets)")
        pos = info.end - data_start
    if pos != buffer_size:
        raise CheckpointError(
            f"{where}: {buffer_size - pos} trailing bytes after the last tensor; {_REDOWNLOAD}"
        )
    return infos, meta


def _parse_entry(name: str, entry: object, data_start: int, buffer_size: int, where: str):
    bad = f"{where}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{bad}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise CheckpointError(f"{bad}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < _MAX_DIM for d in shape):
        raise CheckpointError(f"{bad}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
    ):
        raise CheckpointError(f"{bad}: data_offsets must be two integers")
    begin, end = offsets
    if not 0 <= begin <= end <= buffer_size:
        raise CheckpointError(
            f"{bad}: data_offsets [{begin}, {end}] outside the {buffer_size}-byte buffer; "
            f"file truncated? {_REDOWNLOAD}"
        )
    # Python ints do not overflow; the bound above keeps the product honest anyway.
    expected = math.prod(shape) * DTYPES[dtype][0]
    if end - begin != expected:
        raise CheckpointError(
            f"{bad}: data_offsets span {end - begin} bytes, shape {shape} {dtype} needs {expected}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


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
            size = os.fstat(self._fd).st_size
            first = os.pread(self._fd, 8, 0)
            if size == 0:
                raise CheckpointError(f"{where}: file is empty; {_REDOWNLOAD}")
            if os.pread(self._fd, len(_LFS_MAGIC), 0) == _LFS_MAGIC:
                raise CheckpointError(
                    f"{where}: is a Git LFS pointer, not the weights; {_REDOWNLOAD} "
                    "(git lfs pull, or huggingface_hub)"
                )
            if len(first) < 8:
                raise CheckpointError(f"{where}: truncated ({size} bytes); {_REDOWNLOAD}")
            (n,) = struct.unpack("<Q", first)
            if n > max_header:
                raise CheckpointError(
                    f"{where}: header length {n} exceeds the {max_header}-byte limit; "
                    f"not a safetensors file? {_REDOWNLOAD}"
                )
            if 8 + n > size:
                raise CheckpointError(
                    f"{where}: truncated (header says {n} bytes, file has {size}); {_REDOWNLOAD}"
                )
            head = os.pread(self._fd, n, 8)
            self.tensors, self.metadata = parse_header(head, size, where)
            self.size = size
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
                raise CheckpointError(f"{self.path}: tensor {name!r} truncated; {_REDOWNLOAD}")
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
