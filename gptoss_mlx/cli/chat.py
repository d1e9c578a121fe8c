"""`gptoss-mlx chat`: the interactive chat (the loop itself is in repl.py)."""

from __future__ import annotations

import sys

import click

from .main import CONTEXT_SETTINGS, handle_errors, main, model_options, session_from_options
from .mcp_tools import mcp_options


@main.command(context_settings=CONTEXT_SETTINGS)
@model_options
@mcp_options
@click.option("--hide-reasoning", is_flag=True, help="Do not show the model's reasoning.")
@handle_errors
def chat(hide_reasoning: bool, verbose: bool, **opts) -> None:
    """Chat with gpt-oss in the terminal (harmony format, streaming).

    The reasoning streams dim, the answer plain. Type /help inside for commands
    (/effort, /system, /reset, /save, /load, /stats, /quit). With stdin not a terminal,
    each input line is one user message; a line that is not UTF-8 is
    refused (one error line, the chat goes on), and input that ends inside
    a \"\"\" block is an error (exit 2).

    \b
    Examples:
      gptoss-mlx chat                      # openai/gpt-oss-20b, converted on first use
      gptoss-mlx chat -m ~/models/gpt-oss-20b-mlx -r high
      gptoss-mlx chat --tools tools.json --system "Answer in French."
      gptoss-mlx chat --mcp ~/.lmstudio/mcp.json   # MCP servers' tools; y/a/n before each call

    With --mcp the model may call the servers' tools; each call waits for your y (once),
    a (always, this session) or n, unless --allow-tools NAME,... or --yes-tools.
    """
    from .mcp_tools import echo_err, mcp_tools
    from .repl import ChatLoop
    from .sharded import follow, join_cluster
    from .streams import require_stdout

    cluster = join_cluster(opts)  # first, before anything runs MLX (--shard: cli/sharded.py)
    if cluster is not None and not cluster.leader:
        return follow(cluster)  # rank 0 reads the messages; the others repeat its turns
    require_stdout()
    interactive = sys.stdin is not None and sys.stdin.isatty()
    with mcp_tools(opts, interactive=interactive, command="chat") as tools:
        session = session_from_options(cluster=cluster, **opts)
        if tools is not None:
            tools.attach(session, echo_err)
        loop = ChatLoop(session, show_reasoning=not hide_reasoning, verbose=verbose, tools=tools)
        loop.run()
