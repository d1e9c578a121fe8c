"""Load one rank's share of a model folder for a sharded run: each rank reads only what it holds.

The rank's model is built first (model/parallel: the whole structure with lazy parameters,
quantized like the folder, then cut down to the rank's share). Its parameters' shapes then say
what to read: a parameter as large as the stored tensor is mapped lazily from its shard (tensors
this rank does not hold are never read); a smaller one is this rank's 1/N slice, read from disk
by partial.read_slice. So a rank's memory is its share of the weights plus what every rank keeps
(attention, router, embeddings), not the whole model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import CheckpointError
from ..model.config import ModelConfig
from ..model.cpu_streams import default_threads, shard_model
from ..model.parallel import ShardedGptOss, ShardPlan
from .loading import ConvertedFolder, _quantize_like_checkpoint, default_dtype
from .partial import read_slice, share_of
from .safetensors_header import TensorInfo


def stored_shapes(folder: ConvertedFolder) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of every tensor the folder's shards hold."""
    return {t.name: t.shape for h in folder.headers.values() for t in h.tensors.values()}


def build_share(
    cfg: ModelConfig,
    schemes: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    dtype: mx.Dtype,
    plan: ShardPlan,
    group: Any,
) -> ShardedGptOss:
    """The structure of rank `plan.rank`'s model (lazy parameters: nothing is read or
    allocated) for a folder storing `cfg` as `schemes` say (layout.resolve_schemes), whose
    tensors have `shapes`. `plan.check` first, so that a split that does not divide is one
    line, not a shape error from deep inside MLX."""
    plan.check(cfg, shapes)
    model = ShardedGptOss(cfg, dtype, plan, group)
    _quantize_like_checkpoint(model, schemes)
    model.shard()
    return model


def _where(folder: ConvertedFolder) -> dict[str, tuple[Path, TensorInfo]]:
    return {
        t.name: (folder.path / shard, t)
        for shard, header in folder.headers.items()
        for t in header.tensors.values()
    }


def load_share(
    folder: ConvertedFolder,
    plan: ShardPlan,
    group: Any,
    dtype: mx.Dtype | None = None,
    threads: int | None = None,
) -> ShardedGptOss:
    """Rank `plan.rank`'s model with its share of the weights of `folder` (checked by
    inspect_folder), read from disk and nothing else. On MLX's CPU backend its matmuls are then
    spread over `threads` CPU streams as load_model does (cpu_streams)."""
    dtype = dtype or default_dtype()
    model = build_share(folder.config, folder.schemes, stored_shapes(folder), dtype, plan, group)
    where = _where(folder)
    mapped: dict[Path, dict[str, mx.array]] = {}
    weights = []
    for name, param in tree_flatten(model.parameters()):
        stored = model.global_name(name)
        if stored not in where:
            raise CheckpointError(f"{folder.path}: no tensor {stored!r}; {folder.advice}")
        path, info = where[stored]
        share = share_of(info.shape, param.shape, plan.rank, plan.size)
        if share is None:
            if path not in mapped:
                try:
                    mapped[path] = mx.load(str(path))  # lazy: only what is used gets read
                except Exception as e:  # changed since inspect_folder
                    raise CheckpointError(
                        f"{path}: cannot be read ({e}); {folder.advice}"
                    ) from None
            array = mapped[path][stored]
        else:
            array = read_slice(path, info, *share)
        if mx.issubdtype(array.dtype, mx.floating):
            array = array.astype(dtype)
        weights.append((name, array))
    try:
        model.load_weights(weights, strict=True)
    except ValueError as e:
        raise CheckpointError(f"{folder.path}: weights do not match config.json ({e})") from None
    del weights, mapped
    mx.eval(model.parameters())
    model.eval()
    if mx.default_device() == mx.cpu:
        shard_model(model, default_threads() if threads is None else threads)
    return model
