"""Measure prefill, decode, time to first token, peak memory and host time per decode step.

One *run* = a fresh cache, the prompt prefilled (time to first token: prefill plus sampling the
first token), then `gen_tokens` decode steps pipelined with `mx.async_eval` as the generation engine
runs them, then a short probe of `HOST_PROBE_STEPS` synchronous steps in which the time Python
spends building a step's graph (model call + sampler, nothing evaluated) is timed apart from
evaluating it. That host time is the Python thread's CPU time (`time.thread_time`): on a shared
machine the wall clock also counts the time other processes held the core, which is not ours
(the wall-clock figure is kept too, as `host_wall_ms`).

Several engines (ours, mlx-lm's gpt_oss, or variants of ours) are measured in alternation, run after
run, so that drift in a shared machine's load hits them alike; ratios against a baseline engine are
taken per pair of adjacent runs and their median reported.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..errors import CheckpointError, UsageError
from ..model.compiled_decode import PlainDecoder, start_decoder
from ..model.cpu_streams import threads_of
from . import generate

# Synchronous decode steps per run whose graph building is timed apart from evaluation (16: the
# host time is small and noisy on a shared machine; 8 left pairs of runs from 0.36x to 0.56x).
HOST_PROBE_STEPS = 16
# The warm-up run of each engine before measuring (first calls allocate buffers, build kernels).
WARMUP_PROMPT, WARMUP_GEN = 16, 2
# mlx-lm's generate_step default: prompt tokens per forward pass.
MLX_LM_PREFILL_STEP = 2048

OURS, MLX_LM = "gptoss-mlx", "mlx-lm"


@dataclass
class Engine:
    """What the harness needs from a model: its caches, a prefill and a decoder.

    prefill(ids [B, T], cache) -> logits [B, vocab] of the last position (lazy);
    start(cache) -> a decoder with `compiled_decode`'s interface: step(y [B]) -> logits
    [B, vocab] of the next position (lazy), and finish().
    `context` is entered around each run, e.g. to set a module-level knob.
    """

    name: str
    make_cache: Callable[[], list[Any]]
    prefill: Callable[[mx.array, list[Any]], mx.array]
    start: Callable[[list[Any]], Any]
    weight_bytes: int
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclass
class RunResult:
    """The figures of one run. Tokens/s count tokens across the whole batch."""

    ttft_s: float
    prefill_tps: float
    decode_tps: float
    host_ms: float  # median graph-building CPU time of a decode step (model call + sampler)
    eval_ms: float  # median evaluation time of a decode step in the synchronous probe
    peak_memory_bytes: int  # the engine's weights + this run's own peak allocations
    host_wall_ms: float  # host_ms by the wall clock


METRICS = list(RunResult.__dataclass_fields__)


@dataclass
class BenchReport:
    """All runs of all engines, plus what was measured on what. Ratios are engine / baseline."""

    setup: dict[str, Any]
    runs: dict[str, list[RunResult]] = field(default_factory=dict)
    baseline: str | None = None

    def median(self, engine: str) -> dict[str, float]:
        """Median of each metric over an engine's runs."""
        return {m: statistics.median(getattr(r, m) for r in self.runs[engine]) for m in METRICS}

    def ratios(self, num: str, den: str) -> dict[str, float]:
        """Median over run pairs of num/den for each metric (pairs are adjacent in time)."""
        out = {}
        for m in METRICS:
            pairs = [
                getattr(a, m) / getattr(b, m)
                for a, b in zip(self.runs[num], self.runs[den], strict=True)
                if getattr(b, m)
            ]
            out[m] = statistics.median(pairs) if pairs else float("nan")
        return out

    def all_ratios(self) -> dict[str, dict[str, float]]:
        """{"engine/baseline": ratios} for every engine but the baseline."""
        if self.baseline is None:
            return {}
        return {
            f"{n}/{self.baseline}": self.ratios(n, self.baseline)
            for n in self.runs
            if n != self.baseline
        }

    def to_dict(self) -> dict[str, Any]:
        engines = {
            name: {"median": self.median(name), "runs": [asdict(r) for r in rs]}
            for name, rs in self.runs.items()
        }
        return {"setup": self.setup, "engines": engines, "ratios": self.all_ratios()}


