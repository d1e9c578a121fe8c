"""Mixture of experts: a linear router picks the top-k of E experts per token; each expert is a
clamped SwiGLU MLP whose weights stay in MXFP4 and are gathered per token with `mx.gather_qmm`.

Shape legend: N tokens (any leading dims), H hidden, I expert width, E experts, K experts per token.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig

# Sorting token-expert pairs by expert makes gather_qmm read each expert's weights once per
# contiguous run instead of once per pair; it only pays off when many tokens arrive (prefill).
SORT_THRESHOLD = 64


class MXFP4ExpertLinear(nn.Module):
    """E stacked linear layers stored as MXFP4 (4-bit E2M1 values, one E8M0 scale per 32 inputs)."""

    def __init__(self, num_experts: int, input_dims: int, output_dims: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, output_dims, input_dims // 8), dtype=mx.uint32)
        self.scales = mx.zeros((num_experts, output_dims, input_dims // 32), dtype=mx.uint8)
        self.bias = mx.zeros((num_experts, output_dims))

    def __call__(self, x: mx.array, experts: mx.array, sorted_indices: bool) -> mx.array:
        # x: (..., 1, in), experts: (...) -> (..., 1, out)
        y = self.matmul(x, experts, sorted_indices)
        return add_expert_bias(y, self.bias, experts) if "bias" in self else y

    def matmul(self, x: mx.array, experts: mx.array, sorted_indices: bool) -> mx.array:
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            None,
            rhs_indices=experts,
            transpose=True,
            group_size=32,
            bits=4,
            mode="mxfp4",
            sorted_indices=sorted_indices,
        )


def add_expert_bias(y: mx.array, bias: mx.array, experts: mx.array, *_: object) -> mx.array:
    """y (..., 1, out) plus each routed expert's bias row (bias: (E, out), experts: (...))."""
    return y + mx.expand_dims(bias[experts], -2)


def swiglu(gate: mx.array, up: mx.array, limit: float, alpha: float = 1.702) -> mx.array:
    """gpt-oss's clamped SwiGLU: gate clamped above, up clamped both ways and shifted by one."""
    gate = mx.minimum(gate, limit)
    up = mx.clip(up, -limit, limit)
    return gate * mx.sigmoid(alpha * gate) * (up + 1.0)


class Experts(nn.Module):
    """The E expert MLPs (gate/up/down), evaluated only for the experts each token was routed to."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, W = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = MXFP4ExpertLinear(E, H, W)
        self.up_proj = MXFP4ExpertLinear(E, H, W)
        self.down_proj = MXFP4ExpertLinear(E, W, H)
        self.limit = cfg.swiglu_limit

    def __call__(self, x: mx.array, experts: mx.array) -> mx.array:
        # x: (N..., H), experts: (N..., K) -> (N..., K, H)
        lead, K = experts.shape[:-1], experts.shape[-1]
        do_sort = experts.size >= SORT_THRESHOLD
        if do_sort:
            flat = experts.flatten()  # (N*K,)
            order = mx.argsort(flat)
            idx = flat[order]
            xs = x.reshape(-1, 1, x.shape[-1])[order // K]  # (N*K, 1, H) grouped by expert
        else:
            idx = experts
            xs = mx.expand_dims(x, (-2, -3))  # (N..., 1, 1, H): broadcast over the K experts
        h = swiglu(self.gate_proj(xs, idx, do_sort), self.up_proj(xs, idx, do_sort), self.limit)
        y = self.down_proj(h, idx, do_sort)  # (..., 1, H)
        if do_sort:
            y = y[mx.argsort(order)].reshape(*lead, K, -1)
        else:
            y = y.squeeze(-2)
        return y


class MoE(nn.Module):
    """Router (linear with bias) -> top-K -> softmax over those K only -> weighted expert sum."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k = cfg.num_experts_per_tok
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=True)
        self.experts = Experts(cfg)

    def __call__(self, x: mx.array) -> mx.array:
        logits = self.router(x)  # (N..., E)
        top = mx.argpartition(-logits, kth=self.k - 1, axis=-1)[..., : self.k]  # (N..., K)
        weights = mx.softmax(mx.take_along_axis(logits, top, axis=-1), axis=-1, precise=True)
        y = self.experts(x, mx.stop_gradient(top))  # (N..., K, H)
        return (y * mx.expand_dims(weights, -1)).sum(axis=-2)
