"""Repack openai/gpt-oss checkpoints into MLX model folders (installed as gptoss_mlx.convert)."""
