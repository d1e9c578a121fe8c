"""`gptoss-mlx models`: the gpt-oss models this machine has, and `models rm` for ours.

The finding and the removing live in convert/local_models.py; this module only prints and asks.
"""

from __future__ import annotations

import click

from ..errors import GptOssError
from .main import CONTEXT_SETTINGS, handle_errors, main

_KIND = {
    "converted": "converted by gptoss-mlx",
    "mlx": "MLX conversion, used as it is",
    "checkpoint": "checkpoint, converted on first use",
}
_SOURCE = {
    "gptoss-mlx": "$GPTOSS_MLX_HOME",
    "hf-cache": "Hugging Face cache",
    "lm-studio": "LM Studio",
}


@main.group(context_settings=CONTEXT_SETTINGS, invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@click.pass_context
@handle_errors
def models(ctx: click.Context, as_json: bool) -> None:
    """List the gpt-oss models on this machine; every NAME works with --model.

    \b
    Looks in three places (`models rm` only ever removes from the first):
      - $GPTOSS_MLX_HOME/models: folders gptoss-mlx converted (NAME: the folder)
      - the Hugging Face cache: gpt-oss repos, checkpoints (converted on first
        use) or MLX conversions such as mlx-community's (used as they are)
      - LM Studio's models folders (~/.lmstudio/models, ~/.cache/lm-studio/models;
        $GPTOSS_MLX_LMSTUDIO_MODELS replaces them): its MLX downloads of gpt-oss
    Each line: NAME, size on disk, what it is, how it is quantized, and where.

    \b
    Examples:
      gptoss-mlx models
      gptoss-mlx chat -m mlx-community/gpt-oss-20b-MXFP4-Q8
      gptoss-mlx models rm openai--gpt-oss-20b-mxfp4-q8
    """
    if ctx.invoked_subcommand is not None:
        return
    import json

    from ..convert.local_models import list_models, lmstudio_dirs, models_dir

    found = list_models()
    if as_json:
        keys = ("name", "source", "kind", "quantization", "size", "layers", "note")
        rows = [
            {**{k: getattr(m, k) for k in keys}, "complete": m.complete, "path": str(m.path)}
            for m in found
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    if not found:
        places = [str(models_dir()), "the Hugging Face cache", *map(str, lmstudio_dirs())]
        click.echo(f"no gpt-oss models found (looked in {', '.join(places)})")
        return
    width = max(len(m.name) for m in found)
    for m in found:
        note = f" [{m.note}]" if m.note else ""
        click.echo(
            f"{m.name:<{width}}  {m.size / 1e9:7.2f} GB  {_KIND[m.kind]} ({_SOURCE[m.source]})"
            f"{note}"
        )
        click.echo(f"{'':<{width}}  {m.quantization}")
        click.echo(f"{'':<{width}}  {m.path}")
    click.echo("Use a NAME with --model; `gptoss-mlx models rm NAME` removes one of gptoss-mlx's.")


@models.command("rm", context_settings=CONTEXT_SETTINGS)
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Remove without asking.")
@handle_errors
def rm(name: str, yes: bool) -> None:
    """Remove NAME, a folder gptoss-mlx converted into $GPTOSS_MLX_HOME/models.

    Asks first (on stdin) unless --yes. Only folders that gptoss-mlx's converter provably wrote
    are removed; the Hugging Face cache and LM Studio's folders are never touched.

    \b
    Example:
      gptoss-mlx models rm openai--gpt-oss-20b-mxfp4-q8 --yes
    """
    from ..convert.local_models import removal_target, remove

    folder = removal_target(name)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    if not yes and not click.confirm(
        f"Remove {folder} ({size / 1e9:.2f} GB)?", default=False, err=True
    ):
        raise GptOssError(f"{name}: not removed")
    remove(folder)
    click.echo(f"removed {folder}")
