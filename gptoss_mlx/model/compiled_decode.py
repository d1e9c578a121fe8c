"""Single-token decoding under `mx.compile`, over fixed-shape KV caches.

mlx-lm's caches change shape as they grow and keep their offsets as Python ints, so a compiled
step would be traced again for every token. Here each layer's keys and values live in a buffer of
fixed capacity, written at a position held in an array: the traced graph is replayed token after
token, and Python no longer rebuilds ~65 operations per layer each step (docs/PERFORMANCE.md:
host time per decode step about 0.6x, evaluation time unchanged on MLX's CPU backend).
Full-attention buffers grow by `GROW` slots at a time (one new trace each time); sliding layers use
a ring of `sliding_window` slots, slot = position mod window, which is all the window ever needs.

`CompiledDecoder.start` takes over mlx-lm caches after prefill; `finish` writes the state back into
them, so callers (chat cache reuse, checkpoints) keep seeing ordinary mlx-lm caches.

A trace is a recording: it replays the operations and holds the weight arrays that the forward
pass met the first time, whatever the model holds now. So each model's trace is kept only while
what it recorded still holds (`model_state`): the same weight arrays (`model.update(...)`, a
reload, sharding all swap them), the same plain settings of every module (`model.dtype`, an
attention `scale`, a module's class) and of the modules whose globals the forward pass reads
(`moe.SORT_THRESHOLD`, `transformer.SHARED_ROTATION`), and the same default device. Anything
else changed must come before the first decode step, or a new model be used: notably writing into
a weight array in place (`w[...] = x` keeps the array and changes its value).
"""

from __future__ import annotations

import weakref
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache

from . import moe, transformer
from .transformer import GptOss

# Full-attention buffers grow by this many slots: unused slots are masked but still read by the
# attention kernel, and each new size costs one trace.
GROW = 256


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


class StaticKVCache:
    """Keys/values [B, kv_heads, capacity, head_dim] written one token at a time at an array
    position. `ring`: slot = position mod capacity (a sliding window of `capacity` tokens).

    The arrays live in the dict `arrays`, which `mx.compile` reads as inputs and rewrites as
    outputs.
    """

    def __init__(self, keys: mx.array, values: mx.array, pos: int, ring: bool):
        self.ring = ring
        self.arrays = {"keys": keys, "values": values, "pos": mx.array(pos, dtype=mx.int32)}

    @property
    def capacity(self) -> int:
        return self.arrays["keys"].shape[2]

    @property
    def offset(self) -> mx.array:
        """Tokens seen so far (the position of the next one), as a scalar array."""
        return self.arrays["pos"]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        pos = self.arrays["pos"]
        slot = (pos % self.capacity if self.ring else pos).reshape(1)
        a = self.arrays
        a["keys"] = mx.slice_update(a["keys"], keys, slot, axes=(2,))
        a["values"] = mx.slice_update(a["values"], values, slot, axes=(2,))
        a["pos"] = pos + 1
        return a["keys"], a["values"]

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False):
        # Called before this step's write: slots 0..pos hold a token once it is written (for a
        # ring, every slot once pos >= capacity - 1, and the window is exactly the ring).
        if N != 1:
            raise ValueError("StaticKVCache decodes one token at a time")
        return mx.arange(self.capacity) <= self.arrays["pos"]


def _from_mlx_lm(c: Any, window: int) -> StaticKVCache:
    """A static cache holding what an mlx-lm KVCache / RotatingKVCache holds."""
    n = c.offset
    if isinstance(c, RotatingKVCache):
        keep = min(n, window)
        # The last `keep` tokens in temporal order, then placed at slot = position mod window.
        k, v = (c._temporal_order(x)[..., -keep:, :] for x in (c.keys, c.values))
        if keep == window:
            k, v = (mx.roll(x, shift=n % window, axis=2) for x in (k, v))
        else:
            k, v = (mx.pad(x, [(0, 0), (0, 0), (0, window - keep), (0, 0)]) for x in (k, v))
        return StaticKVCache(k, v, n, ring=True)
    if not isinstance(c, KVCache):
        raise TypeError(f"cannot compile decoding over a {type(c).__name__}")
    k, v = c.keys, c.values
    if k.shape[2] <= n:  # no free slot left (mlx-lm allocates 256 at a time): grow
        cap = _round_up(n + 1, GROW)
        k, v = (mx.pad(x[..., :n, :], [(0, 0), (0, 0), (0, cap - n), (0, 0)]) for x in (k, v))
    # Slots past n may hold tokens trimmed away earlier: the mask ignores them.
    return StaticKVCache(k, v, n, ring=False)


def _to_mlx_lm(s: StaticKVCache, c: Any, pos: int) -> None:
    """Write a static cache's state back into the mlx-lm cache it came from."""
    k, v = s.arrays["keys"], s.arrays["values"]
    if isinstance(c, RotatingKVCache):
        w = s.capacity
        if pos >= w:  # back to temporal order: the oldest token sits at slot pos mod w
            k, v = (mx.roll(x, shift=-(pos % w), axis=2) for x in (k, v))
        else:
            k, v = k[..., :pos, :], v[..., :pos, :]
        c.keys, c.values, c.offset, c._idx = k, v, pos, k.shape[2]
    else:
        c.keys, c.values, c.offset = k, v, pos


