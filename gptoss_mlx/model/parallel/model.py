"""ShardedGptOss: gpt-oss built for one rank of a sharded run.

Built in three steps by the loader (weights/sharded.py): the whole model's structure with lazy,
never-evaluated parameters; quantized like the folder (which names the modules by their global
paths); then `shard()`, which leaves only this rank's share, so that each parameter's shape says
which slice of the stored tensor this rank must read.

Rank 0 holds the vocabulary head and is the only rank that samples. The other ranks return
placeholder logits that depend on their forward pass (so evaluating them runs the pass and its
collectives) and take rank 0's token (engine/distributed.py).

Pipeline forward pass: rank N-1 embeds the tokens, runs the first layers and sends the hidden
states to rank N-2, and so on down to rank 0, which runs the last layers and the head. Sends and
receives go only to ring neighbours (the ring backend allows nothing else), and each rank's
receive comes before its send in one chain, so no rank ever waits on a send and a receive at
once (the deadlock that pairing them in one evaluation on both sides produces).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import mlx.core as mx

from ..config import FULL, SLIDING, ModelConfig
from ..transformer import GptOss
from .layers import shard_attention, shard_expert_widths, shard_experts
from .plan import EXPERT, PIPELINE, TENSOR, ShardPlan

_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


class ShardedGptOss(GptOss):
    """GptOss for rank `plan.rank` of `plan.size`; `group` is the `mx.distributed` group (or a
    `PlannedGroup` when only the shapes are wanted)."""

    def __init__(self, cfg: ModelConfig, dtype: mx.Dtype, plan: ShardPlan, group: Any):
        super().__init__(cfg, dtype)
        self.plan = plan
        self.group = group
        self.first_layer = 0
        # Called at every forward pass: the engine's watchdog counts it as progress.
        self.heartbeat: Callable[[], None] | None = None

    @property
    def rank(self) -> int:
        return self.plan.rank

    def shard(self) -> None:
        """Keep only this rank's share (call after quantizing, before loading weights)."""
        plan, cfg, group = self.plan, self.config, self.group
        if plan.mode == EXPERT:
            first, count = plan.expert_range(cfg.num_local_experts)
            for block in self.layers:
                block.mlp = shard_experts(block.mlp, first, count, group)
        elif plan.mode == TENSOR:
            for block in self.layers:
                shard_attention(block.self_attn, group)
                block.mlp = shard_expert_widths(block.mlp, group)
        elif plan.mode == PIPELINE:
            start, end = plan.layer_range(cfg.num_hidden_layers)
            self.first_layer = start
            self.model.layers = self.model.layers[start:end]
            self.layer_types = self.layer_types[start:end]
            self._first = {
                t: self.layer_types.index(t) for t in (SLIDING, FULL) if t in self.layer_types
            }
        if not plan.holds_embedding:
            self.model.pop("embed_tokens")
        if not plan.holds_final_norm:
            self.model.pop("norm")
        if not plan.holds_head:
            self.pop("lm_head")

    def global_name(self, name: str) -> str:
        """The stored tensor name of local parameter `name` (a pipeline stage numbers its layers
        from 0; the folder numbers them from the first layer of the model)."""
        if not self.first_layer:
            return name
        return _LAYER_NAME.sub(lambda m: f"model.layers.{int(m[1]) + self.first_layer}.", name)

    # ------------------------------------------------------------------ forward

    def hidden(self, tokens: mx.array, cache: list[Any] | None = None) -> mx.array:
        if self.heartbeat is not None:
            self.heartbeat()
        h = (
            self._stage(tokens, cache)
            if self.plan.mode == PIPELINE
            else super().hidden(tokens, cache)
        )
        if cache:
            # The next pass reads this cache, so it now waits for all of this pass, collectives
            # included. Without that, two passes evaluated together could interleave their
            # collectives in a different order on each rank, pairing the wrong all_sums (the
            # results are silently wrong). It also makes the pipeline's send run whenever the
            # caches are evaluated (prefill evaluates only them), as mlx-lm's pipelines do.
            _after(cache[0], h)
        return h

    def _stage(self, tokens: mx.array, cache: list[Any] | None) -> mx.array:
        """This pipeline stage's part of the forward pass: receive (or embed), run its layers,
        send on (or, on rank 0, apply the final norm)."""
        rank, group = self.plan.rank, self.group
        if "embed_tokens" in self.model:
            x = self.model.embed_tokens(tokens).astype(self.dtype)
        else:
            shape = (*tokens.shape, self.config.hidden_size)
            x = mx.distributed.recv(shape, self.dtype, rank + 1, group=group)
        x = self.blocks(x, cache)
        if rank == 0:
            return self.model.norm(x)
        return mx.distributed.send(x, rank - 1, group=group)

    def __call__(
        self, tokens: mx.array, cache: list[Any] | None = None, last_only: bool = False
    ) -> mx.array:
        h = self.hidden(tokens, cache)
        if last_only:
            h = h[:, -1:, :]
        if "lm_head" in self:
            return self.lm_head(h)
        # Not rank 0: placeholder logits that cost no projection but whose evaluation runs this
        # rank's forward pass, collectives included.
        zeros = mx.zeros((*h.shape[:-1], self.config.vocab_size), dtype=self.dtype)
        return mx.depends(zeros, h)


def _after(cache: Any, x: mx.array) -> None:
    """Make `cache`'s keys depend on `x` (mlx-lm's pipelines do it for their sends)."""
    arrays = getattr(cache, "arrays", None)  # compiled_decode.StaticKVCache
    if isinstance(arrays, dict):
        arrays["keys"] = mx.depends(arrays["keys"], x)
    elif getattr(cache, "keys", None) is not None:
        cache.keys = mx.depends(cache.keys, x)
