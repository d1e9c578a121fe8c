"""`gptoss-mlx convert`, `verify` and `info`: the commands about model folders."""

from __future__ import annotations

import click

from ..errors import GptOssError
from .main import CONTEXT_SETTINGS, handle_errors, main


@main.command(context_settings=CONTEXT_SETTINGS)
@click.argument("src")
@click.argument("out", type=click.Path(path_type=str))
@click.option(
    "-r",
    "--recipe",
    type=click.Choice(["mxfp4-q8", "mxfp4-q4", "mxfp4-bf16"]),
    default="mxfp4-q8",
    show_default=True,
    help="How to store the dense (non-expert) matrices; experts always stay MXFP4.",
)
@click.option(
    "--dtype",
    default="bfloat16",
    show_default=True,
    help="bfloat16 or float32, for unquantized tensors and quantization scales (float16 is refused).",
)
@click.option(
    "-f", "--force", is_flag=True, help="Replace OUT if it is an existing converted folder."
)
@click.option("--revision", help="Hub branch, tag or commit sha (hub repo ids only).")
@click.option(
    "--shard-size", default="5GB", show_default=True, help="Largest shard file, e.g. 2GB."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@handle_errors
def convert(
    src: str,
    out: str,
    recipe: str,
    dtype: str,
    force: bool,
    revision: str | None,
    shard_size: str,
    quiet: bool,
) -> None:
    """Convert a gpt-oss checkpoint into an MLX model folder at OUT.

    \b
    SRC is one of:
      - a Hugging Face repo id, openai/gpt-oss-20b or openai/gpt-oss-120b
        (downloads only the HF-layout files, ~13.8 GB or ~65 GB, into the
        Hugging Face cache; --revision pins it)
      - a local Hugging Face-layout folder (config.json, model*.safetensors)
      - OpenAI's original/ folder (config.json, model.safetensors), or a
        folder that holds only original/
    Nothing is unpickled: *.bin, *.pt and *.py files are ignored.

    \b
    Recipes (sizes on disk in bfloat16: gpt-oss-20b, gpt-oss-120b):
      mxfp4-q8    experts MXFP4 as released; embeddings, attention
                  and lm_head 8-bit affine (group 64)     ~12.1 GB  ~63.3 GB
      mxfp4-q4    the same with 4-bit affine              ~11.2 GB  ~62.2 GB
      mxfp4-bf16  lossless: all but experts as released   ~13.8 GB  ~65.2 GB
    The router, norms, sinks and biases are never quantized.

    \b
    OUT appears only when complete (written beside it, then renamed); an
    interrupted or failed conversion leaves nothing behind.

    \b
    Example:
      gptoss-mlx convert openai/gpt-oss-20b ~/models/gpt-oss-20b-mlx
      gptoss-mlx convert openai/gpt-oss-120b ~/models/gpt-oss-120b-mlx
      gptoss-mlx convert ./gpt-oss-20b ./gpt-oss-20b-mlx-q4 --recipe mxfp4-q4
    """
    from ..convert.convert import convert as run_convert
    from ..convert.convert import parse_size

    run_convert(
        src,
        out,
        recipe=recipe,
        dtype=dtype,
        force=force,
        revision=revision,
        progress=not quiet,
        shard_size=parse_size(shard_size),
    )


@main.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=str))
@handle_errors
def verify(folder: str) -> None:
    """Check a converted model FOLDER against its manifest (sizes and sha256 of every file).

    Exits 0 when the folder is intact, 1 and one line per problem otherwise. An MLX folder made
    by mlx-lm or another tool has no manifest: its shard headers and tensors are checked against
    its config.json, but not its files' contents.

    \b
    Example:
      gptoss-mlx verify ~/models/gpt-oss-20b-mlx
    """
    import sys
    from pathlib import Path

    from ..errors import UsageError
    from ..progress import is_tty, progress_bar
    from ..weights.loading import MANIFEST, read_manifest
    from ..weights.mlx_folder import inspect_mlx_folder, is_mlx_folder
    from ..weights.verify import verify_folder

    path = Path(folder).expanduser()
    folder = str(Path(folder))  # as typed, without a trailing "/": DIR/file, not DIR//file
    if not path.is_dir():
        raise UsageError(f"{folder}: no such folder")
    if not (path / MANIFEST).exists() and is_mlx_folder(path):
        # Made by mlx-lm or another tool: no manifest, so no sizes or hashes to check against.
        checked = inspect_mlx_folder(path)
        n = sum(len(h.tensors) for h in checked.headers.values())
        click.echo(
            f"{folder}: ok as far as it can be checked: an MLX folder made by mlx-lm or another "
            f"tool has no manifest, so the contents of its files are not checked (no sha256 to "
            f"compare with); its {len(checked.headers)} shard header(s) and {n} tensors (names, "
            "shapes, dtypes) agree with config.json"
        )
        return
    files = read_manifest(path)
    total = sum(int(m.get("size", 0)) for m in files.values())
    # The bar only on a terminal: a log or CI gets the result lines alone.
    with progress_bar(total, "verifying", in_bytes=True, enabled=is_tty(sys.stderr)) as bar:
        problems = verify_folder(path, progress=bar.update)
    for p in problems:
        click.echo(f"{folder}/{p}", err=True)
    if problems:
        raise GptOssError(f"{folder}: {len(problems)} problem(s); convert the model again")
    click.echo(f"{folder}: ok ({len(files)} files, {total / 1e9:.2f} GB)")


