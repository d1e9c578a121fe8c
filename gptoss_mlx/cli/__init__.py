"""The `gptoss-mlx` command line: a front end, thin over the library.

main.py         the click group, error handling, the options shared by model-running commands
model_files.py  convert, verify, info (memory_view.py prints info's table)
models.py       models, models rm: what this machine has (convert/local_models.py)
generate.py     generate, prompt
chat.py         chat; repl.py is its loop, console.py its terminal output
mcp_tools.py    --mcp for chat and generate: consent and tool rounds; mcp_client.py runs the
                servers (MCP SDK, background thread), mcp_config.py reads the mcpServers file,
                mcp_names.py names the tools for the model
batch.py        batch; batch_job.py runs the JSONL job, batch_files.py reads and writes its files
bench.py        bench
serve.py        serve: the OpenAI-compatible server (the server package) on uvicorn
progress.py     the progress bars of long jobs (tqdm)
sharded.py      --shard under mlx.launch: rank 0 leads, the other ranks follow its orders;
                shard_view.py prints info --shard

May import anything below it (engine, harmony, weights, model, convert). Nothing imports it.
Commands import their heavy modules inside the function, so `--help` loads neither MLX nor mlx-lm.

This is the module the `gptoss-mlx` script imports (`from gptoss_mlx.cli import main`): Ctrl-C
while it imports click and the commands ends the process with `interrupted` and exit 130, not a
traceback through the imports; once running, `main.Group` and `handle_errors` do the same.
"""

import sys

try:
    from . import batch, bench, chat, generate, model_files, models, serve  # noqa: F401  (registers)
    from .main import main
except KeyboardInterrupt:
    sys.stderr.write("interrupted\n")
    raise SystemExit(130) from None

__all__ = ["main"]
