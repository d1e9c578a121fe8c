"""`gptoss-mlx serve`: the OpenAI-compatible server (gptoss_mlx/server) on uvicorn."""

from __future__ import annotations

import logging
import os
import re
import sys

import click

from ..errors import UsageError
from .main import CONTEXT_SETTINGS, handle_errors, main
from .sharded import shard_options

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class ByteSize(click.ParamType):
    """A size in bytes: 2147483648, 2G, 512M, 1.5GiB."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = _SIZE.match(str(value))
        if not m:
            self.fail(f"{value!r} is not a size (e.g. 2G, 512M, 1073741824)", param, ctx)
        unit = (m.group(2) or "").lower()[:1]
        return int(float(m.group(1)) * _UNITS[unit])


def default_model_id(config, folder) -> str:
    """`gpt-oss-20b` / `gpt-oss-120b` for those architectures (what Codex's model table and
    clients expect), else the model folder's name."""
    shape = (config.num_hidden_layers, config.num_local_experts, config.hidden_size)
    known = {(24, 32, 2880): "gpt-oss-20b", (36, 128, 2880): "gpt-oss-120b"}
    return known.get(shape, os.path.basename(os.path.normpath(str(folder))))


@main.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "-m",
    "--model",
    envvar="GPTOSS_MLX_MODEL",
    default=None,
    metavar="MODEL",
    help="A converted folder, a Hugging Face-layout folder or a hub repo id (converted once into "
    "$GPTOSS_MLX_HOME). [default: openai/gpt-oss-20b; env GPTOSS_MLX_MODEL]",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Anything but 127.0.0.1 exposes the server: set --api-key.",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--api-key",
    envvar="GPTOSS_MLX_API_KEY",
    default=None,
    help="Require `Authorization: Bearer KEY` on every endpoint but /health. "
    "[env GPTOSS_MLX_API_KEY]",
)
@click.option(
    "--max-concurrency",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Sequences decoding together (continuous batching).",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="Requests waiting for a slot; beyond it the answer is 503 with Retry-After.",
)
@click.option(
    "--prompt-cache-bytes",
    type=ByteSize(),
    default="1G",
    show_default=True,
    help="Memory for the KV state of recent prompts, reused by requests that share a prefix "
    "(multi-turn chats: each turn prefills only its new tokens); 0 turns it off.",
)
@click.option(
    "--max-context",
    type=click.IntRange(min=16),
    default=None,
    help="Most tokens per sequence (prompt + answer). [default: the largest that fits memory]",
)
@click.option(
    "-r",
    "--reasoning-effort",
    type=click.Choice(["low", "medium", "high"]),
    default="medium",
    show_default=True,
    help="Reasoning effort of requests that do not set one.",
)
@click.option(
    "--model-id",
    default=None,
    help="The model id /v1/models lists. [default: gpt-oss-20b or gpt-oss-120b by shape]",
)
@click.option(
    "--strict-tools",
    is_flag=True,
    help="Hold every tool call's arguments to its JSON schema (constrained decoding), not only "
    "the tools a request marks `strict`.",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    metavar="ORIGIN",
    help="Allow browser pages from ORIGIN (repeatable; * for any). CORS is off by default.",
)
@shard_options
@handle_errors
def serve(
    model,
    host,
    port,
    api_key,
    max_concurrency,
    max_queue,
    prompt_cache_bytes,
    max_context,
    reasoning_effort,
    model_id,
    strict_tools,
    cors_origins,
    shard,
    shard_timeout,
) -> None:
    """Serve the model over the OpenAI API: Chat Completions and Responses.

    Endpoints: GET /v1/models, GET /health, POST /v1/chat/completions, POST /v1/responses,
    GET and DELETE /v1/responses/{id}; streamed (SSE) and not. Reasoning comes back as
    `reasoning` and `reasoning_content`; tool calls as OpenAI's `tool_calls` / function_call
    items. One log line per request on stderr.

    \b
    Examples:
      gptoss-mlx serve                                  # http://127.0.0.1:8000/v1
      gptoss-mlx serve -m ~/models/gpt-oss-20b-mlx --max-concurrency 8
      gptoss-mlx serve --host 0.0.0.0 --api-key "$(openssl rand -hex 16)"
      mlx.launch --hostfile ring.json -- .venv/bin/gptoss-mlx serve --shard expert -m DIR
    \b
    Then, from Python:
      OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    Codex CLI: a [model_providers.gptoss] entry with wire_api = "responses" (see README).
    """
    from .sharded import follow, join_cluster, lead_scheduler, open_model

    if shard == "pipeline" and prompt_cache_bytes:
        raise UsageError(
            "serve --shard pipeline keeps no prompt cache: pass --prompt-cache-bytes 0 (each "
            "stage's KV snapshots differ in size, so the ranks' caches would disagree)"
        )
    # First, before anything runs MLX; the other ranks repeat rank 0's engine (cli/sharded.py).
    cluster = join_cluster({"shard": shard, "shard_timeout": shard_timeout})
    if cluster is not None and not cluster.leader:
        return follow(cluster)

    import uvicorn

    from gptoss_mlx.convert.resolve import resolve_model

    from ..engine.runtime import load_for_inference
    from ..engine.scheduler import Scheduler
    from ..server.app import create_app
    from ..server.state import ServerState

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    if host not in LOCAL_HOSTS and not api_key:
        click.echo(
            f"warning: listening on {host} without --api-key: anyone who can reach this port can "
            "use the model (set --api-key or GPTOSS_MLX_API_KEY)",
            err=True,
        )
    if cluster is None:
        path = resolve_model(model)
        mdl, tok, context = load_for_inference(path, max_context, batch=max_concurrency)
    else:
        mdl, tok, context = open_model(cluster, model, max_context, batch=max_concurrency)
        path = resolve_model(model)  # converted by now: only its folder, for the model id
    scheduler = Scheduler(
        mdl,
        tok,
        max_context=context,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        prompt_cache_bytes=prompt_cache_bytes,
    )
    state = ServerState(
        scheduler=scheduler,
        tokenizer=tok,
        model_id=model_id or default_model_id(mdl.config, path),
        max_context=context,
        vocab_size=mdl.config.vocab_size,
        api_key=api_key or None,
        default_effort=reasoning_effort,
        strict_tools=strict_tools,
    )
    app = create_app(state, cors_origins=cors_origins)
    lead_scheduler(cluster, scheduler)  # --shard: every rank runs the engine's steps
    scheduler.start()
    shown = f"[{host}]" if ":" in host else host
    click.echo(
        f"serving {state.model_id} on http://{shown}:{port}/v1 (context {context} tokens, "
        f"{max_concurrency} concurrent, queue {max_queue}); Ctrl-C stops",
        err=True,
    )
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=5,
        )
    finally:
        scheduler.close()
