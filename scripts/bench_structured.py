#!/usr/bin/env python3
"""Decode speed with a structured-output grammar against without, on the same model and prompt.

    python scripts/make_random_checkpoint.py /tmp/hf-2l --layers 2 \\
        --tokenizer-json ../shared/tokenizer/tokenizer.json
    gptoss-mlx convert /tmp/hf-2l /tmp/mlx-2l
    python scripts/bench_structured.py -m /tmp/mlx-2l [--gen-tokens 48] [--runs 3] [--batch 4]

Three modes decode the same chat prompt (rendered with its `# Response Formats` section), each
exactly --gen-tokens tokens (no stop token ends them early), in alternating order:
  free       no grammar (what every request without structured outputs runs)
  json       the turn's grammar with the answer forced at once (max_reasoning_tokens 0) into a
             JSON schema of long string arrays: every token is masked by the JSON grammar
  reasoning  the same grammar with an open reasoning budget: the analysis is masked too (almost
             everything is allowed there), the usual first part of a real answer
Reported: decode tokens/s per mode from the median time between tokens, by the wall clock and by
the process's CPU time (all threads: on a machine shared with other jobs the wall clock mostly
measures waiting, CPU time still measures the work), the ratio to `free` (median over runs;
target >= 0.95), the host time of each mask (median and p99 over every masked token):
llguidance computing the allowed tokens while the forward pass runs, and the time to apply a mask
to the logits on the device. With
--batch B the same comparison runs through the continuous-batching engine, B rows at once (all
constrained, or none), where masks are filled in parallel.
(A benchmark, not a test. Speeds come from whatever machine runs it: say which in the figures.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import mlx.core as mx
import numpy as np

from gptoss_mlx import load
from gptoss_mlx.engine.batching import BatchEngine, BatchRequest
from gptoss_mlx.engine.constraints import GrammarSpec, allocate_masks, apply_masks, compile_grammar
from gptoss_mlx.engine.generate import SamplingParams, generate_tokens
from gptoss_mlx.harmony.render import render_prompt
from gptoss_mlx.harmony.request import parse_chat_request

# A long array of strings: the answer cannot finish within a benchmark's token count (at least
# 1000 items), so every mode decodes the same number of tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {"type": "string", "maxLength": 200},
            "minItems": 1000,
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}
PROMPT = "List as many fruits as you can, with a short note on each."
MODES = ("free", "json", "reasoning")


def build(model, tok):
    request = parse_chat_request(
        {
            "messages": [{"role": "user", "content": PROMPT}],
            "reasoning_effort": "low",
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "fruits", "schema": SCHEMA},
            },
        }
    )
    prompt = render_prompt(request, tok, date="2026-01-01")
    vocab = model.config.vocab_size
    grammars = {
        "json": compile_grammar(GrammarSpec.of(request, max_reasoning_tokens=0), tok, vocab),
        "reasoning": compile_grammar(GrammarSpec.of(request), tok, vocab),
    }
    return prompt, grammars


def _steps(stamps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(wall, process CPU) seconds between consecutive stamps."""
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps[:-1], stamps[1:], strict=True)]


def _stamp() -> tuple[float, float]:
    # Process CPU time counts every thread's work (MLX's CPU streams, llguidance's pool): it
    # stays meaningful on a machine shared with other jobs, where wall time is mostly waiting.
    return time.perf_counter(), time.process_time()


def run_single(model, prompt, grammar, n: int, masks: list[float]) -> list[tuple[float, float]]:
    """(wall, CPU) seconds between consecutive tokens (the steps after the prefill's token)."""
    constraint = grammar.constraint() if grammar is not None else None
    if constraint is not None:
        constraint.mask_seconds = masks
    stamps = []
    for _ in generate_tokens(
        model,
        prompt,
        max_tokens=n,
        stop_ids=(),
        sampling=SamplingParams(temperature=0.0),
        constraint=constraint,
    ):
        stamps.append(_stamp())
    assert len(stamps) == n, f"stopped after {len(stamps)} of {n} tokens"
    return _steps(stamps)


