#!/usr/bin/env python3
"""Measure the converter (and the loader, when present) on a random checkpoint of gpt-oss-20b's shape.

    python scripts/bench_convert.py                    # full size: ~13.8 GB in, ~12 GB out
    python scripts/bench_convert.py --layers 2         # quick
    python scripts/bench_convert.py --recipe mxfp4-bf16 --recipe mxfp4-q4

Each step runs in its own subprocess; its peak RSS comes from os.wait4 (ru_maxrss of that child
only). Steps: write the random checkpoint, convert it (`gptoss-mlx convert --quiet`), then, when
the library has `gptoss_mlx.load`, load the converted folder and run one forward pass of 3 tokens.
Everything is written under --work-dir and removed afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

LOAD_SNIPPET = """
import sys
import mlx.core as mx
import gptoss_mlx
if not hasattr(gptoss_mlx, "load"):
    sys.exit(3)
model, tokenizer = gptoss_mlx.load(sys.argv[1])
mx.eval(model(mx.array([[1, 2, 3]])))
"""
NO_LOADER = 3


def run_measured(cmd: list[str]) -> tuple[int, float, int]:
    """Run `cmd`; returns (exit status, wall seconds, peak RSS bytes of that process)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return proc.returncode, time.monotonic() - t0, rss


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--layers", type=int, default=24, help="transformer blocks (default 24: full 20b)"
    )
    ap.add_argument("--layout", choices=["hf", "original"], default="hf")
    ap.add_argument(
        "--recipe", action="append", help="recipe(s) to convert with (default mxfp4-q8)"
    )
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/gptoss-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    args = ap.parse_args(argv)
    recipes = args.recipe or ["mxfp4-q8"]
    work = args.work_dir
    if work.exists():
        print(f"error: {work} exists; remove it or pass another --work-dir", file=sys.stderr)
        return 2
    work.mkdir(parents=True)
    rows: list[tuple[str, str, str, str]] = []
    py = sys.executable
    here = Path(__file__).resolve().parent
    try:
        src = work / "src"
        rc, wall, rss = run_measured(
            [
                py,
                str(here / "make_random_checkpoint.py"),
                str(src),
                "--layers",
                str(args.layers),
                "--layout",
                args.layout,
            ]
        )
        if rc:
            return rc
        rows.append(
            (
                "write random checkpoint",
                f"{wall:.1f}",
                f"{rss / 2**30:.2f}",
                f"{folder_size(src) / 1e9:.2f}",
            )
        )
        for recipe in recipes:
            out = work / f"out-{recipe}"
            rc, wall, rss = run_measured(
                [
                    py,
                    "-m",
                    "gptoss_mlx.cli",
                    "convert",
                    str(src),
                    str(out),
                    "--quiet",
                    "--recipe",
                    recipe,
                ]
            )
            if rc:
                return rc
            rows.append(
                (
                    f"convert {recipe}",
                    f"{wall:.1f}",
                    f"{rss / 2**30:.2f}",
                    f"{folder_size(out) / 1e9:.2f}",
                )
            )
            rc, wall, rss = run_measured([py, "-c", LOAD_SNIPPET, str(out)])
            if rc == NO_LOADER:
                rows.append((f"load + 1 forward {recipe}", "n/a", "n/a", "gptoss_mlx.load missing"))
            elif rc:
                rows.append((f"load + 1 forward {recipe}", "failed", f"exit {rc}", ""))
            else:
                rows.append((f"load + 1 forward {recipe}", f"{wall:.1f}", f"{rss / 2**30:.2f}", ""))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    head = ("step", "wall s", "peak RSS GiB", "size GB")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    print(f"gpt-oss-20b shapes, {args.layers} layers, {args.layout} layout, {os.cpu_count()} CPUs")
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
