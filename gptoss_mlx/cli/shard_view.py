"""`gptoss-mlx info --shard MODE --ranks N`: the memory each rank of a sharded run needs.

Per rank: the weights it holds and its total (weights + its KV cache + working memory) at a few
contexts, in bfloat16 as on a Mac, the smallest Mac each fits, and whether it fits this device.
A converted folder is sized as stored; a checkpoint or hub id as the default recipe would store it;
an MLX conversion by others from its config.json (engine/shard_memory.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlx.core as mx

from ..engine.memory_table import MAC_RAM_GB, Target, mac_limits
from ..engine.shard_memory import Layout, rank_plans
from ..weights.loading import default_dtype

CONTEXTS = (4096, 32768, 131072)
_GB = 1e9


def target_layout(target: Target) -> tuple[Layout, str]:
    """(the layout to size, how it is stored) for what `info` was given."""
    from gptoss_mlx.convert.resolve import DEFAULT_RECIPE

    if target.folder is not None:
        recipe = (target.folder.raw_config.get("gptoss_mlx") or {}).get("recipe")
        return Layout.of_folder(target.folder), recipe or "as stored"
    if target.is_mlx_conversion:
        from ..weights.layout import layout_weights, schemes_from_config

        source = f"{target.name}/config.json"
        schemes = schemes_from_config(target.config, target.raw.get("quantization"), source)
        specs = layout_weights(target.config, "BF16", schemes, source)
        shapes = {name: tuple(s.shape) for name, s in specs.items()}
        return Layout(target.config, schemes, shapes), "as stored"
    return Layout.of_recipe(target.config, DEFAULT_RECIPE), DEFAULT_RECIPE


def smallest_mac(total: int) -> str:
    """`48` (fits macOS's default GPU limit), `48w` (with the wired limit raised) or `-`."""
    for gb in MAC_RAM_GB:
        default, raised = mac_limits(gb)
        if total <= default:
            return str(gb)
        if total <= raised:
            return f"{gb}w"
    return "-"


def shard_figures(target: Target, mode: str, ranks: int, batch: int = 1) -> dict[str, Any]:
    """Every rank's figures (a JSON-able dict); UsageError when the split does not fit."""
    layout, stored = target_layout(target)
    limit = target.config.max_position_embeddings
    contexts = [c for c in CONTEXTS if c <= limit] or [limit]
    mac = rank_plans(layout, mx.bfloat16, mode, ranks, budget=(0, "a Mac"))
    here_dtype = default_dtype()
    here = rank_plans(layout, here_dtype, mode, ranks)
    rows = []
    for r, (m, h) in enumerate(zip(mac, here, strict=True)):
        rows.append(
            {
                "rank": r,
                "weights": m.weights,
                "total": {str(c): m.total(c, batch) for c in contexts},
                "smallest_mac": {str(c): smallest_mac(m.total(c, batch)) for c in contexts},
                "fits_here": {str(c): h.fits(c, batch) for c in contexts},
            }
        )
    return {
        "mode": mode,
        "ranks": ranks,
        "stored": stored,
        "batch": batch,
        "contexts": contexts,
        "here": {"dtype": str(here_dtype).rsplit(".", 1)[-1], "budget": here[0].budget},
        "per_rank": rows,
    }


def shard_lines(figures: dict[str, Any]) -> Iterator[str]:
    contexts = figures["contexts"]
    heads = "".join(f"{_ctx(c):>8}" for c in contexts)
    yield ""
    yield (
        f"--shard {figures['mode']} over {figures['ranks']} ranks ({figures['stored']}"
        + (f", batch {figures['batch']}" if figures["batch"] > 1 else "")
        + "): GB per rank, bfloat16 as on a Mac; the smallest Mac it fits (w: with the wired "
        "limit raised)"
    )
    mid = contexts[len(contexts) // 2]
    yield f"  rank  weights{heads}   Mac at {_ctx(mid)}   fits here ({figures['here']['dtype']})"
    for row in figures["per_rank"]:
        totals = "".join(f"{row['total'][str(c)] / _GB:8.2f}" for c in contexts)
        here = "/".join(_ctx(c) for c in contexts if row["fits_here"][str(c)]) or "no"
        yield (
            f"  {row['rank']:>4}  {row['weights'] / _GB:7.2f}{totals}   "
            f"{row['smallest_mac'][str(mid)]:>9}   {here}"
        )


def _ctx(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)
