"""Ready one rank of a sharded run for inference: check, preflight, load its share, agree.

Every step runs on every rank and ends every rank if it fails on any (Cluster.together), so a
rank that lacks the model folder, memory or a valid split stops the run with its own message
instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from ..harmony.tokenizer import load_tokenizer
from ..model.parallel import ShardedGptOss, ShardPlan
from ..weights.loading import default_dtype, inspect_folder
from ..weights.sharded import load_share
from .distributed import Cluster
from .memory import choose_max_context, set_wired_limit
from .shard_memory import Layout, rank_plan


def load_for_rank(
    cluster: Cluster,
    path: str | Path,
    max_context: int | None = None,
    batch: int = 1,
    dtype: mx.Dtype | None = None,
    threads: int | None = None,
) -> tuple[ShardedGptOss, Any, int]:
    """`load_for_inference` for this rank: (its model, the tokenizer, the context limit every
    rank enforces: the smallest that fits on all of them)."""
    dtype = dtype or default_dtype()
    plan = ShardPlan(cluster.mode, cluster.rank, cluster.size)
    checked = cluster.together(lambda: inspect_folder(path))
    cfg = checked.config

    def preflight() -> int:
        memory = rank_plan(Layout.of_folder(checked), dtype, plan)
        return choose_max_context(memory, max_context, cfg.max_position_embeddings, batch)

    context = cluster.agree_min(cluster.together(preflight))
    set_wired_limit()
    model = cluster.together(lambda: load_share(checked, plan, cluster.group, dtype, threads))
    tokenizer = cluster.together(lambda: load_tokenizer(checked.path))
    model.heartbeat = cluster.beat
    return model, tokenizer, context
