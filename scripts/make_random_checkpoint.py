#!/usr/bin/env python3
"""Write a random checkpoint shaped like gpt-oss-20b (13.8 GB at 24 layers) in a real file layout.

    python scripts/make_random_checkpoint.py /tmp/gpt-oss-20b-random
    python scripts/make_random_checkpoint.py /tmp/small --layers 2 --layout original

The weights are random (nothing here can download the real ones) but every name, shape, dtype and
file is laid out as in openai/gpt-oss-20b, so conversion and loading can be measured at full size.
Tensors are streamed to disk one chunk at a time: memory stays small whatever the size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gptoss_mlx.convert.synthetic import write_hf_checkpoint, write_original_checkpoint
from gptoss_mlx.model.config import ModelConfig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", type=Path, help="folder to create")
    ap.add_argument("--layers", type=int, default=24, help="transformer blocks (default 24)")
    ap.add_argument("--layout", choices=["hf", "original"], default="hf")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tokenizer-json",
        type=Path,
        help="copy this tokenizer.json (hf layout) instead of writing a minimal byte-level one",
    )
    args = ap.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out} exists and is not empty", file=sys.stderr)
        return 2
    cfg = ModelConfig(num_hidden_layers=args.layers)  # gpt-oss-20b's sizes otherwise
    cfg.validate("--layers")
    t0 = time.monotonic()
    if args.layout == "hf":
        write_hf_checkpoint(args.out, cfg, seed=args.seed, tokenizer_json=args.tokenizer_json)
    else:
        write_original_checkpoint(args.out, cfg, seed=args.seed)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(
        f"wrote {args.out} ({args.layout}, {args.layers} layers, {size / 1e9:.2f} GB) "
        f"in {time.monotonic() - t0:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
