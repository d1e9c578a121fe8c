"""Converted model folders on disk (ours, and MLX conversions made by others): what they must
hold, how they are checked and loaded.

safetensors_header.py  every shard header validated before MLX opens the file
layout.py              the tensors a folder must hold, from its config.json
loading.py             manifest and folder checks, then the model with its weights mapped lazily
verify.py              `gptoss-mlx verify`: sizes and sha256 of every file against the manifest
mlx_folder.py          MLX conversions others made (mlx_lm.convert, mlx-community, LM Studio),
                       checked as far as they can be without a manifest, loaded as they are
sharded.py             one rank's share of a folder (--shard), read by partial.py: only its slices

May import: gptoss_mlx.errors, gptoss_mlx.model.
"""
