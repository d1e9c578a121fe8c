"""How much memory a model needs at a given context, and what this machine allows.

Before loading: weights + KV cache at `--max-context` + working memory, against MLX's recommended
working set on Apple Silicon (what macOS lets the GPU wire) or the machine's RAM elsewhere.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..errors import GptOssError
from ..model.config import FULL, SLIDING, ModelConfig
from ..weights.loading import ConvertedFolder
from ..weights.safetensors_header import DTYPES, read_header

MAX_CONTEXT = 131072
# Candidate defaults for --max-context, largest first.
CONTEXT_STEPS = (131072, 65536, 32768, 16384, 8192, 4096)
_GB = 1e9


class MemoryPreflightError(GptOssError):
    """The model and its cache will not fit in the memory this device allows."""


def loaded_bytes(tensors: Iterable[tuple[tuple[int, ...], str]], act_itemsize: int) -> int:
    """Bytes of (shape, safetensors dtype) tensors once loaded: floats in the activation dtype,
    quantized payloads as stored. Shard headers, a converter's plan and a config's implied layout
    all come through here, so their figures agree."""
    total = 0
    for shape, dtype in tensors:
        item = act_itemsize if dtype in ("BF16", "F16", "F32") else DTYPES[dtype][0]
        total += math.prod(shape) * item
    return total


def _tensor_bytes(folder: Path, shard: str, act_itemsize: int) -> int:
    """Bytes a shard takes once loaded: float tensors are cast to the activation dtype."""
    header = read_header(folder / shard)  # validated: a hostile header is one line, not a crash
    return loaded_bytes(((t.shape, t.dtype) for t in header.tensors.values()), act_itemsize)


@dataclass
class MemoryPlan:
    weights: int  # bytes of weights in memory (float tensors in the activation dtype)
    kv_per_token: int  # bytes per context token across the full-attention layers
    kv_fixed: int  # the sliding layers' windows (constant in the context length)
    working: int  # activations, logits, scratch
    budget: int  # what the device allows
    budget_source: str

    def kv(self, context: int, batch: int = 1) -> int:
        return batch * (self.kv_per_token * context + self.kv_fixed)

    def total(self, context: int, batch: int = 1) -> int:
        return self.weights + self.kv(context, batch) + self.working

    def fits(self, context: int, batch: int = 1) -> bool:
        return self.total(context, batch) <= self.budget

    def largest_batch(self, context: int) -> int:
        """The most sequences whose KV caches fit at `context` tokens next to the weights."""
        room = self.budget - self.weights - self.working
        return max(0, room // self.kv(context)) if room > 0 else 0

    def largest_context(self, batch: int = 1, ceiling: int = MAX_CONTEXT) -> int | None:
        """The largest step of CONTEXT_STEPS (at most `ceiling`) that fits, or None."""
        for c in CONTEXT_STEPS:
            if c <= ceiling and self.fits(c, batch):
                return c
        return None


def device_budget() -> tuple[int, str]:
    """(bytes, description) of the memory MLX may use on the default device."""
    info = mx.device_info()
    rec = info.get("max_recommended_working_set_size")
    if rec:
        return int(rec), "the GPU's recommended working set"
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = int(info.get("memory_size", 0)) or 16 << 30
    return int(ram), "the machine's RAM"


def plan_memory(
    folder: str | Path, cfg: ModelConfig, dtype: mx.Dtype, prefill_chunk: int = 512
) -> MemoryPlan:
    """Estimate the memory of the converted model in `folder` running in `dtype`."""
    folder = Path(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))
    shards = sorted(set(index["weight_map"].values()))
    weights = sum(_tensor_bytes(folder, s, dtype.size) for s in shards)
    return plan_for(cfg, weights, dtype, prefill_chunk)


def plan_checked(folder: ConvertedFolder, dtype: mx.Dtype) -> MemoryPlan:
    """The plan of a folder inspect_folder checked (ours or an MLX conversion by others, index or
    not), from the shard headers it validated."""
    tensors = ((t.shape, t.dtype) for h in folder.headers.values() for t in h.tensors.values())
    return plan_for(folder.config, loaded_bytes(tensors, dtype.size), dtype)


def plan_for(
    cfg: ModelConfig,
    weights: int,
    dtype: mx.Dtype,
    prefill_chunk: int = 512,
    budget: tuple[int, str] | None = None,
) -> MemoryPlan:
    """The plan of a `cfg` model whose weights take `weights` bytes loaded, running in `dtype`,
    against `budget` (bytes, description; default: this device's, see device_budget)."""
    item = dtype.size
    per_layer_token = 2 * cfg.num_key_value_heads * cfg.head_dim * item  # keys and values
    n_full = cfg.layer_types.count(FULL)
    n_sliding = cfg.layer_types.count(SLIDING)
    # A rotating cache briefly holds window - 1 + chunk tokens while a chunk is prefilled.
    kv_fixed = n_sliding * per_layer_token * (cfg.sliding_window + prefill_chunk)
    # Per prefill chunk: hidden states, q/k/v, the experts' gate/up/down for k experts, logits.
    act = (
        prefill_chunk
        * 4
        * (
            8 * cfg.hidden_size
            + 2 * cfg.num_attention_heads * cfg.head_dim
            + 3 * cfg.num_experts_per_tok * cfg.intermediate_size
        )
    )
    working = act + 4 * cfg.vocab_size * 4 + (256 << 20)
    budget, source = budget or device_budget()
    return MemoryPlan(weights, n_full * per_layer_token, kv_fixed, working, budget, source)


def describe(plan: MemoryPlan, context: int, batch: int = 1) -> str:
    return (
        f"{plan.total(context, batch) / _GB:.1f} GB (weights {plan.weights / _GB:.1f} + KV cache "
        f"{plan.kv(context, batch) / _GB:.2f} at {context} tokens"
        + (f" x {batch} sequences" if batch > 1 else "")
        + f" + working {plan.working / _GB:.1f})"
    )


def choose_max_context(plan: MemoryPlan, requested: int | None, limit: int, batch: int = 1) -> int:
    """The context limit to run with: `requested` if it fits, else the largest that fits.

    Raises MemoryPreflightError, saying what to change, when the request (or even the smallest
    context) does not fit.
    """
    ceiling = min(limit, MAX_CONTEXT)
    if requested is not None:
        if requested > limit:
            raise MemoryPreflightError(
                f"--max-context {requested} is more than the model's {limit} positions"
            )
        if plan.fits(requested, batch):
            return requested
        best = plan.largest_context(batch, ceiling)
        raise MemoryPreflightError(_advice(plan, requested, batch, best))
    best = plan.largest_context(batch, ceiling)
    if best is None:
        smallest = min(CONTEXT_STEPS[-1], ceiling)
        raise MemoryPreflightError(_advice(plan, smallest, batch, None))
    return best


def _advice(plan: MemoryPlan, context: int, batch: int, best: int | None) -> str:
    need = plan.total(context, batch)
    tips = []
    fit = plan.largest_batch(context) if batch > 1 else 0
    if fit:  # each sequence holds its own KV cache: fewer at once is the cheapest fix
        tips.append(f"lower --batch-size ({fit} fit at {context} tokens)")
    if best is not None:
        tips.append(f"use --max-context {best}")
    elif batch > 1:
        tips.append("lower --max-context")
    tips.append("convert with --recipe mxfp4-q4")
    if "GPU" in plan.budget_source:
        mb = int(need / (1 << 20) * 1.1)
        tips.append(f"or raise the GPU wired limit: sudo sysctl iogpu.wired_limit_mb={mb}")
    return (
        f"not enough memory: needs {describe(plan, context, batch)}, "
        f"{plan.budget_source} is {plan.budget / _GB:.1f} GB; " + ", ".join(tips)
    )


def set_wired_limit() -> None:
    """On Apple Silicon, let MLX wire up to the recommended working set (as mlx-lm does), so the
    weights are not paged out between tokens."""
    from mlx_lm.utils import maybe_set_recommended_wired_limit

    maybe_set_recommended_wired_limit()
