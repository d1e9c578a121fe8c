"""Mixture of experts: a linear router picks the top-k of E experts per token; each expert is a
clamped SwiGLU MLP whose weights stay as stored (MXFP4 as released) and are gathered per token
with `mx.gather_qmm`.

Shape legend: N tokens (any leading dims), H hidden, I expert width, E experts, K experts per token.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig

# Sorting token-expert pairs by expert makes gather_qmm read each expert's weights once per
# contiguous run instead of once per pair; it only pays off when many tokens arrive (prefill).
SORT_THRESHOLD = 64


# (mode, bits, group size) of the experts as OpenAI released them: 4-bit E2M1 values with one
# E8M0 scale byte per 32 inputs, which MLX reads as mode "mxfp4".
MXFP4 = ("mxfp4", 4, 32)


class ExpertLinear(nn.Module):
    """E stacked linear layers [E, out, in], gathered per token.

    Stored as released (MXFP4) by default. MLX conversions made by others (mlx_lm.convert,
    mlx-community, LM Studio) may hold them in another of MLX's quantization modes (`scheme` =
    (mode, bits, group size): affine with scales and biases, mxfp8, nvfp4) or in floating point
    (`scheme` None); each is computed by the matching gather kernel, never dequantized.
    """

    def __init__(
        self,
        num_experts: int,
        input_dims: int,
        output_dims: int,
        scheme: tuple[str, int, int] | None = MXFP4,
    ):
        super().__init__()
        E = num_experts
        self.mode, self.bits, self.group_size = scheme or (None, None, None)
        if scheme is None:
            self.weight = mx.zeros((E, output_dims, input_dims))
        else:
            self.weight = mx.zeros((E, output_dims, input_dims * self.bits // 32), dtype=mx.uint32)
            # Affine scales are floats with a float offset ("biases") per group; the
            # microscaling modes keep one scale byte per group.
            groups = (E, output_dims, input_dims // self.group_size)
            self.scales = mx.zeros(groups, dtype=mx.float32 if self.mode == "affine" else mx.uint8)
            if self.mode == "affine":
                self.biases = mx.zeros(groups)
        self.bias = mx.zeros((E, output_dims))

    def __call__(
        self, x: mx.array, rows: mx.array | None, experts: mx.array, sorted_indices: bool
    ) -> mx.array:
        """x (M, 1, in): rows of input; `rows` and `experts` (same shape S): the row of x and the
        expert of each token-expert pair (rows None: x holds one row per pair, in order).
        Returns (S..., 1, out)."""
        if self.mode is None:
            y = mx.gather_mm(
                x,
                self.weight.swapaxes(-1, -2),
                lhs_indices=rows,
                rhs_indices=experts,
                sorted_indices=sorted_indices,
            )
        else:
            y = mx.gather_qmm(
                x,
                self.weight,
                self.scales,
                self.get("biases"),
                lhs_indices=rows,
                rhs_indices=experts,
                transpose=True,
                group_size=self.group_size,
                bits=self.bits,
                mode=self.mode,
                sorted_indices=sorted_indices,
            )
        return add_expert_bias(y, self.bias, rows, experts) if "bias" in self else y


def add_expert_bias(y: mx.array, bias: mx.array, rows: object, experts: mx.array, *_) -> mx.array:
    """y (S..., 1, out) plus each pair's expert bias row (bias: (E, out), experts: (S...))."""
    return y + mx.expand_dims(bias[experts], -2)


@functools.lru_cache(maxsize=32)
def _pair_index(n: int, k: int, of_token: bool) -> mx.array:
    """Constant (n, k) uint32 indices: the token of each pair (of_token) or the pair itself.

    Passed to gather_qmm as lhs_indices; left out, MLX would build them (an arange, a reshape,
    broadcasts) inside every call, and a traced decode step replays every such op each token.
    """
    pairs = mx.arange(n * k, dtype=mx.uint32).reshape(n, k)
    out = pairs // k if of_token else pairs
    mx.eval(out)
    return out


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
        self.gate_proj = ExpertLinear(E, H, W)
        self.up_proj = ExpertLinear(E, H, W)
        self.down_proj = ExpertLinear(E, W, H)
        self.limit = cfg.swiglu_limit

    def __call__(self, x: mx.array, experts: mx.array) -> mx.array:
        # x: (N..., H), experts: (N..., K) -> (N..., K, H)
        lead, K, H = experts.shape[:-1], experts.shape[-1], x.shape[-1]
        if experts.size >= SORT_THRESHOLD:
            flat = experts.flatten()  # (N*K,)
            order = mx.argsort(flat)
            idx = flat[order]
            # One row per pair, grouped by expert: the layout MLX's sorted kernels expect.
            xs = x.reshape(-1, 1, H)[order // K]  # (N*K, 1, H)
            gate, up = self.gate_proj(xs, None, idx, True), self.up_proj(xs, None, idx, True)
            y = self.down_proj(swiglu(gate, up, self.limit), None, idx, True)  # (N*K, 1, H)
            return y[mx.argsort(order)].reshape(*lead, K, H)
        N = experts.size // K
        idx = experts.reshape(N, K)
        xs = x.reshape(N, 1, H)
        tokens = _pair_index(N, K, of_token=True)
        gate, up = self.gate_proj(xs, tokens, idx, False), self.up_proj(xs, tokens, idx, False)
        h = swiglu(gate, up, self.limit)  # (N, K, 1, W)
        y = self.down_proj(h, _pair_index(N, K, of_token=False), idx, False)  # (N, K, 1, H)
        return y.reshape(*lead, K, H)


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
