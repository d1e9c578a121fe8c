#!/usr/bin/env python3
"""Time to first token of chat turns 1..N, with and without KV-cache reuse across turns.

    python scripts/bench_turns.py --model DIR [--turns 20] [--answer-tokens 48]

Without reuse every turn re-reads the whole conversation, so its time to first token grows with
the conversation; with reuse a turn prefills only the previous answer and the new message, so it
stays flat. Both sessions run in this process, turn by turn alternately, on the same model.
(A benchmark, not a test: run it on a real or random checkpoint; see README "Performance".)
"""

from __future__ import annotations

import argparse
import json
import sys

from gptoss_mlx import load
from gptoss_mlx.engine.chat import ChatSession
from gptoss_mlx.engine.generate import SamplingParams

QUESTIONS = [
    "Explain how a sliding-window attention layer differs from a full attention layer.",
    "Why would a model alternate the two kinds of layers?",
    "Give me a short example with numbers.",
    "How does that change the memory needed for a long conversation?",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True, help="a converted model folder")
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--answer-tokens", type=int, default=48, help="tokens generated per turn")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)

    model, tok = load(args.model)
    sessions = {
        reuse: ChatSession(
            model,
            tok,
            sampling=SamplingParams(temperature=0),
            max_tokens=args.answer_tokens,
            reasoning_effort="low",
            date="2026-01-01",
            reuse_cache=reuse,
        )
        for reuse in (True, False)
    }
    rows = []
    for turn in range(1, args.turns + 1):
        q = QUESTIONS[(turn - 1) % len(QUESTIONS)]
        row = {"turn": turn}
        for reuse, s in sessions.items():
            r = s.send(q)
            key = "reuse" if reuse else "fresh"
            row[f"{key}_ttft_s"] = round(r.stats.prompt_seconds, 4)
            row[f"{key}_prefilled"] = r.prompt_tokens - r.reused_tokens
            row["prompt_tokens"] = r.prompt_tokens
        rows.append(row)
        if not args.json:
            print(
                f"turn {turn:>2}: prompt {row['prompt_tokens']:>5} tokens | with reuse "
                f"{row['reuse_ttft_s'] * 1000:8.1f} ms ({row['reuse_prefilled']:>4} prefilled) | "
                f"without {row['fresh_ttft_s'] * 1000:8.1f} ms ({row['fresh_prefilled']:>5} prefilled)",
                flush=True,
            )
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
    last = rows[-1]
    print(
        f"turn {last['turn']}: time to first token {last['reuse_ttft_s'] * 1000:.0f} ms with reuse, "
        f"{last['fresh_ttft_s'] * 1000:.0f} ms without "
        f"({last['fresh_ttft_s'] / max(last['reuse_ttft_s'], 1e-9):.1f}x)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
