"""`gptoss-mlx generate` (one prompt, answer on stdout) and `prompt` (the harmony prompt shown)."""

from __future__ import annotations

import sys

import click

from .main import CONTEXT_SETTINGS, handle_errors, main, model_options, session_from_options
from .mcp_tools import mcp_options
from .structured import structured_from_options, structured_options


@main.command(context_settings=CONTEXT_SETTINGS)
@click.argument("request_file", metavar="[FILE|-]", default="-", type=click.File("rb"))
@click.option("--ids", is_flag=True, help="Print token ids (a JSON list) instead of text.")
@click.option(
    "-m",
    "--model",
    type=click.Path(exists=True, file_okay=False),
    help="Model folder whose tokenizer.json to use for --ids (default: o200k_base from "
    "$TIKTOKEN_ENCODINGS_BASE or tiktoken's cache).",
)
@click.option("--date", help="Current date for the system message, YYYY-MM-DD (default: today).")
@handle_errors
def prompt(request_file, ids: bool, model: str | None, date: str | None) -> None:
    """Show the harmony prompt the model would get for a chat request.

    \b
    FILE holds an OpenAI-style chat request (JSON: {"messages": [...], "tools": [...],
    "reasoning_effort": "low"|"medium"|"high"}) or a bare list of messages; - reads stdin.
    Example:
      echo '[{"role": "user", "content": "Hi"}]' | gptoss-mlx prompt --date 2025-01-01
    """
    import json

    from ..harmony.render import render_prompt, render_text
    from ..harmony.request import load_chat_request
    from ..harmony.tokenizer import load_default_tokenizer, load_tokenizer
    from .streams import echo, require_stdout

    require_stdout()
    name = getattr(request_file, "name", "<stdin>")
    name = "stdin" if name in ("<stdin>", "-") else name
    request = load_chat_request(request_file.read(), source=name)
    if not ids:
        echo(render_text(request, date=date))
        return
    tokenizer = load_tokenizer(model) if model else load_default_tokenizer()
    echo(json.dumps(render_prompt(request, tokenizer, date=date)))