def run_batch(model, prompt, grammar, n: int, rows: int, masks: list[float]) -> list:
    """(wall, CPU) seconds between consecutive decode steps (row 0's tokens as they arrive)."""
    stamps: list[tuple[float, float]] = []
    reqs = []
    for i in range(rows):
        c = grammar.constraint() if grammar is not None else None
        if c is not None:
            c.mask_seconds = masks if i == 0 else None  # one timing per step (filled together)
        on_token = (lambda _t: stamps.append(_stamp())) if i == 0 else None
        greedy = SamplingParams(temperature=0.0)
        reqs.append(BatchRequest(prompt, n, greedy, id=i, constraint=c, on_token=on_token))
    engine = BatchEngine(model, batch_size=rows, stop_ids=())
    results = list(engine.run(reqs))
    assert all(r.completion_tokens == n for r in results), [r.finish_reason for r in results]
    return _steps(stamps[1:])  # from the step after every row has joined


def apply_ms(rows: int, vocab: int, reps: int = 50) -> float:
    """Median device time (ms) of applying a mask to [rows, vocab] logits, evaluated alone."""
    logits = mx.random.normal((rows, vocab))
    mask = allocate_masks(rows, vocab)
    mask[:, ::2] = 0x0F0F0F0F
    mx.eval(logits)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(apply_masks(logits, mask))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def summarize(label: str, steps: dict[str, list[list]], masks: dict) -> dict:
    """Per mode and clock (wall, cpu): the median step of each run, then the median run, as
    tokens/s; the ratio to free is the median over runs of free's median step / this mode's."""
    out: dict = {"label": label}
    for k, clock in enumerate(("wall", "cpu")):
        med = {m: [statistics.median(s[k] for s in run) for run in steps[m]] for m in MODES}
        for mode in MODES:
            out[f"{mode}_{clock}_tps"] = round(1 / statistics.median(med[mode]), 3)
            if mode != "free":
                ratios = [f / s for s, f in zip(med[mode], med["free"], strict=True)]
                out[f"{mode}_{clock}_ratio"] = round(statistics.median(ratios), 3)
    for mode in MODES[1:]:
        ms = np.array(masks[mode]) * 1e3
        out[f"{mode}_mask_ms_median"] = round(float(np.median(ms)), 4)
        out[f"{mode}_mask_ms_p99"] = round(float(np.percentile(ms, 99)), 4)
        out[f"{mode}_masks"] = len(ms)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-m", "--model", required=True, help="a converted model folder")
    ap.add_argument("--gen-tokens", type=int, default=48, help="tokens decoded per run")
    ap.add_argument("--runs", type=int, default=3, help="alternating runs of each mode")
    ap.add_argument("--batch", type=int, default=0, help="also compare B rows batched")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)

    model, tok = load(args.model)
    prompt, grammars = build(model, tok)
    vocab = model.config.vocab_size
    print(f"prompt: {len(prompt)} tokens; decoding {args.gen_tokens} tokens per run", flush=True)
    tables = [("generate", lambda g, m: run_single(model, prompt, g, args.gen_tokens, m))]
    if args.batch:
        tables.append(
            (
                f"batch x{args.batch}",
                lambda g, m: run_batch(model, prompt, g, args.gen_tokens, args.batch, m),
            )
        )
    rows = []
    for label, run in tables:
        run(None, [])  # warm-up: compile the decode step, build caches
        steps = {m: [] for m in MODES}
        masks = {m: [] for m in MODES}
        for r in range(args.runs):
            order = MODES if r % 2 == 0 else MODES[::-1]
            for mode in order:
                steps[mode].append(run(grammars.get(mode), masks[mode]))
                wall = statistics.median(s[0] for s in steps[mode][-1]) * 1e3
                cpu = statistics.median(s[1] for s in steps[mode][-1]) * 1e3
                print(f"  {label} run {r + 1} {mode}: median step {wall:.1f} ms wall, "
                      f"{cpu:.1f} ms CPU", flush=True)  # fmt: skip
        rows.append(summarize(label, steps, masks))
        rows[-1]["apply_ms"] = round(apply_ms(args.batch if "batch" in label else 1, vocab), 3)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for row in rows:
        print(f"\n{row['label']}: decode tokens/s (median of {args.runs} runs), ratio to free")
        for clock in ("wall", "cpu"):
            line = f"  {clock:<4}  free {row[f'free_{clock}_tps']:.3f}"
            for mode in MODES[1:]:
                line += f" | {mode} {row[f'{mode}_{clock}_tps']:.3f} x{row[f'{mode}_{clock}_ratio']:.3f}"
            print(line)
        for mode in MODES[1:]:
            print(
                f"  mask ({mode}): median {row[f'{mode}_mask_ms_median']:.3f} ms, "
                f"p99 {row[f'{mode}_mask_ms_p99']:.3f} ms over {row[f'{mode}_masks']} masks"
            )
        print(f"  applying a mask to the logits: {row['apply_ms']:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
