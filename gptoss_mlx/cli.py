"""The `gptoss-mlx` command line. Thin: every command calls into the library."""

from __future__ import annotations

import functools
import sys

import click

from . import __version__
from .errors import GptOssError

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
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings=CONTEXT_SETTINGS)
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


if __name__ == "__main__":
    main()
