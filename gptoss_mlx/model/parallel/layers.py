"""The sharded pieces of a block: this rank's part of the MoE (joined by one all_sum) and the
tensor-parallel attention.

Where MLX's own sharded layers fit, they are used: the attention projections become
`AllToShardedLinear` / `ShardedToAllLinear` (or their quantized twins) through
`mlx.nn.layers.distributed.shard_linear`, and stacked expert weights are cut by `shard_inplace`.
Where they do not fit, the code here does the rest:
- the experts are one gather kernel over stacked [E, out, in] weights (moe.ExpertLinear), not a
  linear layer: `shard_inplace` slices them, but the single all_sum has to come after the
  routing weights are applied, which only the MoE can do (ShardedMoE);
- expert parallelism has no MLX layer at all (MLX has no all_to_all either): LocalExperts keeps
  a contiguous 1/N of the experts, computes the routed pairs that land on them, and lets the
  MoE's all_sum add up the ranks' shares;
- the attention sinks are one learned logit per head: sliced like the heads, by shard_inplace.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear

from ..attention import Attention
from ..moe import Experts, MoE


class ShardedMoE(MoE):
    """The MoE of a sharded model: this rank's part of the weighted expert sum (the router runs
    whole on every rank, so every rank routes every token alike), then one all_sum of
    [tokens, hidden] across the ranks."""

    def __init__(self, moe: MoE, experts: nn.Module, group: Any):
        nn.Module.__init__(self)  # takes over moe's router; builds nothing new
        self.k = moe.k
        self.router = moe.router
        self.experts = experts
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(super().__call__(x), group=self.group)


class LocalExperts(Experts):
    """Experts first .. first+count-1 of a layer (expert parallelism).

    A pair routed to an expert held elsewhere yields zeros here: its rank computes it. MLX cannot
    shrink an array to the pairs that are local without a host round trip per layer, so such a
    pair is still gathered, pointed at an expert this token already uses here when there is one
    (its weights are being read anyway), else at the first local expert.
    """

    def __init__(self, experts: Experts, first: int, count: int):
        nn.Module.__init__(self)
        for name in ("gate_proj", "up_proj", "down_proj"):
            self[name] = experts[name]
        self.limit = experts.limit
        self.first, self.count = first, count

    def __call__(self, x: mx.array, experts: mx.array) -> mx.array:
        idx = experts.astype(mx.int32) - self.first  # (N..., K)
        local = (idx >= 0) & (idx < self.count)
        taken = mx.where(local, idx, self.count).min(axis=-1, keepdims=True)
        fill = mx.where(taken < self.count, taken, 0)
        y = super().__call__(x, mx.where(local, idx, fill).astype(mx.uint32))  # (N..., K, H)
        return mx.where(mx.expand_dims(local, -1), y, 0.0)


def shard_experts(moe: MoE, first: int, count: int, group: Any) -> ShardedMoE:
    """Expert parallelism: keep experts first..first+count-1 (a rank's 1/N, sliced along the
    expert axis by MLX's shard_inplace) behind a MoE that all_sums the ranks' shares."""
    local = LocalExperts(moe.experts, first, count)
    shard_inplace(local, lambda _path, _weight: 0, group=group)
    return ShardedMoE(moe, local, group)


def shard_expert_widths(moe: MoE, group: Any) -> ShardedMoE:
    """Tensor parallelism in the MoE, as mlx-lm splits gpt_oss: gate and up keep 1/N of each
    expert's rows, down the matching 1/N of its columns; every rank keeps every expert. The
    ranks' partial down projections are summed by the MoE's all_sum, so the down bias is added
    by rank 0 alone (mlx-lm divides it by N instead)."""
    experts = moe.experts
    shard_inplace(experts.gate_proj, "all-to-sharded", group=group)
    shard_inplace(experts.up_proj, "all-to-sharded", group=group)
    shard_inplace(experts.down_proj, "sharded-to-all", group=group)
    if group.rank() != 0 and "bias" in experts.down_proj:
        experts.down_proj.pop("bias")
    return ShardedMoE(moe, experts, group)


def shard_attention(attn: Attention, group: Any) -> None:
    """Tensor parallelism in attention, in place, as mlx-lm splits gpt_oss: q/k/v keep 1/N of the
    heads (MLX's all-to-sharded linears), o_proj sums the ranks' heads (sharded-to-all: its
    all_sum is inside the layer), and each rank keeps its heads' sinks."""
    n = group.size()
    for name in ("q_proj", "k_proj", "v_proj"):
        attn[name] = shard_linear(attn[name], "all-to-sharded", group=group)
    attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
    shard_inplace(attn, lambda path, _w: 0 if path == "sinks" else None, group=group)
    attn.n_heads //= n
    attn.n_kv //= n
