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
        except BrokenPipeError:
            # `gptoss-mlx generate ... | head`: the reader left; stop quietly.
            _silence_stdout()
            sys.exit(0)

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
            help="Sampling temperature; 0 is greedy.",
        ),
        click.option(
            "--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling."
        ),
        click.option(
            "--top-k", type=int, default=0, show_default=True, help="Keep the k likeliest (0: off)."
        ),
        click.option(
            "--min-p", type=float, default=0.0, show_default=True, help="Min-p sampling (0: off)."
        ),
        click.option(
            "--seed", type=int, default=None, help="Random seed for reproducible sampling."
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
    return fn


def _session(
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
    **_,
):
    """Load the model and start a ChatSession from the shared options."""
    from gptoss_mlx.convert.resolve import resolve_model

    from .chat import ChatSession
    from .console import load_tools_file
    from .generate import SamplingParams
    from .loading import load_for_inference

    sampling = SamplingParams(temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    sampling.validate()
    tools = load_tools_file(tools_file) if tools_file else []
    instructions = "\n\n".join(t for t in (system, developer) if t) or None
    path = resolve_model(model)
    mdl, tok, max_context = load_for_inference(path, max_context)
    return ChatSession(
        mdl,
        tok,
        reasoning_effort=reasoning_effort,
        instructions=instructions,
        tools=tools,
        sampling=sampling,
        max_tokens=max_tokens,
        max_context=max_context,
    )


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

    from .loading import read_manifest
    from .verify import verify_folder

    files = read_manifest(Path(folder).expanduser())
    total = sum(int(m.get("size", 0)) for m in files.values())
    with click.progressbar(length=total, label="verifying", file=sys.stderr) as bar:
        problems = verify_folder(folder, progress=bar.update)
    for p in problems:
        click.echo(f"{folder}/{p}", err=True)
    if problems:
        raise GptOssError(f"{folder}: {len(problems)} problem(s); convert the model again")
    click.echo(f"{folder}: ok ({len(files)} files, {total / 1e9:.2f} GB)")


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
    from .convert.convert import convert as run_convert
    from .convert.convert import parse_size

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

    from .chat_request import load_chat_request
    from .harmony import render_prompt, render_text
    from .tokenizer import load_default_tokenizer, load_tokenizer

    name = getattr(request_file, "name", "<stdin>")
    name = "stdin" if name in ("<stdin>", "-") else name
    request = load_chat_request(request_file.read(), source=name)
    if not ids:
        click.echo(render_text(request, date=date))
        return
    tokenizer = load_tokenizer(model) if model else load_default_tokenizer()
    click.echo(json.dumps(render_prompt(request, tokenizer, date=date)))


@main.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "-p", "--prompt", "prompt_text", default=None, help="The prompt (default: read stdin)."
)
@model_options
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

    Exit status: 0 ok, 2 bad usage or input, 1 runtime failure.
    """
    import json as _json

    from .errors import UsageError

    if prompt_text is None:
        if sys.stdin.isatty():
            raise UsageError("no prompt: pass -p TEXT or pipe the prompt on stdin")
        prompt_text = sys.stdin.read()
    if not prompt_text.strip():
        raise UsageError("the prompt is empty")
    session = _session(**opts)
    if raw:
        from .generate import GenerationStats, generate_tokens
        from .tokenizer import StreamingDetokenizer

        tok = session.tokenizer
        stats = GenerationStats()
        detok = StreamingDetokenizer(tok)
        pieces = []
        eos = (tok.special("<|endoftext|>"), tok.return_)
        for t in generate_tokens(
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
                click.echo(piece, nl=False)
        pieces.append(detok.flush())
        text = "".join(pieces)
        if as_json:
            click.echo(
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
            click.echo(pieces[-1])
        if verbose:
            click.echo(stats.summary(), err=True)
        return
    from .console import TurnPrinter
    from .generate import ContextLimitError

    printer = TurnPrinter(show_reasoning=show_reasoning)
    try:
        result = session.send(prompt_text, None if as_json else printer)
    except ContextLimitError as e:
        # The prompt alone fills the context: finish like a turn that ran out of room.
        click.echo(f"error: {e}", err=True)
        if as_json:
            empty = {"final": "", "reasoning": "", "tool_calls": [], "finish_reason": "length"}
            click.echo(
                _json.dumps({**empty, "usage": {"prompt_tokens": 0, "completion_tokens": 0}})
            )
        return
    if as_json:
        click.echo(_json.dumps(result.to_json(), ensure_ascii=False))
    else:
        printer.end()
        if result.finish_reason == "length":
            click.echo("[stopped: max tokens or context limit reached]", err=True)
    if verbose:
        click.echo(result.stats.summary(), err=True)


@main.command(context_settings=CONTEXT_SETTINGS)
@model_options
@click.option("--hide-reasoning", is_flag=True, help="Do not show the model's reasoning.")
@handle_errors
def chat(hide_reasoning: bool, verbose: bool, **opts) -> None:
    """Chat with gpt-oss in the terminal (harmony format, streaming).

    The reasoning streams dim, the answer plain. Type /help inside for commands
    (/effort, /system, /reset, /save, /load, /stats, /quit). With stdin not a terminal,
    each input line is one user message.

    \b
    Examples:
      gptoss-mlx chat                      # openai/gpt-oss-20b, converted on first use
      gptoss-mlx chat -m ~/models/gpt-oss-20b-mlx -r high
      gptoss-mlx chat --tools tools.json --system "Answer in French."
    """
    from .repl import ChatLoop

    session = _session(**opts)
    ChatLoop(session, show_reasoning=not hide_reasoning, verbose=verbose).run()


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
    "top_p", "top_k", "min_p", "seed" (the options below are the defaults).
    Each record: {"id", "line", "final", "reasoning", "tool_calls",
    "finish_reason", "usage"}, or {"id", "line", "error"} for a line that
    could not run. Records are written as each prompt finishes, so an
    interrupted run keeps them; --resume finishes it.

    \b
    Examples:
      gptoss-mlx batch prompts.jsonl -o results.jsonl -r low -n 2048
      gptoss-mlx batch prompts.jsonl -o results.jsonl --resume
      cut -f2 questions.tsv | gptoss-mlx batch --text - -t 0 > answers.jsonl

    Exit status: 0 every line ok, 1 some lines failed, 2 bad usage, 130 interrupted.
    """
    from gptoss_mlx.convert.resolve import resolve_model

    from .batch import BatchDefaults, BatchJob, run_batch_file
    from .batch_io import open_input, plan_output
    from .console import load_tools_file
    from .generate import SamplingParams
    from .harmony import check_date
    from .loading import load_for_inference

    tools_file, system, developer = opts["tools_file"], opts["system"], opts["developer"]
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
    )
    # Every usage problem is reported before the model loads and before OUT is touched.
    defaults.validate()
    date = check_date(date)
    if input_file != "-":
        open_input(input_file).close()
    plan = plan_output(output, overwrite=overwrite, resume=resume, input_path=input_file)
    model, tokenizer, max_context = load_for_inference(
        resolve_model(opts["model"]), opts["max_context"], batch=batch_size
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
    summary = run_batch_file(job, input_file, plan, progress=progress, quiet=quiet)
    if verbose:
        click.echo(job.engine.stats.summary(), err=True)
    if fail_fast and summary.errors:
        raise GptOssError(f"stopped at the first failed line (--fail-fast): {summary.first_error}")
    if summary.errors:
        raise GptOssError(f"{summary.errors} of {summary.records} lines failed (see their records)")


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

    from .errors import UsageError
    from .loading import default_dtype, inspect_folder
    from .memory import describe, plan_memory
    from .sharding import THREADS_ENV, default_threads

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

    from .bench import format_report, run_bench

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


if __name__ == "__main__":
    main()
