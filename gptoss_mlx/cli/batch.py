"""`gptoss-mlx batch`: JSONL prompts in, JSONL records out (the job is in batch_job.py)."""

from __future__ import annotations

import click

from ..errors import GptOssError
from .main import CONTEXT_SETTINGS, handle_errors, main, model_options
from .structured import structured_from_options, structured_options


@main.command(context_settings=CONTEXT_SETTINGS)
@click.argument("input_file", metavar="FILE|-")
@click.option(
    "-o", "--output", default="-", metavar="OUT", help="Write the records to OUT. [default: stdout]"
)
@click.option(
    "-b",
    "--batch-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Prompts decoded together.",
)
@click.option("--text", "text_lines", is_flag=True, help="Each line is a plain prompt, not JSON.")
@click.option(
    "--resume", is_flag=True, help="Finish OUT: skip ids done there, retry lines that failed."
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first line that fails.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar on stderr. [default: when stderr is a terminal]",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.option(
    "--date", default=None, help="Current date for every prompt, YYYY-MM-DD. [default: today]"
)
@model_options
@structured_options
@handle_errors
def batch(
    input_file: str,
    output: str,
    batch_size: int,
    text_lines: bool,
    resume: bool,
    overwrite: bool,
    fail_fast: bool,
    progress: bool | None,
    quiet: bool,
    date: str | None,
    verbose: bool,
    **opts,
) -> None:
    """Run many prompts from a JSONL FILE (- reads stdin); one JSON record per line out.

    \b
    Each line: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]},
    optionally with "tools", "reasoning_effort", "max_tokens", "temperature",
    "top_p", "top_k", "min_p", "seed", "response_format", "tool_choice",
    "max_reasoning_tokens" (the options below are the defaults).
    Each record: {"id", "line", "final", "reasoning", "tool_calls",
    "finish_reason", "usage"}, or {"id", "line", "error"} for a line that
    could not run. Records are written as each prompt finishes, so an
    interrupted run keeps them; --resume finishes it.

    \b
    Examples:
      gptoss-mlx batch prompts.jsonl -o results.jsonl -r low -n 2048
      gptoss-mlx batch prompts.jsonl -o results.jsonl --resume
      cut -f2 questions.tsv | gptoss-mlx batch --text - -t 0 > answers.jsonl

    -b is the most prompts decoding together; with a FILE it is capped at
    its number of lines, and memory (the KV cache per sequence) is planned
    for that many.

    Exit status: 0 every line ok, 1 some lines failed, 2 bad usage, 130
    interrupted (Ctrl-C, SIGTERM, or stdout closed by its reader, as in
    `| head`: --resume then needs -o FILE). A write that fails (a full
    disk) exits 1, keeping what was written; --resume finishes it.
    """
    from ..engine.generate import SamplingParams
    from ..harmony.render import check_date
    from .batch_files import count_lines, open_input, plan_output
    from .batch_job import BatchDefaults, BatchJob, run_batch_file
    from .console import load_tools_file
    from .sharded import follow, join_cluster, lead_batch, open_model, refuse_piped_stdin
    from .streams import require_stdout

    cluster = join_cluster(opts)  # first, before anything runs MLX (--shard: cli/sharded.py)
    if cluster is not None and not cluster.leader:
        return follow(cluster)  # rank 0 reads the input and writes the records
    tools_file, system, developer = opts["tools_file"], opts["system"], opts["developer"]
    structured = structured_from_options(opts)
    defaults = BatchDefaults(
        reasoning_effort=opts["reasoning_effort"],
        instructions="\n\n".join(t for t in (system, developer) if t) or None,
        tools=load_tools_file(tools_file) if tools_file else [],
        sampling=SamplingParams(
            temperature=opts["temp"],
            top_p=opts["top_p"],
            top_k=opts["top_k"],
            min_p=opts["min_p"],
            seed=opts["seed"],
        ),
        max_tokens=opts["max_tokens"],
        text=text_lines,
        **structured.session_kwargs(),
    )
    # Every usage problem is reported before the model loads and before OUT is touched.
    defaults.validate()
    date = check_date(date)
    if input_file == "-":
        refuse_piped_stdin(cluster, "the input", "pass a FILE")
    else:
        open_input(input_file).close()
    lines = count_lines(input_file)
    if lines is not None:
        # No more sequences decode together than there are lines: memory is planned for these.
        batch_size = max(1, min(batch_size, lines))
    plan = plan_output(output, overwrite=overwrite, resume=resume, input_path=input_file)
    if plan.path is None:
        require_stdout()
    model, tokenizer, max_context = open_model(
        cluster, opts["model"], opts["max_context"], batch=batch_size
    )
    job = BatchJob(
        model,
        tokenizer,
        defaults=defaults,
        batch_size=batch_size,
        max_context=max_context,
        date=date,
        fail_fast=fail_fast,
    )
    lead_batch(cluster, job)  # --shard: the other ranks run the same lines
    summary = run_batch_file(job, input_file, plan, progress=progress, quiet=quiet)
    if verbose:
        click.echo(job.engine.stats.summary(), err=True)
    if fail_fast and summary.errors:
        raise GptOssError(f"stopped at the first failed line (--fail-fast): {summary.first_error}")
    if summary.errors:
        raise GptOssError(f"{summary.errors} of {summary.records} lines failed (see their records)")
