"""Running the model: from token ids to streamed turns, one sequence or many.

generate.py      chunked prefill, then decoding pipelined with mx.async_eval; sampling
batching.py      continuous batching: many sequences decode together, finished slots refilled
constraints/     structured outputs: one llguidance grammar per request over the harmony turn,
                 a matcher per sequence masking its logits (JSON answers, tool arguments)
prompt_cache.py  KV cache reuse across turns, with checkpoints of the sliding-window layers
prompt_store.py  KV snapshots of recent prompts' ends, reused across a server's requests
scheduler.py     the server's engine thread: a request queue into batching, token streams out
request_stream.py  one request's events (tokens, then finished/failed), for threads or asyncio
chat.py          ChatSession: harmony turns streamed as events, the conversation's history
memory.py        the memory preflight: weights + KV cache + working memory vs the device
memory_table.py  `info`'s calculator: every recipe x context x batch, before any download
runtime.py       load(): model + tokenizer; load_for_inference(): preflight first
distributed.py   one rank of a --shard run: rank 0's token for all, agreement, watchdog;
                 sharded_runtime.py loads a rank's share, shard_memory.py sizes it
bench.py         the measurements behind `gptoss-mlx bench`

May import: gptoss_mlx.errors, model, weights, harmony, and convert (memory_table sizes our
recipes with the converter's own plan). Never a front end (cli, server).
"""
