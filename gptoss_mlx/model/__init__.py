"""The gpt-oss transformer in MLX: the math, nothing about files, prompts or commands.

config.py           hyper-parameters (gpt-oss-20b's by default), validated against config.json
rope.py             rotary embeddings with YaRN, as OpenAI's reference computes them
attention.py        grouped-query attention with learned sinks, sliding-window (128) or full
moe.py              the router and the experts (MXFP4 as released), computed by sparse gather
transformer.py      GptOss: embeddings, alternating sliding/full blocks, the vocabulary head
cpu_streams.py      large matmuls split across CPU streams on MLX's CPU backend (bit-identical)
compiled_decode.py  the one-token decode step under mx.compile over fixed-shape KV caches
known_configs.py    OpenAI's released config.json files (configs/), shipped for sizing offline
parallel/           the model split over ranks with mx.distributed (--shard expert|tensor|pipeline)

May import: gptoss_mlx.errors, mlx, mlx-lm's caches. Nothing else in gptoss_mlx.
"""
