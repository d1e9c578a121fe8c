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
      - a Hugging Face repo id, e.g. openai/gpt-oss-20b (downloads only the
        HF-layout files, ~13.8 GB, into the Hugging Face cache; --revision pins it)
      - a local Hugging Face-layout folder (config.json, model*.safetensors)
      - OpenAI's original/ folder (config.json, model.safetensors), or a
        folder that holds only original/
    Nothing is unpickled: *.bin, *.pt and *.py files are ignored.

    \b
    Recipes (sizes on disk for gpt-oss-20b, bfloat16):
      mxfp4-q8    experts MXFP4 as released; embeddings, attention and lm_head
                  8-bit affine (group 64)                        ~12.1 GB
      mxfp4-q4    the same with 4-bit affine                     ~11.2 GB
      mxfp4-bf16  lossless: everything except experts as released ~13.8 GB
    The router, norms, sinks and biases are never quantized.

    \b
    OUT appears only when complete (written beside it, then renamed); an
    interrupted or failed conversion leaves nothing behind.

    \b
    Example:
      gptoss-mlx convert openai/gpt-oss-20b ~/models/gpt-oss-20b-mlx
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

    Exits 0 when the folder is intact, 1 and one line per problem otherwise.

    \b
    Example:
      gptoss-mlx verify ~/models/gpt-oss-20b-mlx
    """
    from pathlib import Path

    from ..progress import progress_bar
    from ..weights.loading import read_manifest
    from ..weights.verify import verify_folder

    files = read_manifest(Path(folder).expanduser())
    total = sum(int(m.get("size", 0)) for m in files.values())
    with progress_bar(total, "verifying", in_bytes=True) as bar:
        problems = verify_folder(folder, progress=bar.update)
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
    default=1,
    show_default=True,
    help="Sequences decoded together (KV cache per sequence).",
)
@handle_errors
def info(model: str | None, batch: int) -> None:
    """Show a converted MODEL's recipe and size, and the memory it needs at 1k-128k context.

    MODEL is a converted folder or anything --model accepts that is already in the cache.

    \b
    Example:
      gptoss-mlx info ~/models/gpt-oss-20b-mlx
    """
    from pathlib import Path

    import mlx.core as mx

    from gptoss_mlx.convert.resolve import DEFAULT_MODEL, cache_path, is_converted

    from ..engine.memory import describe, plan_memory
    from ..errors import UsageError
    from ..model.cpu_streams import THREADS_ENV, default_threads
    from ..weights.loading import default_dtype, inspect_folder

    spec = model or DEFAULT_MODEL
    folder = Path(spec).expanduser()
    if not is_converted(folder):
        folder = cache_path(spec)
        if not is_converted(folder):
            raise UsageError(
                f"{spec}: not a converted model and not in the cache; convert it first "
                "(gptoss-mlx convert SRC OUT) or run `gptoss-mlx chat -m SRC` once"
            )
    checked = inspect_folder(folder)  # manifest, sizes, config, headers: one line if broken
    files, raw, cfg = checked.files, checked.raw_config, checked.config
    ours = raw["gptoss_mlx"]
    src = ours.get("source") if isinstance(ours.get("source"), dict) else {}
    dtype = default_dtype()
    plan = plan_memory(folder, cfg, dtype)
    size = sum(int(m["size"]) for m in files.values())
    click.echo(f"model:      {folder}")
    click.echo(
        f"source:     {src.get('id')} ({src.get('layout')} layout, revision {src.get('revision')})"
    )
    click.echo(f"recipe:     {ours.get('recipe')} (unquantized tensors in {ours.get('dtype')})")
    click.echo(f"on disk:    {size / 1e9:.2f} GB in {len(files)} files")
    click.echo(
        f"model:      {cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts "
        f"(top {cfg.num_experts_per_tok}), {cfg.max_position_embeddings} positions"
    )
    threads = ""
    if mx.default_device() == mx.cpu:
        threads = f"; matmuls split across {default_threads()} CPU threads ({THREADS_ENV})"
    click.echo(
        f"device:     {plan.budget / 1e9:.1f} GB usable ({plan.budget_source}); activations in "
        f"{str(dtype).rsplit('.', 1)[-1]}{threads}"
    )
    click.echo("memory needed:")
    for ctx in (1024, 8192, 32768, 131072):
        mark = "fits" if plan.fits(ctx, batch) else "does not fit"
        click.echo(f"  {ctx // 1024:>4}k context: {describe(plan, ctx, batch)}  [{mark}]")
    best = plan.largest_context(batch, cfg.max_position_embeddings)
    click.echo(f"default --max-context here: {best if best else 'none fits (see above)'}")