class _Program:
    """A model's compiled step, kept across decoders: a new generation whose caches have the
    shapes of an earlier one replays that trace instead of tracing again (about 65 ms for 24
    layers on this project's CPU machines)."""

    def __init__(self, model: Any, state: tuple = ()):
        self.model = weakref.ref(model)  # the trace holds the weights, not the model
        self.state_key = state  # model_state(model) when made: what its trace will record
        self.static: list[StaticKVCache] = []  # the caches the step reads while being traced
        # mx.compile reads and rewrites the arrays of these dicts around every call.
        self.state: list[dict[str, mx.array]] = []
        self.fn = mx.compile(self._step, inputs=self.state, outputs=self.state)
        self.busy = False
        self.traces = 0

    def _step(self, y: mx.array) -> mx.array:
        self.traces += 1  # runs only while tracing
        return self.model()(y[:, None], cache=self.static)[:, -1]

    def bind(self, static: list[StaticKVCache]) -> None:
        self.static[:] = static
        self.state[:] = [s.arrays for s in static]


_PROGRAMS: dict[int, _Program] = {}

_SCALARS = (bool, int, float, str, type(None), mx.Dtype)


def model_state(model: Any) -> tuple:
    """What a decode trace of `model` depends on beyond its inputs' shapes: the identity of every
    array its modules hold, each module's class and plain settings, the globals of the model
    modules that the forward pass reads, and the default device (about 2 ms for 24 layers)."""
    parts: list[Any] = [str(mx.default_device()), moe.SORT_THRESHOLD, transformer.SHARED_ROTATION]
    for name, module in model.named_modules():
        arrays = tuple((k, id(v)) for k, v in module.items() if isinstance(v, mx.array))
        settings = tuple((k, v) for k, v in vars(module).items() if isinstance(v, _SCALARS))
        parts.append((name, type(module), arrays, settings))
    return tuple(parts)


def _program_for(model: Any) -> _Program:
    key = id(model)
    state = model_state(model)
    program = _PROGRAMS.get(key)
    if program is not None and program.busy:  # another generation is under way: trace our own
        return _Program(model, state)
    if program is not None and program.state_key == state:
        return program
    if program is None:
        weakref.finalize(model, _PROGRAMS.pop, key, None)
    # First use, or the model changed since the trace: the old trace and the weights it holds go.
    program = _PROGRAMS[key] = _Program(model, state)
    return program


class CompiledDecoder:
    """Decode steps for `model` as one compiled function over fixed-shape caches.

    dec = CompiledDecoder.start(model, cache)   # cache: mlx-lm caches after prefill
    logits = dec.step(y)                        # y: ids [B] -> logits [B, vocab]
    dec.finish()                                # cache holds every token fed to `step`
    """

    def __init__(self, model: Any, caches: list[Any]):
        self.caches = caches  # the mlx-lm caches, updated by finish()
        window = model.config.sliding_window
        self.static = [_from_mlx_lm(c, window) for c in caches]
        for c in caches:
            # The buffers now belong to the static caches until finish(): a second reference
            # would make every step's write copy the whole buffer instead of updating it in place.
            c.keys = c.values = None
        self.pos = caches[0].offset if caches else 0
        self.program = _program_for(model)
        self.program.busy = True
        self.program.bind(self.static)

    @classmethod
    def start(cls, model: Any, caches: list[Any]) -> CompiledDecoder:
        """Take over `caches` (every layer at the same offset) for decoding."""
        offsets = {c.offset for c in caches}
        if len(offsets) > 1:
            raise ValueError(f"caches disagree on the offset: {sorted(offsets)}")
        return cls(model, caches)

    def _grow(self) -> None:
        for s in self.static:
            if not s.ring and self.pos >= s.capacity:
                pad = [(0, 0), (0, 0), (0, GROW), (0, 0)]
                s.arrays["keys"] = mx.pad(s.arrays["keys"], pad)
                s.arrays["values"] = mx.pad(s.arrays["values"], pad)

    def step(self, y: mx.array) -> mx.array:
        """Feed ids `y` [B] at the next position; return the next logits [B, vocab] (lazy)."""
        self._grow()
        self.pos += 1
        return self.program.fn(y)

    def finish(self) -> None:
        """Write the state back into the mlx-lm caches given to `start`."""
        for s, c in zip(self.static, self.caches, strict=True):
            _to_mlx_lm(s, c, self.pos)
        self.program.bind([])
        self.program.busy = False


class PlainDecoder:
    """The uncompiled decode step over mlx-lm caches, with `CompiledDecoder`'s interface."""

    def __init__(self, model: Any, caches: list[Any]):
        self.model, self.caches = model, caches

    def step(self, y: mx.array) -> mx.array:
        """Feed ids `y` [B] at the next position; return the next logits [B, vocab] (lazy)."""
        return self.model(y[:, None], cache=self.caches)[:, -1]

    def finish(self) -> None:
        """Nothing to hand back: the mlx-lm caches were updated in place."""


def start_decoder(model: Any, caches: list[Any], compiled: bool) -> CompiledDecoder | PlainDecoder:
    """A decoder over `caches` (filled by prefill): compiled, or plain for comparison.

    Only our own `GptOss` is compiled: a compiled step replays one trace, so a model whose call has
    Python side effects (a test double counting its calls, say) must run plainly.
    """
    if compiled and isinstance(model, GptOss):
        return CompiledDecoder.start(model, caches)
    return PlainDecoder(model, caches)
