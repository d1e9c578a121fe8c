#!/usr/bin/env python3
"""Write a random checkpoint shaped like gpt-oss-20b (13.8 GB at 24 layers) or gpt-oss-120b (128
experts per layer, 65 GB at 36 layers) in a real file layout.

    python scripts/make_random_checkpoint.py /tmp/gpt-oss-20b-random
    python scripts/make_random_checkpoint.py /tmp/small --layers 2 --layout original
    python scripts/make_random_checkpoint.py /tmp/120b-2l --like 120b --layers 2

The weights are random (nothing here can download the real ones) but every name, shape, dtype and
file is laid out as in openai/gpt-oss-20b (or -120b), so conversion and loading can be measured at
full size.
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
    ap.add_argument("--layers", type=int, default=None, help="transformer blocks (default: all)")
    ap.add_argument(
        "--like",
        choices=["20b", "120b"],
        default="20b",
        help="gpt-oss-20b's widths and 32 experts, or gpt-oss-120b's 128 experts (default 20b)",
    )
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
    # 120b is 20b with 36 layers and 128 experts (../shared/gpt-oss-120b/README.md).
    experts, layers = (128, 36) if args.like == "120b" else (32, 24)
    args.layers = args.layers or layers
    cfg = ModelConfig(num_hidden_layers=args.layers, num_local_experts=experts)
    cfg.validate("--layers")
    t0 = time.monotonic()
    if args.layout == "hf":
        write_hf_checkpoint(args.out, cfg, seed=args.seed, tokenizer_json=args.tokenizer_json)
    else:
        write_original_checkpoint(args.out, cfg, seed=args.seed)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(
        f"wrote {args.out} ({args.layout}, like {args.like}, {args.layers} layers, "
        f"{size / 1e9:.2f} GB) "
        f"in {time.monotonic() - t0:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
