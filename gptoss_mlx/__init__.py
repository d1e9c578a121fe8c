"""gptoss-mlx: OpenAI's gpt-oss on Apple Silicon with MLX.

Quick start:

    model, tokenizer = gptoss_mlx.load("path/to/converted")
    logits = model(mx.array([[200006, 1234]]))          # [batch, length, vocab]
    cache = model.make_cache(); model(tokens, cache=cache)  # continues from the cache

The package, one layer per folder; imports only run downward:

    model/    the transformer: config, RoPE/YaRN, attention with sinks, MXFP4 experts
    weights/  converted folders on disk: header checks, tensor layout, loading, verify
    harmony/  the harmony format: tokenizer, chat request, renderer, streaming parser
    engine/   running the model: prefill/decode, batching, prompt cache, chat sessions, memory
    cli/      the `gptoss-mlx` command line (front end)
    convert/  (top-level folder, installed as gptoss_mlx.convert) the checkpoint converter
"""

from __future__ import annotations

# Not `from typing import TYPE_CHECKING`: this module runs before the CLI can catch Ctrl-C
# (gptoss_mlx/cli/__init__.py), so it imports nothing; type checkers read the name the same way.
TYPE_CHECKING = False

__version__ = "0.1.0"

__all__ = ["load", "load_model", "ChatSession", "__version__"]

if TYPE_CHECKING:
    from .engine.chat import ChatSession
    from .engine.runtime import load
    from .weights.loading import load_model

# Imported on first use, so that `import gptoss_mlx.cli` (and `gptoss-mlx --help`) stays fast.
_LAZY = {
    "load": "gptoss_mlx.engine.runtime",
    "load_model": "gptoss_mlx.weights.loading",
    "ChatSession": "gptoss_mlx.engine.chat",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gptoss_mlx' has no attribute {name!r}")