# --- engines -------------------------------------------------------------------------------------


def weight_bytes(model: Any) -> int:
    """Bytes of a model's parameters as held in memory."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def ours_engine(
    model: Any,
    name: str = OURS,
    prefill_chunk: int | None = None,
    compiled: bool | None = None,
    context: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> Engine:
    """Our model through the generation engine's own prefill and decoder; by default with the
    engine's settings (generate.default_prefill_chunk(), generate.COMPILE_DECODE), read at each
    run."""

    def prefill(ids: mx.array, cache: list[Any]) -> mx.array:
        return generate.prefill_ids(model, ids, cache, prefill_chunk)

    def start(cache: list[Any]) -> Any:
        on = generate.COMPILE_DECODE if compiled is None else compiled
        return start_decoder(model, cache, on)

    return Engine(
        name,
        model.make_cache,
        prefill,
        start,
        weight_bytes(model),
        context or contextlib.nullcontext,
    )


def mlx_lm_engine(model: Any, name: str = MLX_LM) -> Engine:
    """mlx-lm's model, driven the way its `generate_step` drives it: the prompt but its last
    token in chunks of 2048 whose caches are evaluated (the logits are never computed), then the
    last token through the whole model; decode steps uncompiled, as mlx-lm runs them."""
    from mlx_lm.models.cache import make_prompt_cache

    def prefill(ids: mx.array, cache: list[Any]) -> mx.array:
        T = ids.shape[1]
        start = 0
        while T - start > 1:
            n = min(MLX_LM_PREFILL_STEP, T - start - 1)
            model(ids[:, start : start + n], cache=cache)
            mx.eval([c.state for c in cache])
            start += n
            mx.clear_cache()
        return model(ids[:, start:], cache=cache)[:, -1]

    return Engine(
        name,
        lambda: make_prompt_cache(model),
        prefill,
        lambda cache: PlainDecoder(model, cache),
        weight_bytes(model),
    )


def load_mlx_lm(src: str | Path) -> Any:
    """mlx-lm's gpt_oss model on a Hugging Face-layout folder, as mlx-lm loads it (bf16)."""
    from mlx_lm.utils import load_model

    folder = Path(src).expanduser()
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder}: not a Hugging Face-layout folder (no config.json)")
    try:
        model, _ = load_model(folder)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{folder}: mlx-lm cannot load it ({e})") from None
    return model


# --- measuring -----------------------------------------------------------------------------------


def random_prompt(vocab_size: int, batch: int, length: int, seed: int = 0) -> mx.array:
    """Random ordinary ids [batch, length] (below the special tokens, if the vocab has them)."""
    high = min(vocab_size, 199998)
    rng = np.random.default_rng(seed)
    return mx.array(rng.integers(0, high, size=(batch, length)), dtype=mx.uint32)


def make_sample(seed: int = 0) -> Callable[[mx.array], mx.array]:
    """Logits [B, vocab] -> ids [B], with OpenAI's recommended settings (T=1, top-p=1)."""
    sampler = generate.SamplingParams(seed=seed).sampler()

    def sample(logits: mx.array) -> mx.array:
        return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    return sample


