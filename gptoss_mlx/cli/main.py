"""The `gptoss-mlx` click group and what its commands share: error handling and model options.

Each command lives in its own module of this package and registers itself on `main`.
"""

from __future__ import annotations

import errno
import functools
import sys

import click

from .. import __version__
from ..errors import GptOssError

# A full disk or device, a file size limit, an I/O error: what a failed write to stdout raises.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def handle_errors(fn):
    """Turn our own errors into one line on stderr and an exit code; tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = bool(ctx.find_root().params.get("debug"))
        try:
            return fn(*args, **kwargs)
        except GptOssError as e:
            if debug:
                raise
            if getattr(e, "stdout", False):  # OutputError: stdout failed; exiting must not retry
                _silence_stdout()
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            # `gptoss-mlx generate ... | head`: the reader left; stop quietly.
            _silence_stdout()
            sys.exit(0)
        except OSError as e:
            # A write to stdout that no writer of ours turned into OutputError (`info > /dev/full`):
            # such errors carry no file name. Anything else is a bug worth its traceback.
            if debug or e.filename is not None or e.errno not in _WRITE_ERRNOS:
                raise
            _silence_stdout()
            click.echo(f"error: stdout: cannot write the output ({e.strerror})", err=True)
            sys.exit(1)

    return wrapper


def _silence_stdout() -> None:
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def model_options(fn):
    """Options shared by the commands that run the model."""
    opts = [
        click.option(
            "-m",
            "--model",
            envvar="GPTOSS_MLX_MODEL",
            default=None,
            metavar="MODEL",
            help="A converted folder, a Hugging Face-layout folder or a hub repo id "
            "(converted once into $GPTOSS_MLX_HOME). [default: openai/gpt-oss-20b; env "
            "GPTOSS_MLX_MODEL]",
        ),
        click.option(
            "-r",
            "--reasoning-effort",
            type=click.Choice(["low", "medium", "high"]),
            default="medium",
            show_default=True,
            help="How long the model thinks before answering.",
        ),
        click.option("--system", "system", default=None, help="Instructions for the model."),
        click.option(
            "--developer", default=None, help="Developer instructions (joined after --system)."
        ),
        click.option(
            "--tools",
            "tools_file",
            type=click.Path(dir_okay=False),
            default=None,
            help="JSON file of OpenAI function tools the model may call.",
        ),
        click.option(
            "-t",
            "--temp",
            type=float,
            default=1.0,
            show_default=True,
            help="Sampling temperature, 0 to 100; 0 is greedy, and so is anything below 1e-5.",
        ),
        click.option(
            "--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling."
        ),
        click.option(
            "--top-k",
            type=int,
            default=0,
            show_default=True,
            help="Keep the k likeliest (0, or k at least the vocabulary size: off).",
        ),
        click.option(
            "--min-p", type=float, default=0.0, show_default=True, help="Min-p sampling (0: off)."
        ),
        click.option(
            "--seed",
            type=int,
            default=None,
            help="Random seed for reproducible sampling, 0 to 2**64-1.",
        ),
        click.option(
            "-n",
            "--max-tokens",
            type=click.IntRange(min=1),
            default=4096,
            show_default=True,
            help="Most tokens to generate per turn (reasoning included).",
        ),
        click.option(
            "--max-context",
            type=click.IntRange(min=16),
            default=None,
            help="Most tokens in the context (prompt + answer). [default: the model's limit]",
        ),
        click.option(
            "-v", "--verbose", is_flag=True, help="Print speed and memory after each turn."
        ),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    from .sharded import shard_options

    return shard_options(fn)


def session_from_options(
    model,
    system,
    developer,
    tools_file,
    reasoning_effort,
    temp,
    top_p,
    top_k,
    min_p,
    seed,
    max_tokens,
    max_context,
    structured=None,
    cluster=None,
    **_,
):
    """Load the model and start a ChatSession from the shared options (`structured`: the
    StructuredSettings of cli/structured.py, if the command has those options; `cluster`: the
    ranks of a --shard run, see cli/sharded.py, whose other ranks then repeat its turns)."""
    from ..engine.chat import ChatSession
    from ..engine.generate import SamplingParams
    from .console import load_tools_file
    from .sharded import lead_session, open_model
    from .streams import check_text

    sampling = SamplingParams(temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    sampling.validate()
    system = check_text(system, "--system") if system else system
    developer = check_text(developer, "--developer") if developer else developer
    tools = load_tools_file(tools_file) if tools_file else []
    instructions = "\n\n".join(t for t in (system, developer) if t) or None
    mdl, tok, max_context = open_model(cluster, model, max_context)
    session = ChatSession(
        mdl,
        tok,
        reasoning_effort=reasoning_effort,
        instructions=instructions,
        tools=tools,
        sampling=sampling,
        max_tokens=max_tokens,
        max_context=max_context,
        **(structured.session_kwargs() if structured is not None else {}),
    )
    return lead_session(cluster, session)


class Group(click.Group):
    """The command group; Ctrl-C outside a command's own handling (parsing its options, between
    commands) is `interrupted` and exit 130 too, not click's `Aborted!` and exit 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            if ctx.params.get("debug"):
                raise
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=Group, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="gptoss-mlx")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def main(debug: bool) -> None:
    """Run OpenAI's gpt-oss-20b locally with MLX.

    \b
    Convert the Hugging Face checkpoint once:
      gptoss-mlx convert openai/gpt-oss-20b ~/models/gpt-oss-20b-mlx
    Chat with it:
      gptoss-mlx chat --model ~/models/gpt-oss-20b-mlx
    """
