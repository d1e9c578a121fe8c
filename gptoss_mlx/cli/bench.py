"""`gptoss-mlx bench`: prefill/decode speed, time to first token, memory, host time."""

from __future__ import annotations

import click

from .main import CONTEXT_SETTINGS, handle_errors, main


@main.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "-m",
    "--model",
    "model_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="A converted model folder.",
)
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option(
    "--gen-tokens",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Decode steps after the first token.",
)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16"]),
    default="auto",
    show_default=True,
    help="Activation dtype (auto: float32 on MLX's CPU backend, bfloat16 on a GPU).",
)
@click.option(
    "--prefill-chunk", type=click.IntRange(min=1), default=None, help="Prompt tokens per pass."
)
@click.option(
    "--compare-mlx-lm",
    "compare_src",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    metavar="SRC",
    help="Also run mlx-lm's gpt_oss on SRC, the Hugging Face folder MODEL was converted from.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@handle_errors
def bench(
    model_dir: str,
    prompt_tokens: int,
    gen_tokens: int,
    batch: int,
    runs: int,
    dtype: str,
    prefill_chunk: int | None,
    compare_src: str | None,
    as_json: bool,
) -> None:
    """Measure prefill and decode speed, time to first token, peak memory and host time per step.

    The prompt is random token ids. With --compare-mlx-lm, mlx-lm's own model runs on the same
    source weights in this process, alternating with ours run by run, and the ratios are printed.
    On MLX's CPU backend our matmuls are spread over GPTOSS_MLX_THREADS streams (default: one per
    core); set it to 1 to measure a single core. docs/PERFORMANCE.md explains every figure.

    \b
    Example:
      gptoss-mlx bench -m ~/models/gpt-oss-20b-mlx --prompt-tokens 512 --gen-tokens 128
      GPTOSS_MLX_THREADS=1 gptoss-mlx bench -m ~/models/gpt-oss-20b-mlx
    """
    import json

    import mlx.core as mx

    from ..engine.bench import format_report, run_bench

    report = run_bench(
        model_dir,
        prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens,
        batch=batch,
        runs=runs,
        compare_src=compare_src,
        dtype=None if dtype == "auto" else getattr(mx, dtype),
        prefill_chunk=prefill_chunk,
        progress=None if as_json else lambda line: click.echo(line, err=True),
    )
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))