def measure_run(
    engine: Engine,
    ids: mx.array,
    gen_tokens: int,
    sample: Callable[[mx.array], mx.array],
    host_steps: int = HOST_PROBE_STEPS,
) -> RunResult:
    """One run of `engine` on prompt `ids` [B, T]: prefill, `gen_tokens` pipelined decode
    steps, then `host_steps` synchronous ones."""
    B, T = ids.shape
    with engine.context():
        cache = engine.make_cache()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()

        t0 = time.perf_counter()
        y = sample(engine.prefill(ids, cache))
        mx.eval(y)
        ttft = time.perf_counter() - t0

        # As generate.generate_tokens does: launch step i+1, then hand out token i.
        t1 = time.perf_counter()
        decoder = engine.start(cache)
        for _ in range(gen_tokens):
            nxt = sample(decoder.step(y))
            mx.async_eval(nxt)
            y.tolist()
            y = nxt
        y.tolist()
        decode = time.perf_counter() - t1

        host, wall, evals = [], [], []
        for _ in range(host_steps):
            a, a_cpu = time.perf_counter(), time.thread_time()
            nxt = sample(decoder.step(y))
            b, b_cpu = time.perf_counter(), time.thread_time()
            mx.eval(nxt)
            host.append(b_cpu - a_cpu)
            wall.append(b - a)
            evals.append(time.perf_counter() - b)
            y = nxt
        decoder.finish()
        peak = mx.get_peak_memory() - base + engine.weight_bytes
    del cache, decoder
    return RunResult(
        ttft_s=ttft,
        prefill_tps=B * T / ttft,
        decode_tps=B * gen_tokens / decode,
        host_ms=1e3 * statistics.median(host) if host else float("nan"),
        eval_ms=1e3 * statistics.median(evals) if evals else float("nan"),
        peak_memory_bytes=int(peak),
        host_wall_ms=1e3 * statistics.median(wall) if wall else float("nan"),
    )


