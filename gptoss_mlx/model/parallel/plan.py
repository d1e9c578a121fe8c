"""Who holds what in a sharded run: one rank's place in the split, checked before anything is built.

A `ShardPlan` is plain data (mode, rank, size) so that the memory preflight and `info` can ask
what any rank of any N would hold without starting N processes. The sharded model itself
(model.py) is the single source of truth for shapes: the loader reads each tensor's share by
comparing the model's local shapes with the stored ones. `split_axis` states the same rules by
tensor name so that `check` can refuse a split that does not divide, naming the tensor, before
MLX's `mx.split` would fail deep inside with a shape error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ...errors import UsageError
from ..config import ModelConfig

EXPERT, TENSOR, PIPELINE = "expert", "tensor", "pipeline"
MODES = (EXPERT, TENSOR, PIPELINE)

_LAYER = r"model\.layers\.\d+\."
# Tensor parallel, as MLX's shard_linear / shard_inplace cut them: "all-to-sharded" layers split
# their output rows (axis ndim-2 of a matrix, the last axis of a bias), "sharded-to-all" layers
# their input columns (the last axis; the bias stays whole).
_TENSOR_RULES = (
    (re.compile(_LAYER + r"self_attn\.[qkv]_proj\.(weight|scales|biases|bias)"), "rows"),
    (re.compile(_LAYER + r"self_attn\.o_proj\.(weight|scales|biases)"), "cols"),
    (re.compile(_LAYER + r"self_attn\.sinks"), "rows"),
    (re.compile(_LAYER + r"mlp\.experts\.(gate|up)_proj\.(weight|scales|biases)"), "rows"),
    (re.compile(_LAYER + r"mlp\.experts\.(gate|up)_proj\.bias"), "cols"),
    (re.compile(_LAYER + r"mlp\.experts\.down_proj\.(weight|scales|biases)"), "cols"),
)
_EXPERTS = re.compile(_LAYER + r"mlp\.experts\.")


class PlannedGroup:
    """Stands in for `mx.distributed.Group` where only rank() and size() are asked: building the
    structure of some rank (its shapes) for the memory preflight, with no process to talk to."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


@dataclass(frozen=True)
class ShardPlan:
    """Rank `rank` of `size` in mode `mode` (expert, tensor or pipeline)."""

    mode: str
    rank: int
    size: int

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"--shard {self.mode}: expected one of {', '.join(MODES)}")
        if not 0 <= self.rank < self.size:
            raise UsageError(f"rank {self.rank} is not in 0..{self.size - 1}")

    # ------------------------------------------------------------------ what this rank holds

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """(first expert, count) this rank holds in expert mode: a contiguous 1/N of them."""
        count = num_experts // self.size
        return self.rank * count, count

    def layer_sizes(self, num_layers: int) -> list[int]:
        """Layers per rank in pipeline mode: as even as possible, the extra ones on the ranks
        furthest from rank 0, which also holds the vocabulary head."""
        base, extra = divmod(num_layers, self.size)
        return [base + (1 if r >= self.size - extra else 0) for r in range(self.size)]

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """[start, end) of the layers this rank runs in pipeline mode. Rank N-1 runs the first
        layers and rank 0 the last ones (mlx-lm's order): the hidden states travel N-1 -> 0 and
        end where the head is, on the rank that samples."""
        if self.mode != PIPELINE:
            return 0, num_layers
        sizes = self.layer_sizes(num_layers)
        start = sum(sizes[self.rank + 1 :])
        return start, start + sizes[self.rank]

    @property
    def holds_head(self) -> bool:
        """The vocabulary head (lm_head): rank 0 only, the one rank that samples."""
        return self.rank == 0

    @property
    def holds_embedding(self) -> bool:
        """The token embedding: every rank, but in a pipeline only the first stage (rank N-1)."""
        return self.mode != PIPELINE or self.rank == self.size - 1

    @property
    def holds_final_norm(self) -> bool:
        return self.mode != PIPELINE or self.rank == 0

    def split_axis(self, name: str, ndim: int) -> int | None:
        """The axis along which stored tensor `name` (of `ndim` dimensions) is cut into N equal
        parts, part r for rank r; None when a rank that holds it holds all of it."""
        if self.mode == EXPERT:
            return 0 if _EXPERTS.match(name) else None
        if self.mode == TENSOR:
            for pattern, kind in _TENSOR_RULES:
                if pattern.fullmatch(name):
                    return max(ndim - 2, 0) if kind == "rows" else ndim - 1
        return None

    # ------------------------------------------------------------------ checks

    def check(self, cfg: ModelConfig, tensors: Mapping[str, tuple[int, ...]] = {}) -> None:
        """Refuse, in one line saying what to do instead, a split this model cannot take.
        `tensors`: the stored tensors' shapes by name (checked to divide where they split)."""
        n = self.size
        if self.mode == EXPERT:
            E = cfg.num_local_experts
            if E % n:
                fits = ", ".join(str(d) for d in range(2, min(E, 16) + 1) if E % d == 0)
                raise UsageError(
                    f"--shard expert over {n} ranks: the {E} experts of each layer do not split "
                    f"evenly; use a number of ranks that divides {E} ({fits})"
                )
        elif self.mode == TENSOR and n != 2:
            raise UsageError(
                f"--shard tensor runs on exactly 2 ranks, not {n}: it halves each layer's heads "
                f"and expert widths as mlx-lm does{_tensor_reason(cfg, n)}; use --shard expert "
                "(2, 4 or 8 ranks) or --shard pipeline"
            )
        elif self.mode == PIPELINE and n > cfg.num_hidden_layers:
            raise UsageError(
                f"--shard pipeline over {n} ranks needs at least {n} layers; the model has "
                f"{cfg.num_hidden_layers} (use fewer ranks)"
            )
        for name, shape in tensors.items():
            axis = self.split_axis(name, len(shape))
            if axis is not None and shape[axis] % n:
                hint = "use --shard expert or --shard pipeline" if self.mode == TENSOR else ""
                raise UsageError(
                    f"--shard {self.mode} over {n} ranks: {name} has {shape[axis]} entries along "
                    f"the axis it is split on, which do not divide by {n}"
                    + (f"; {hint}" if hint else "")
                )


def _tensor_reason(cfg: ModelConfig, n: int) -> str:
    """Which of the model's widths would not divide by n (for the refusal's reason)."""
    reasons = []
    if cfg.num_key_value_heads % n:
        reasons.append(f"{cfg.num_key_value_heads} key/value heads")
    groups = cfg.intermediate_size // 32
    if groups % n:
        reasons.append(f"{groups} MXFP4 scale groups per expert row")
    if not reasons:
        return ""
    return f", and this model's {' and '.join(reasons)} do not split {n} ways"