@main.command(context_settings=CONTEXT_SETTINGS)
@click.argument("model", required=False)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    multiple=True,
    help="Sequences decoded together (each holds its own KV cache); repeat for several "
    "columns of the table, e.g. --batch 1 --batch 8. [default: 1]",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@click.option(
    "--shard",
    type=click.Choice(["expert", "tensor", "pipeline"]),
    default=None,
    help="Also show what each rank of a sharded run needs (see chat --shard).",
)
@click.option(
    "--ranks",
    type=click.IntRange(min=2),
    default=2,
    show_default=True,
    help="With --shard: the number of ranks (machines).",
)
@handle_errors
def info(
    model: str | None, batch: tuple[int, ...], as_json: bool, shard: str | None, ranks: int
) -> None:
    """What MODEL is and the memory it needs, before or after downloading it.

    \b
    MODEL is anything --model accepts, nothing of which is downloaded but a
    config.json:
      - a hub repo id: openai/gpt-oss-20b and openai/gpt-oss-120b are sized
        from configs shipped with gptoss-mlx (offline); other repos, e.g.
        mlx-community conversions, from their config.json alone
      - a checkpoint folder not converted yet
      - a converted folder (ours or an MLX conversion made by mlx-lm), or a
        name `gptoss-mlx models` prints
    A checkpoint is sized in each recipe `gptoss-mlx convert` offers; a
    converted folder or an MLX conversion as it is stored.

    \b
    The table: weights + KV cache + working memory at 4k..128k tokens of
    context for each --batch, whether it fits this device, and whether it fits
    a Mac with 16..128 GB: "+" within macOS's default GPU limit, "w" once the
    wired limit is raised (sudo sysctl iogpu.wired_limit_mb=N), "-" not at all.

    \b
    Examples:
      gptoss-mlx info openai/gpt-oss-120b
      gptoss-mlx info mlx-community/gpt-oss-20b-MXFP4-Q8 --batch 1 --batch 4
      gptoss-mlx info ~/models/gpt-oss-20b-mlx --json
      gptoss-mlx info openai/gpt-oss-120b --shard expert --ranks 2   # two Macs
    """
    import json

    import mlx.core as mx

    from ..engine.memory_table import locate, table_for
    from ..model.cpu_streams import THREADS_ENV, default_threads
    from .memory_view import config_lines, folder_json, folder_lines, table_lines

    threads = default_threads()  # a bad GPTOSS_MLX_THREADS: one line before any output
    batches = batch or (1,)
    target = locate(model)
    table = table_for(target, batches)
    sharded = None
    if shard is not None:
        from .shard_view import shard_figures, shard_lines

        sharded = shard_figures(target, shard, ranks, max(batches))
    if as_json:
        out = table.to_json()
        if target.folder is not None:
            out["folder"] = folder_json(target.folder)
        if sharded is not None:
            out["sharded"] = sharded
        click.echo(json.dumps(out, indent=2))
        return
    lines = folder_lines(target.folder) if target.folder else config_lines(target)
    for line in lines:
        click.echo(line)
    split = ""
    if mx.default_device() == mx.cpu:
        split = f"; matmuls split across {threads} CPU threads ({THREADS_ENV})"
    for line in table_lines(table, split):
        click.echo(line)
    if target.folder is not None:
        for b in batches:
            fits = [r.context for r in table.rows if r.batch == b and r.fits_here]
            where = f" (--batch {b})" if len(batches) > 1 else ""
            click.echo(
                f"default --max-context here{where}: {max(fits) if fits else 'none fits (see above)'}"
            )
    for line in shard_lines(sharded) if sharded is not None else ():
        click.echo(line)
