"""Memory per rank of a sharded run, for the preflight and `gptoss-mlx info --shard`.

Each rank's figures come from the structure of its own model (model/parallel, built with
parameters that are never allocated): the weights it holds (its share plus what every rank
keeps), the key/value heads and layers its caches hold, against what its device allows. The loader
reads exactly what that structure holds (weights/sharded.py), so the two cannot disagree. Works for
a converted folder (its shard headers) and for a recipe before any download (the converter's plan).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..model.config import ModelConfig
from ..model.parallel import PlannedGroup, ShardPlan
from ..weights.loading import ConvertedFolder
from ..weights.sharded import build_share, stored_shapes
from .memory import MemoryPlan, plan_for


@dataclass
class Layout:
    """How a model is (or would be) stored: its config, each module's scheme and each tensor's
    shape; all a rank's structure needs."""

    config: ModelConfig
    schemes: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of_folder(cls, folder: ConvertedFolder) -> Layout:
        return cls(folder.config, folder.schemes, stored_shapes(folder))

    @classmethod
    def of_recipe(cls, cfg: ModelConfig, recipe: str) -> Layout:
        """A folder `gptoss-mlx convert --recipe` would write, from the converter's plan."""
        from gptoss_mlx.convert.convert import planned_tensors
        from gptoss_mlx.convert.recipes import RECIPES, quantization_config

        from ..weights.layout import resolve_schemes

        specs = planned_tensors(cfg, recipe)
        names = {s.name for s in specs}
        schemes = resolve_schemes(cfg, quantization_config(cfg, RECIPES[recipe]), names)
        return cls(cfg, schemes, {s.name: tuple(s.shape) for s in specs})


def rank_plan(
    layout: Layout, dtype: mx.Dtype, plan: ShardPlan, budget: tuple[int, str] | None = None
) -> MemoryPlan:
    """The memory plan of rank `plan.rank` (UsageError if the split does not fit the model)."""
    group = PlannedGroup(plan.rank, plan.size)
    model = build_share(layout.config, layout.schemes, layout.shapes, dtype, plan, group)
    weights = 0
    for _, p in tree_flatten(model.parameters()):
        floating = mx.issubdtype(p.dtype, mx.floating)
        weights += p.size * dtype.size if floating else p.nbytes  # floats load in `dtype`
    attn = model.layers[0].self_attn
    local = replace(
        layout.config,
        num_hidden_layers=len(model.layers),
        num_key_value_heads=attn.n_kv,
        num_attention_heads=attn.n_heads,
        layer_types=list(model.layer_types),
    )
    return plan_for(local, weights, dtype, budget=budget)


def rank_plans(
    layout: Layout,
    dtype: mx.Dtype,
    mode: str,
    size: int,
    budget: tuple[int, str] | None = None,
) -> list[MemoryPlan]:
    """Every rank's plan for `size` ranks in `mode`."""
    return [rank_plan(layout, dtype, ShardPlan(mode, r, size), budget) for r in range(size)]
