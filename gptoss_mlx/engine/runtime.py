"""Ready a model folder (ours, or an MLX conversion made by others) for inference: the model,
its tokenizer and the context limit.

`gptoss_mlx.load` is the public entry point; the commands use `load_for_inference`, which runs the
memory preflight before anything is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from ..harmony.tokenizer import load_tokenizer
from ..model.transformer import GptOss
from ..weights.loading import default_dtype, inspect_folder, load_checked, load_model
from .memory import choose_max_context, plan_checked, set_wired_limit


def load(
    path: str | Path, dtype: mx.Dtype | None = None, threads: int | None = None
) -> tuple[GptOss, Any]:
    """Load a converted folder: `model, tokenizer = gptoss_mlx.load(path)`.

    `path` is a folder `gptoss-mlx convert` wrote, or an MLX conversion of gpt-oss made by
    mlx_lm.convert (mlx-community's and LM Studio's downloads), read as it is.

    `dtype` is the activation dtype (default: float32 on MLX's CPU backend, bfloat16 on a GPU);
    `threads` as in load_model.
    """
    model = load_model(path, dtype, threads)
    return model, load_tokenizer(Path(path).expanduser())


def load_for_inference(
    path: str | Path,
    max_context: int | None = None,
    batch: int = 1,
    dtype: mx.Dtype | None = None,
    threads: int | None = None,
    cluster: Any = None,
) -> tuple[GptOss, Any, int]:
    """Preflight memory, then load: returns (model, tokenizer, context limit to enforce).

    The context limit is `max_context` when it fits, else (when None) the largest of
    128k/64k/32k/16k/8k/4k tokens that fits this device next to the weights. Raises
    MemoryPreflightError, saying what to change, before anything is loaded when nothing fits.
    With `cluster` (engine/distributed.Cluster) this process loads its rank's share only.
    """
    if cluster is not None:
        from .sharded_runtime import load_for_rank

        return load_for_rank(cluster, path, max_context, batch, dtype, threads)
    checked = inspect_folder(path)
    cfg = checked.config
    dtype = dtype or default_dtype()
    plan = plan_checked(checked, dtype)
    context = choose_max_context(plan, max_context, cfg.max_position_embeddings, batch)
    set_wired_limit()
    model = load_checked(checked, dtype, threads)
    return model, load_tokenizer(checked.path), context
