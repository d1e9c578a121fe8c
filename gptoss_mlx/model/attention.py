"""Grouped-query attention with learned sinks, for both sliding-window and full layers."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .rope import YarnRoPE, rotate


class Attention(nn.Module):
    """q/k/v/o projections with bias, YaRN RoPE, and one learned sink logit per query head.

    A sink joins each head's softmax denominator as one extra column whose value is dropped, so a
    head can attend to "nothing" (the reference's `torch.cat([QK, S])`);
    `mx.fast.scaled_dot_product_attention(..., sinks=)` computes exactly that.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = d = cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=True)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=True)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=True)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=True)
        self.sinks = mx.zeros((self.n_heads,))
        self.rope = YarnRoPE(cfg)
        # YaRN's concentration, folded in from q and k (see YarnRoPE).
        self.scale = self.rope.concentration**2 / math.sqrt(d)

    def project_qkv(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """q, k, v [B, L, heads*d] (a separate method so that experiments can fuse them)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def __call__(
        self,
        x: mx.array,
        mask: Any,
        cache: Any = None,
        rotation: tuple[mx.array, mx.array] | None = None,
    ) -> mx.array:
        """`rotation`: this pass's `YarnRoPE.rotation`, computed once for all layers (MLX's CPU
        backend); None rotates with `mx.fast.rope` (one kernel on a GPU)."""
        B, L, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.reshape(B, L, self.n_heads, -1).swapaxes(1, 2)  # (B, nh, L, d)
        k = k.reshape(B, L, self.n_kv, -1).swapaxes(1, 2)  # (B, nkv, L, d)
        v = v.reshape(B, L, self.n_kv, -1).swapaxes(1, 2)  # (B, nkv, L, d)
        if rotation is not None:
            q, k = rotate(q, rotation), rotate(k, rotation)
        else:
            offset = cache.offset if cache is not None else 0
            q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        o = mx.fast.scaled_dot_product_attention(
            q, k, v, scale=self.scale, mask=mask, sinks=self.sinks
        )
        return self.o_proj(o.swapaxes(1, 2).reshape(B, L, -1))  # (B, L, nh*d) -> (B, L, H)
