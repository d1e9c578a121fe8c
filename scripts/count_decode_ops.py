#!/usr/bin/env python3
"""Count the operations in one compiled decode step: what the host replays for every token.

    python scripts/count_decode_ops.py -m DIR [--threads N] [--fast-rope]

A compiled step's host time grows with the number of operations in its graph (each one is
re-created per token), so this is the figure to watch when changing the model's code: fewer ops,
less host time per token. Prints the total and the most frequent operations.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

import gptoss_mlx.model.transformer as model_mod
from gptoss_mlx import load_model
from gptoss_mlx.engine import generate
from gptoss_mlx.model.compiled_decode import CompiledDecoder


def count_ops(model, prompt_tokens: int = 4) -> collections.Counter:
    """Operation names -> counts in the graph of one compiled decode step of `model`."""
    cache = model.make_cache()
    generate.prefill_ids(model, mx.arange(prompt_tokens, dtype=mx.uint32)[None], cache)
    dec = CompiledDecoder.start(model, cache)
    # The first step traces and compiles; the second replays the compiled graph, which is what
    # every later token does.
    mx.eval(dec.step(mx.array([prompt_tokens], dtype=mx.uint32)))
    logits = dec.step(mx.array([prompt_tokens + 1], dtype=mx.uint32))
    state = [a for s in dec.static for a in s.arrays.values()]
    with tempfile.TemporaryDirectory() as tmp:
        dot = Path(tmp) / "step.dot"
        mx.export_to_dot(str(dot), logits, *state)
        names = re.findall(r'label ="(\w+)"', dot.read_text())
    mx.eval(logits)
    dec.finish()
    return collections.Counter(names)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-m", "--model", required=True, help="a converted model folder")
    ap.add_argument("--threads", type=int, default=None, help="CPU streams (default: automatic)")
    ap.add_argument("--fast-rope", action="store_true", help="mx.fast.rope in every layer")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    if args.fast_rope:
        model_mod.SHARED_ROTATION = False
    model = load_model(args.model, threads=args.threads)
    ops = count_ops(model)
    layers = model.config.num_hidden_layers
    print(f"{sum(ops.values())} ops in one decode step ({layers} layers, {mx.default_device()})")
    for name, n in ops.most_common(args.top):
        print(f"  {n:5d}  {name[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
