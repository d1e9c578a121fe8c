"""Token masks on the host, applied to MLX logits on the device.

llguidance writes the allowed tokens of each constrained row as packed bits (int32 rows of
ceil(vocab / 32) words, bit j of word w = token 32 w + j) into a numpy array; several rows are
filled in parallel by its thread pool. The mask is then applied before sampling, per backend:
  - Metal: llguidance's own `mx.fast.metal_kernel` (`llguidance.mlx.apply_token_bitmask`);
  - anywhere else (MLX's CPU or CUDA backends, which cannot run a Metal kernel): the same bit
    test in MLX operations, compiled. It keeps the logits on the device and the step pipelined;
    llguidance's numpy apply would need them on the host first (measured on 4 rows x 201088 on
    this project's CPU machines: 0.9 ms compiled MLX, 1.4 ms uncompiled, 1.8 ms through numpy).
Disallowed logits become -inf, so every sampler (greedy, top-k/p, min-p) picks among allowed ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import mlx.core as mx
import numpy as np
from llguidance import LLExecutor
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

from .matcher import TokenConstraint

_EXECUTOR: LLExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def allocate_masks(rows: int, vocab_size: int) -> np.ndarray:
    """A (rows, ceil(vocab/32)) int32 bitmask with every token allowed."""
    return allocate_token_bitmask(rows, vocab_size)


def _executor() -> LLExecutor:
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = LLExecutor()
        return _EXECUTOR


def fill_masks(rows: Sequence[tuple[TokenConstraint, int]], bitmask: np.ndarray) -> None:
    """Fill `bitmask[row]` for each (constraint, row); rows not listed keep what they hold.

    A constraint whose grammar is complete or failed gets an all-allowed row: its sequence ends
    this step, and a row of nothing allowed would only turn its logits into NaN."""
    live = []
    for c, row in rows:
        if c.done or c.failed:
            bitmask[row] = -1
        else:
            live.append((c, row))
    if not live:
        return
    t0 = time.perf_counter()
    if len(live) == 1:
        live[0][0].fill(bitmask, live[0][1])
    else:
        fill_next_token_bitmask_par(_executor(), [(c.matcher, row) for c, row in live], bitmask)
    dt = time.perf_counter() - t0
    for c, _ in live:
        if c.mask_seconds is not None:
            c.mask_seconds.append(dt)


_SHIFTS = mx.arange(32, dtype=mx.uint32)
# Evaluated now: an unevaluated array belongs to the stream of the thread that built it, and the
# server's engine thread (engine/scheduler.py) applies masks on a thread of its own.
mx.eval(_SHIFTS)


@mx.compile
def _apply_bits(logits: mx.array, words: mx.array) -> mx.array:
    B, V = logits.shape
    bits = (words.view(mx.uint32)[:, :, None] >> _SHIFTS) & 1  # (B, W, 32)
    allowed = bits.reshape(B, -1)[:, :V].astype(mx.bool_)  # (B, V)
    return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))


def metal_kernel_available() -> bool:
    """Whether logits live on a Metal GPU, where llguidance's kernel applies the mask."""
    return mx.default_device() == mx.gpu and mx.metal.is_available()


def apply_masks(logits: mx.array, bitmask: np.ndarray) -> mx.array:
    """`logits` [B, V] with every token not allowed by `bitmask` [B, ceil(V/32)] set to -inf."""
    if metal_kernel_available():
        from llguidance.mlx import apply_token_bitmask

        return apply_token_bitmask(logits, bitmask)
    return _apply_bits(logits, mx.array(bitmask))


def mask_logits(logits: mx.array, rows: Sequence[tuple[TokenConstraint, int]]) -> mx.array:
    """`logits` [B, V] masked by each (constraint, row); rows not listed are left as they are."""
    bitmask = allocate_masks(logits.shape[0], logits.shape[1])
    fill_masks(rows, bitmask)
    return apply_masks(logits, bitmask)
