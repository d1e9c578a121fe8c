"""Read a slice of one stored tensor, and only that slice, from a safetensors file.

`mx.load` maps a file lazily, but evaluating a slice of a loaded tensor reads the whole tensor
first (a 1/4 slice of a 64 MB tensor peaks at 335 MB, mlx 0.32.4). A rank of a sharded run needs
only its share: 1/N of 120b's ~60 GB of experts. So the byte range is computed from the header
inspect_folder validated and read directly: one contiguous read for a slice along the first axis
(an expert range), a memory map for a slice along another axis (rows or columns of every expert,
tensor parallelism), where the pages touched are those holding the slice (for a column slice,
nearly all of them: the file is read, but only the share is kept).
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import CheckpointError
from .safetensors_header import DTYPES, TensorInfo

_CONVERT_AGAIN = "convert the checkpoint again"


def read_slice(path: str | Path, info: TensorInfo, axis: int, start: int, stop: int) -> mx.array:
    """Tensor `info` of file `path` restricted to [start, stop) along `axis`, as an MLX array of
    the stored dtype (BF16 viewed as bfloat16)."""
    shape = list(info.shape)
    if not 0 <= axis < len(shape) or not 0 <= start < stop <= shape[axis]:
        raise ValueError(f"{info.name}: slice {start}:{stop} of axis {axis} outside {shape}")
    itemsize, np_dtype = DTYPES[info.dtype]
    try:
        if axis == 0:
            inner = math.prod(shape[1:])
            count = (stop - start) * inner
            with open(path, "rb") as f:
                f.seek(info.begin + start * inner * itemsize)
                data = np.fromfile(f, dtype=np_dtype, count=count)
            if data.size != count:
                raise CheckpointError(f"{path}: {info.name} is cut short; {_CONVERT_AGAIN}")
            out = data.reshape([stop - start, *shape[1:]])
        else:
            mapped = np.memmap(
                path, dtype=np_dtype, mode="r", offset=info.begin, shape=tuple(shape)
            )
            index = [slice(None)] * len(shape)
            index[axis] = slice(start, stop)
            out = np.ascontiguousarray(mapped[tuple(index)])
            del mapped
    except OSError as e:
        raise CheckpointError(
            f"{path}: cannot be read ({e.strerror or e}); {_CONVERT_AGAIN}"
        ) from None
    except ValueError as e:  # a memory map past the end of a file cut short
        raise CheckpointError(
            f"{path}: {info.name} cannot be read ({e}); {_CONVERT_AGAIN}"
        ) from None
    array = mx.array(out)
    return array.view(mx.bfloat16) if info.dtype == "BF16" else array


def share_of(stored: tuple[int, ...], local: tuple[int, ...], rank: int, size: int):
    """How a rank's parameter of shape `local` relates to the stored tensor of shape `stored`:
    None when it is the whole tensor, else (axis, start, stop) of this rank's equal 1/size part
    (as MLX's shard functions cut: part r of `size` contiguous parts)."""
    if tuple(stored) == tuple(local):
        return None
    differ = [i for i, (a, b) in enumerate(zip(stored, local, strict=False)) if a != b]
    if (
        len(stored) != len(local)
        or len(differ) != 1
        or stored[differ[0]] != local[differ[0]] * size
    ):
        raise CheckpointError(
            f"a stored tensor of shape {list(stored)} cannot give this rank's {list(local)}; "
            f"{_CONVERT_AGAIN}"
        )
    axis = differ[0]
    part = local[axis]
    return axis, rank * part, (rank + 1) * part
