"""gptoss-mlx: OpenAI's gpt-oss on Apple Silicon with MLX."""

__version__ = "0.1.0"
