"""gptoss-mlx: OpenAI's gpt-oss on Apple Silicon with MLX.

Quick start:

    model, tokenizer = gptoss_mlx.load("path/to/converted")
    logits = model(mx.array([[200006, 1234]]))          # [batch, length, vocab]
    cache = model.make_cache(); model(tokens, cache=cache)  # continues from the cache
"""

__version__ = "0.1.0"

from .loading import load, load_model  # noqa: E402

__all__ = ["load", "load_model", "__version__"]
