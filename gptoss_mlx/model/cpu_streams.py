"""Matmuls split by output rows across CPU streams, so that MLX's CPU backend uses every core.

MLX's CPU backend evaluates each stream on a single thread: one 201,088 x 2,880 vocabulary
projection (8-bit) takes ~0.9 s on one core, ~0.46 s split in two halves on two streams
(2 cores, mlx 0.32.4). Splitting a linear layer by its output rows gives every shard the whole
input and an independent slice of the output, so each output element is computed exactly as
before: the sharded model's logits are bit-identical to the unsharded one's
(tests/test_sharding.py). On 2 cores a 4-layer model at gpt-oss-20b's widths decoded 1.61x and
prefilled 1.72x as fast as on one (`scripts/bench_variants.py -m DIR threads 1 2`,
docs/PERFORMANCE.md).

On Metal or CUDA one stream already fills the GPU, so nothing is sharded there.
"""

from __future__ import annotations

import copy
import os
import threading
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import UsageError
from .moe import ExpertLinear, add_expert_bias

THREADS_ENV = "GPTOSS_MLX_THREADS"
# Below this many output rows per shard the split is not worth a cross-stream hand-off (k/v
# projections, 512 rows, and the 32-row router stay whole). Untuned beyond 2 cores: a guess.
MIN_ROWS_PER_SHARD = 512
# Without measurements on machines with more cores, do not fan out further than this.
MAX_THREADS = 8
# The most $GPTOSS_MLX_THREADS may ask for: gpt-oss's vocabulary projection (201,088 rows) splits
# into up to 392 shards of MIN_ROWS_PER_SHARD, so any accepted value is used as given, and `info`
# (which reports the setting) and `bench` (which counts the streams in use) agree.
MAX_THREADS_ENV = 256

# MLX streams belong to the thread that made them (using one from another thread raises "There is
# no Stream(cpu, 1) in current thread"), so each thread keeps its own: the server's engine thread
# runs the model that the main thread loaded and may have warmed up.
_local = threading.local()


def default_threads() -> int:
    """How many CPU streams a matmul may be split across: $GPTOSS_MLX_THREADS if set, else the
    cores this process may run on (at most MAX_THREADS); 1 when the default device is a GPU."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if raw:  # set and not empty (an empty value means unset, as for most variables)
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_THREADS_ENV:
            raise UsageError(
                f"{THREADS_ENV}={raw!r}: expected a whole number from 1 to {MAX_THREADS_ENV} "
                "(1 = no split; unset or empty = one per core)"
            )
        return n
    if mx.default_device() != mx.cpu:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no sched_getaffinity
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_THREADS))


def _stream(i: int) -> mx.Stream | None:
    """Shard i's stream: shard 0 runs on the caller's stream, the others on streams of their own
    (created once per calling thread: each is a thread of MLX's CPU backend)."""
    if i == 0:
        return None
    streams = _local.__dict__.setdefault("streams", [])
    while len(streams) < i:
        streams.append(mx.new_stream(mx.cpu))
    return streams[i - 1]


def _add_bias(y: mx.array, bias: mx.array, *_: object) -> mx.array:
    return y + bias


class RowShards(nn.Module):
    """A layer computed as `parts` side by side, part i on CPU stream `first_stream + i`,
    outputs concatenated along the last axis, then the layer's bias added once. Each part is the
    original layer without its bias, holding a slice of the output rows, called with the original
    arguments; a single part is the whole layer, bias included, moved to its stream. (Every op
    added here is replayed each decode step, hence one bias add, not n.)"""

    def __init__(
        self,
        parts: list[nn.Module],
        bias: mx.array | None = None,
        add_bias: Any = _add_bias,
        first_stream: int = 0,
    ):
        super().__init__()
        self.parts = parts
        if bias is not None:
            self.bias = bias
        self._add_bias = add_bias
        self._first = first_stream

    def __call__(self, x: mx.array, *args: Any) -> mx.array:
        outs = []
        for i, part in enumerate(self.parts):
            s = _stream(self._first + i)
            if s is None:
                outs.append(part(x, *args))
            else:
                with mx.stream(s):
                    outs.append(part(x, *args))
        y = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)
        return self._add_bias(y, self.bias, *args) if "bias" in self else y


def split_rows(layer: nn.Module, n: int, first_stream: int = 0) -> RowShards:
    """`layer` (Linear, QuantizedLinear or ExpertLinear) as n shards of its output rows, on
    CPU streams first_stream .. first_stream+n-1 (n = 1: the layer as it is, on that stream)."""
    if n == 1:
        return RowShards([layer], first_stream=first_stream)
    params = dict(layer.parameters())
    bias = params.pop("bias", None)
    rows = params["weight"].shape[-2]
    bounds = [rows * i // n for i in range(n + 1)]
    parts = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        part = copy.copy(layer)
        if bias is not None:
            part.pop("bias")
        for name, a in params.items():
            if a.ndim == 2:  # [out, in]: a row slice is a view of the same memory
                part[name] = a[lo:hi]
            else:  # experts [E, out, in]: a strided slice, copied to be contiguous for the kernel
                part[name] = mx.contiguous(a[:, lo:hi])
        parts.append(part)
    add = add_expert_bias if isinstance(layer, ExpertLinear) else _add_bias
    return RowShards(parts, bias, add, first_stream)


_COMMUNICATING = (nn.ShardedToAllLinear, nn.QuantizedShardedToAllLinear)


def threads_of(model: Any) -> int:
    """How many CPU streams the model's matmuls are spread over (1: none)."""
    return max(
        (m._first + len(m.parts) for _, m in model.named_modules() if isinstance(m, RowShards)),
        default=1,
    )


def shard_model(model: Any, threads: int) -> int:
    """Spread the model's large matmuls over `threads` CPU streams, in place: the vocabulary
    projection, q and o projections and expert down projection split by rows across all of them;
    the expert gate and up projections, which are independent, each on half of the streams (no
    split at all with 2: gate on one, up on the other). Returns how many layers were spread."""
    if threads <= 1:
        return 0
    half = threads // 2
    plan: list[tuple[nn.Module, str, int, int]] = [(model, "lm_head", threads, 0)]
    for block in model.layers:
        attn, experts = block.self_attn, block.mlp.experts
        plan += [(attn, "q_proj", threads, 0), (attn, "o_proj", threads, 0)]
        plan += [(experts, "gate_proj", half, 0), (experts, "up_proj", half, half)]
        plan += [(experts, "down_proj", threads, 0)]
    count = 0
    for owner, name, n, first in plan:
        layer = owner.get(name)
        # A rank of a sharded run (model/parallel) may not hold the layer (the head lives on
        # rank 0 only), and a layer that all_sums inside (tensor parallelism's o_proj) must stay
        # whole: each row shard would make a collective of its own.
        if layer is None or isinstance(layer, _COMMUNICATING):
            continue
        n = min(n, layer.weight.shape[-2] // MIN_ROWS_PER_SHARD)  # 0: too small to move
        if n > 1 or (n == 1 and first > 0):
            owner[name] = split_rows(layer, n, first)
            mx.eval(owner[name].parameters())  # copy this layer now, so the original can go
            count += 1
    return count
