"""The gpt-oss transformer: pre-norm blocks alternating sliding-window and full attention, each
followed by a mixture of experts."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .attention import Attention
from .config import FULL, SLIDING, ModelConfig
from .moe import MoE

# Rotary embedding: True computes one rotation per forward pass, shared by every layer's q and k
# (YarnRoPE.rotation); False calls mx.fast.rope in each layer. None (default): shared on MLX's
# CPU backend, where mx.fast.rope expands into ~20 ops per call; mx.fast.rope on a GPU, where it is
# one kernel.
SHARED_ROTATION: bool | None = None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MoE(cfg)

    def __call__(self, x: mx.array, mask: Any, cache: Any = None, rotation: Any = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, rotation)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    """Embeddings, blocks and the final norm (mlx-lm's `model.` prefix in tensor names)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [Block(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class GptOss(nn.Module):
    """gpt-oss for causal LM.

    `model(tokens)` with tokens an int array [batch, length] returns logits [batch, length, vocab];
    with `cache=model.make_cache()` it continues from what the cache holds.
    """

    def __init__(self, cfg: ModelConfig, dtype: mx.Dtype = mx.float32):
        super().__init__()
        self.config = cfg
        # Activations run in this dtype; loading casts float weights to it (float32 on MLX's
        # CPU backend, whose quantized kernels are far faster with float32 inputs; bf16 on Metal).
        self.dtype = dtype
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.layer_types = cfg.layer_types
        self._first = {t: cfg.layer_types.index(t) for t in (SLIDING, FULL) if t in cfg.layer_types}

    @property
    def layers(self) -> list[Block]:
        return self.model.layers

    def make_cache(self) -> list[Any]:
        """One cache per layer: a growing one for full attention, a rotating window for sliding."""
        # mlx-lm is imported where it is used: importing it loads transformers (seconds), which
        # commands that never run the model (`info`, `verify`, `--help`) must not pay for.
        from mlx_lm.models.cache import KVCache, RotatingKVCache

        w = self.config.sliding_window
        return [KVCache() if t == FULL else RotatingKVCache(max_size=w) for t in self.layer_types]

    def hidden(self, tokens: mx.array, cache: list[Any] | None = None) -> mx.array:
        """Final-normed hidden states [batch, length, hidden]."""
        x = self.model.embed_tokens(tokens).astype(self.dtype)
        return self.model.norm(self.blocks(x, cache))

    def blocks(self, x: mx.array, cache: list[Any] | None = None) -> mx.array:
        """Run hidden states x [batch, length, hidden] through every block (the blocks this
        model holds: a pipeline stage holds a range of them, see model/parallel)."""
        from mlx_lm.models.base import create_attention_mask  # lazily: see make_cache

        caches = cache if cache is not None else [None] * len(self.layers)
        masks = {}
        for t, i in self._first.items():
            window = self.config.sliding_window if t == SLIDING else None
            masks[t] = create_attention_mask(x, caches[i], window_size=window)
        rotation = None
        shared = SHARED_ROTATION if SHARED_ROTATION is not None else mx.default_device() == mx.cpu
        if shared:
            # One rotation for every layer (see YarnRoPE.rotation); every cache is at one offset.
            offset = caches[0].offset if caches and caches[0] is not None else 0
            rotation = self.layers[0].self_attn.rope.rotation(offset, x.shape[1])
        for layer, c, t in zip(self.layers, caches, self.layer_types, strict=True):
            x = layer(x, masks[t], c, rotation)
        return x

    def __call__(
        self, tokens: mx.array, cache: list[Any] | None = None, last_only: bool = False
    ) -> mx.array:
        """Logits [batch, length, vocab]; with `last_only`, only for the last position
        ([batch, 1, vocab]), which spares the 201k-row vocabulary projection during prefill."""
        h = self.hidden(tokens, cache)
        if last_only:
            h = h[:, -1:, :]
        return self.lm_head(h)