@main.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "-p", "--prompt", "prompt_text", default=None, help="The prompt (default: read stdin)."
)
@model_options
@mcp_options
@structured_options
@click.option("--show-reasoning", is_flag=True, help="Stream the model's reasoning to stderr.")
@click.option("--raw", is_flag=True, help="Plain text completion of the prompt, without harmony.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object with the whole result."
)
@handle_errors
def generate(
    prompt_text, show_reasoning: bool, raw: bool, as_json: bool, verbose: bool, **opts
) -> None:
    """Answer one prompt: the final answer streams to stdout.

    \b
    Examples:
      gptoss-mlx generate -p "Why is the sky blue?"
      echo "Summarise: ..." | gptoss-mlx generate -r low
      gptoss-mlx generate -p "Weather in Paris?" --tools tools.json --json
      gptoss-mlx generate --raw -p "def fibonacci(n):" -t 0 -n 64
      gptoss-mlx generate -p "List 3 fruits" --response-format fruits.schema.json
      gptoss-mlx generate -p "What is 2+3?" --mcp mcp.json --allow-tools add

    With --mcp the model's calls to the servers' tools run (only those in --allow-tools, or
    all with --yes-tools; generate cannot ask) and it goes on until it answers.

    --raw completes the prompt as plain text: --system, --developer,
    --tools, --mcp, -r and --show-reasoning do not apply to it and are refused.
    A prompt that leaves no room in the context (--max-context) is bad
    input: one error line, exit 2, nothing on stdout (--json and --raw too).

    --response-format FILE / --json-object guarantee that the final answer is
    JSON matching the schema (a grammar constrains decoding); an answer cut off
    by --max-tokens before its JSON closes is not valid: exit 1.

    Exit status: 0 ok, 2 bad usage or input, 1 runtime failure.
    """
    import json as _json

    from ..errors import UsageError
    from .sharded import follow, join_cluster, mirrored, refuse_piped_stdin
    from .streams import check_text, echo, read_stdin_text, require_stdout

    cluster = join_cluster(opts)  # first, before anything runs MLX (--shard: cli/sharded.py)
    if cluster is not None and not cluster.leader:
        return follow(cluster)  # the other ranks repeat rank 0's work
    if raw:
        refuse_with_raw()
    require_stdout()
    if prompt_text is None:
        refuse_piped_stdin(cluster, "the prompt", "pass it with -p")
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("no prompt: pass -p TEXT or pipe the prompt on stdin")
        prompt_text = read_stdin_text()
    else:
        check_text(prompt_text, "--prompt")
    if not prompt_text.strip():
        raise UsageError("the prompt is empty")
    structured = structured_from_options(opts, raw=raw)  # checked before anything starts
    from .mcp_tools import echo_err, mcp_tools

    # Checked before the model loads; the servers start while it loads, stop when we return.
    tools = click.get_current_context().with_resource(
        mcp_tools(opts, interactive=False, command="generate", raw=raw)
    )
    session = session_from_options(structured=structured, cluster=cluster, **opts)
    if tools is not None:
        tools.attach(session, echo_err)
    if raw:
        from ..engine.generate import GenerationStats, generate_tokens
        from ..harmony.tokenizer import StreamingDetokenizer

        tok = session.tokenizer
        stats = GenerationStats()
        detok = StreamingDetokenizer(tok)
        pieces = []
        eos = (tok.special("<|endoftext|>"), tok.return_)
        for t in mirrored(session, generate_tokens)(
            session.model,
            tok.encode(prompt_text),
            max_tokens=session.max_tokens,
            stop_ids=eos,
            sampling=session.sampling,
            max_context=session.max_context,
            stats=stats,
        ):
            if t in eos:
                continue  # the last token; resuming lets the engine record finish "stop"
            piece = detok.add(t)
            pieces.append(piece)
            if not as_json:
                echo(piece, nl=False)
        pieces.append(detok.flush())
        text = "".join(pieces)
        if as_json:
            echo(
                _json.dumps(
                    {
                        "text": text,
                        "finish_reason": stats.finish_reason,
                        "usage": {
                            "prompt_tokens": stats.prompt_tokens,
                            "completion_tokens": stats.generation_tokens,
                            "total_tokens": stats.prompt_tokens + stats.generation_tokens,
                        },
                    },
                    ensure_ascii=False,
                )
            )
        else:
            echo(pieces[-1])
        if verbose:
            click.echo(stats.summary(), err=True)
        return
    from .console import TurnPrinter

    printer = TurnPrinter(show_reasoning=show_reasoning)
    # A prompt with no room left in the context raises ContextLimitError: bad input, exit 2,
    # nothing on stdout (in every mode: plain, --json and --raw).
    result = session.send(prompt_text, None if as_json else printer)
    if tools is not None:
        result = tools.run_rounds(session, result, None if as_json else printer, echo_err)
    if as_json:
        obj = result.to_json() if tools is None else tools.json(result, session)
        echo(_json.dumps(obj, ensure_ascii=False))
    else:
        printer.end()
        if result.finish_reason == "length":
            click.echo("[stopped: max tokens or context limit reached]", err=True)
    if verbose:
        click.echo(result.stats.summary(), err=True)
    if structured.response_format is not None and result.finish_reason == "length":
        from ..errors import GptOssError

        raise GptOssError(
            "the answer was cut off before its JSON closed (max tokens or context limit): "
            "it is not valid; raise --max-tokens or --max-context, or set --max-reasoning-tokens"
        )


# Options that shape a harmony prompt or its channels; a --raw completion has neither.
_HARMONY_ONLY = {
    "system": "--system",
    "developer": "--developer",
    "tools_file": "--tools",
    "reasoning_effort": "-r/--reasoning-effort",
    "show_reasoning": "--show-reasoning",
    "mcp_config": "--mcp",
}


def refuse_with_raw() -> None:
    """UsageError naming the options given with --raw that it would otherwise ignore."""
    from ..errors import UsageError

    ctx = click.get_current_context()
    named = [
        flag
        for name, flag in _HARMONY_ONLY.items()
        if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)
    ]
    if named:
        raise UsageError(
            f"--raw completes plain text without harmony: {', '.join(named)} "
            f"{'does' if len(named) == 1 else 'do'} not apply to it; drop "
            f"{'it' if len(named) == 1 else 'them'} or drop --raw"
        )
