"""Validate a safetensors header before anything else (MLX included) trusts the file.

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, then N
bytes of UTF-8 JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the data buffer. Offsets are relative to the buffer, which they must cover exactly.

Both the loader (converted folders) and the converter (downloaded checkpoints) go through here, so a
hostile or broken file is refused with one line naming the file and the tensor, never a traceback
from a parser that assumed the bytes were honest.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

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
REDOWNLOAD = "download it again"


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


@dataclass(frozen=True)
class Header:
    """A validated header: its tensors by name, its string metadata, and the file size."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    size: int


def _strict_text(s: str) -> None:
    # Python's json accepts lone UTF-16 surrogates ("\ud800"); safetensors' parser and UTF-8 do
    # not, so a name that cannot be encoded is refused rather than passed on to MLX.
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"invalid Unicode escape in {s!r}") from None


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for k, v in pairs:
        _strict_text(k)
        if isinstance(v, str):
            _strict_text(v)
        if k in seen:
            raise ValueError(f"duplicate key {k!r}")
        seen[k] = v
    return seen


def parse_header(
    head: bytes, file_size: int, where: str, advice: str = REDOWNLOAD
) -> tuple[dict[str, TensorInfo], dict]:
    """Validate a safetensors header (the JSON bytes after the 8-byte length) against the file size.

    Returns ({name: TensorInfo}, metadata). Raises CheckpointError naming `where` and the tensor,
    ending with `advice` (what to do) where the file looks damaged.
    """
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{where}: header is not UTF-8; {advice}") from None
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates)
    except RecursionError:
        raise CheckpointError(f"{where}: header JSON is nested too deeply; {advice}") from None
    except ValueError as e:
        raise CheckpointError(f"{where}: header is not valid JSON ({e}); {advice}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: header is not a JSON object; {advice}")
    meta = obj.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings; {advice}")
    data_start = 8 + len(head)
    buffer_size = file_size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        infos[name] = _parse_entry(name, entry, data_start, buffer_size, where, advice)
    # The buffer must be covered exactly: contiguous from 0, no holes, no overlaps, no tail.
    pos = 0
    for info in sorted(infos.values(), key=lambda t: (t.begin, t.end)):
        if info.begin - data_start != pos:
            what = (
                "overlaps the previous tensor" if info.begin - data_start < pos else "leaves a gap"
            )
            raise CheckpointError(f"{where}: tensor {info.name!r} {what} (data_offsets); {advice}")
        pos = info.end - data_start
    if pos != buffer_size:
        raise CheckpointError(
            f"{where}: {buffer_size - pos} trailing bytes after the last tensor; {advice}"
        )
    return infos, meta


def _parse_entry(
    name: str, entry: object, data_start: int, buffer_size: int, where: str, advice: str
) -> TensorInfo:
    bad = f"{where}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(
            f"{bad}: entry must have exactly dtype, shape and data_offsets; {advice}"
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{bad}: unknown dtype {dtype!r}; {advice}")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < _MAX_DIM for d in shape):
        raise CheckpointError(f"{bad}: shape must be a list of non-negative integers; {advice}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
    ):
        raise CheckpointError(f"{bad}: data_offsets must be two integers; {advice}")
    begin, end = offsets
    if not 0 <= begin <= end <= buffer_size:
        raise CheckpointError(
            f"{bad}: data_offsets [{begin}, {end}] outside the {buffer_size}-byte buffer; "
            f"file truncated? {advice}"
        )
    # Python ints do not overflow, and the bound above keeps the comparison honest.
    expected = math.prod(shape) * DTYPES[dtype][0]
    if end - begin != expected:
        raise CheckpointError(
            f"{bad}: data_offsets span {end - begin} bytes, shape {shape} {dtype} needs "
            f"{expected}; {advice}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_header_fd(
    fd: int, where: str, max_header: int = MAX_HEADER_BYTES, advice: str = REDOWNLOAD
) -> Header:
    """Read and validate the header of the open file `fd` (`where` names it in errors).

    Recognises empty files, Git LFS pointers and truncated downloads, and says to download again.
    """
    try:
        return _read_header_fd(fd, where, max_header, advice)
    except OSError as e:  # a folder, a vanished network file, an I/O error
        raise CheckpointError(f"{where}: cannot read ({e.strerror or e})") from None


def _read_header_fd(fd: int, where: str, max_header: int, advice: str) -> Header:
    size = os.fstat(fd).st_size
    if size == 0:
        raise CheckpointError(f"{where}: file is empty; {advice}")
    if os.pread(fd, len(_LFS_MAGIC), 0) == _LFS_MAGIC:
        raise CheckpointError(
            f"{where}: is a Git LFS pointer, not the weights; {advice}"
            + (" (git lfs pull, or huggingface_hub)" if advice == REDOWNLOAD else "")
        )
    first = os.pread(fd, 8, 0)
    if len(first) < 8:
        raise CheckpointError(f"{where}: truncated ({size} bytes); {advice}")
    (n,) = struct.unpack("<Q", first)
    if n > max_header:
        raise CheckpointError(
            f"{where}: header length {n} exceeds the {max_header}-byte limit; "
            f"not a safetensors file? {advice}"
        )
    if 8 + n > size:
        raise CheckpointError(
            f"{where}: truncated (a {n}-byte header does not fit in the {size}-byte file); {advice}"
        )
    head = os.pread(fd, n, 8)
    if len(head) != n:  # the file shrank under us
        raise CheckpointError(f"{where}: truncated while reading the header; {advice}")
    tensors, metadata = parse_header(head, size, where, advice)
    return Header(tensors, metadata, size)


def read_header(
    path: str | Path, max_header: int = MAX_HEADER_BYTES, advice: str = REDOWNLOAD
) -> Header:
    """Validate the header of the safetensors file at `path` without reading any tensor data."""
    where = str(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: not found") from None
    except OSError as e:
        raise CheckpointError(f"{where}: cannot open ({e.strerror})") from None
    try:
        return read_header_fd(fd, where, max_header, advice)
    finally:
        os.close(fd)