def compare(
    engines: Sequence[Engine],
    ids: mx.array,
    gen_tokens: int,
    runs: int,
    setup: dict[str, Any] | None = None,
    baseline: str | None = None,
    warmup: bool = True,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Measure `engines` in alternation (A, B, A, B, ...) for `runs` rounds on the same prompt."""
    if gen_tokens < 1 or runs < 1:
        raise UsageError("gen_tokens and runs must be at least 1")
    if len({e.name for e in engines}) != len(engines):
        raise UsageError("engine names must differ")
    report = BenchReport(setup=dict(setup or {}), baseline=baseline)
    report.runs = {e.name: [] for e in engines}
    sample = make_sample(seed)
    if warmup:
        small = ids[:, : min(WARMUP_PROMPT, ids.shape[1])]
        for e in engines:
            measure_run(e, small, WARMUP_GEN, sample, host_steps=1)
    for i in range(runs):
        for e in engines:
            mx.random.seed(seed + i)  # the same sampling noise for every engine in a round
            r = measure_run(e, ids, gen_tokens, sample)
            report.runs[e.name].append(r)
            if progress:
                progress(
                    f"run {i + 1}/{runs} {e.name}: prefill {r.prefill_tps:.1f} tok/s, "
                    f"decode {r.decode_tps:.2f} tok/s, host {r.host_ms:.2f} ms/step"
                )
    return report


# --- the `gptoss-mlx bench` command --------------------------------------------------------------


def describe_model(folder: Path, model: Any) -> dict[str, Any]:
    """What a figure was measured on: the model's shape, recipe, dtype, device and versions."""
    import mlx_lm

    cfg = model.config
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        ours = raw.get("gptoss_mlx", {}) if isinstance(raw, dict) else {}
    except (OSError, ValueError):
        ours = {}
    return {
        "model": str(folder),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "experts": cfg.num_local_experts,
        "vocab_size": cfg.vocab_size,
        "recipe": ours.get("recipe"),
        "stored_dtype": ours.get("dtype"),
        "activation_dtype": str(model.dtype).removeprefix("mlx.core."),
        "device": str(mx.default_device()),
        "cpu_threads": threads_of(model),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "prefill_chunk": generate.default_prefill_chunk(),
        "compiled_decode": generate.COMPILE_DECODE,
    }


def run_bench(
    model_dir: str | Path,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    batch: int = 1,
    runs: int = 3,
    compare_src: str | Path | None = None,
    dtype: mx.Dtype | None = None,
    prefill_chunk: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """`gptoss-mlx bench`: load the converted model (and mlx-lm's on `compare_src`), measure."""
    from ..weights.loading import load_model

    if min(prompt_tokens, gen_tokens, batch, runs) < 1:
        raise UsageError("--prompt-tokens, --gen-tokens, --batch and --runs must be at least 1")
    folder = Path(model_dir).expanduser()
    model = load_model(folder, dtype)
    cfg = model.config
    if prompt_tokens + gen_tokens + HOST_PROBE_STEPS > cfg.max_position_embeddings:
        raise UsageError(
            f"--prompt-tokens + --gen-tokens exceed the context limit {cfg.max_position_embeddings}"
        )
    setup = describe_model(folder, model)
    if prefill_chunk:
        setup["prefill_chunk"] = prefill_chunk
    setup.update(prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, batch=batch, runs=runs)
    engines = [ours_engine(model, prefill_chunk=prefill_chunk)]
    if compare_src is not None:
        theirs = load_mlx_lm(compare_src)
        if len(theirs.layers) != cfg.num_hidden_layers or theirs.args.vocab_size != cfg.vocab_size:
            raise UsageError(
                f"{compare_src}: {len(theirs.layers)} layers / vocab {theirs.args.vocab_size}, but "
                f"{folder} has {cfg.num_hidden_layers} / {cfg.vocab_size}: pass the folder it was "
                "converted from"
            )
        setup["compare_mlx_lm"] = str(compare_src)
        engines.append(mlx_lm_engine(theirs))
    ids = random_prompt(cfg.vocab_size, batch, prompt_tokens, seed)
    baseline = MLX_LM if compare_src is not None else None
    return compare(
        engines, ids, gen_tokens, runs, setup=setup, baseline=baseline, seed=seed, progress=progress
    )


ROWS = [
    ("prefill_tps", "prefill tokens/s", "{:.1f}"),
    ("decode_tps", "decode tokens/s", "{:.2f}"),
    ("ttft_s", "time to first token (s)", "{:.3f}"),
    ("host_ms", "host ms per decode step", "{:.2f}"),
    ("host_wall_ms", "  (by the wall clock)", "{:.2f}"),
    ("eval_ms", "eval ms per decode step", "{:.1f}"),
    ("peak_memory_bytes", "peak memory (GB)", "{:.2f}"),
]


def _threads_note(setup: dict[str, Any]) -> str:
    n = setup.get("cpu_threads") or 1
    return f" ({n} CPU threads per matmul)" if n > 1 else ""


def format_report(report: BenchReport) -> str:
    """A plain-text table: the median of each engine's runs and each ratio to the baseline."""
    s = report.setup
    lines = [
        f"model: {s.get('model')} ({s.get('layers')} layers, hidden {s.get('hidden_size')}, "
        f"vocab {s.get('vocab_size')}, recipe {s.get('recipe')}, activations "
        f"{s.get('activation_dtype')}, {s.get('device')}{_threads_note(s)}, mlx {s.get('mlx')})",
        f"prompt {s.get('prompt_tokens')} tokens x batch {s.get('batch')}, "
        f"{s.get('gen_tokens')} decode steps, {s.get('runs')} runs (median)",
    ]
    names = list(report.runs)
    meds = {n: report.median(n) for n in names}
    ratios = report.all_ratios()
    width = max(14, *(len(n) + 2 for n in names), *(len(r) + 2 for r in ratios))
    lines.append(f"{'':26}" + "".join(f"{n:>{width}}" for n in [*names, *ratios]))
    for key, label, fmt in ROWS:
        scale = 1e-9 if key == "peak_memory_bytes" else 1.0
        row = f"{label:26}" + "".join(f"{fmt.format(meds[n][key] * scale):>{width}}" for n in names)
        row += "".join(f"{r[key]:>{width - 1}.2f}x" for r in ratios.values())
        lines.append(row)
    if ratios:
        lines.append(
            "ratios: median over pairs of adjacent runs (time and memory rows: lower is better)"
        )
    return "\n".join(lines)
