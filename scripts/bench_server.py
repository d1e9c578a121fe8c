#!/usr/bin/env python3
"""Benchmark `gptoss-mlx serve` as clients see it (the official `openai` client, streaming).

    python scripts/bench_server.py -m /tmp/gpt-oss-2l-mlx
    python scripts/bench_server.py -m MODEL --clients 1,4,8 --max-tokens 16 --turns 20

1. Concurrency: N streaming clients (1, 4, 8) send one greedy request each at the same time;
   then the same N prompts are served one at a time. For both: aggregate generated tokens per
   second of wall time, and time to first token (first text delta) p50 / p99.
2. Prompt cache: a 20-turn chat (the client resends the whole conversation each turn, as every
   chat client does) on a server with its prompt cache and on one with `--prompt-cache-bytes 0`:
   time to first token at turns 1, 10 and 20, and the cached prompt tokens reported at turn 20.

Each part runs its own `gptoss-mlx serve` subprocess, one at a time. The machine's load average
is printed with the figures: on a shared machine they move with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_process import ServeProcess  # noqa: E402

TOPICS = [
    "tides",
    "volcanoes",
    "sourdough",
    "chess openings",
    "river deltas",
    "comets",
    "bees",
    "glass",
]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def stream_chat(client, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed greedy chat request: ttft (first text delta), tokens, the text, usage."""
    t0 = time.perf_counter()
    ttft = None
    text = ""
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices:
            d = chunk.choices[0].delta
            piece = (d.content or "") + (getattr(d, "reasoning", None) or "")
            if piece and ttft is None:
                ttft = time.perf_counter() - t0
            text += d.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    return {
        "ttft": ttft if ttft is not None else time.perf_counter() - t0,
        "seconds": time.perf_counter() - t0,
        "tokens": usage.completion_tokens,
        "cached": usage.prompt_tokens_details.cached_tokens,
        "prompt": usage.prompt_tokens,
        "text": text,
    }


def prompt(i: int, nonce: str) -> list[dict]:
    topic = TOPICS[i % len(TOPICS)]
    return [{"role": "user", "content": f"[{nonce}] Explain {topic} to a curious ten-year-old."}]


def concurrency(
    server: ServeProcess, model: str, clients: list[int], max_tokens: int
) -> list[dict]:
    import openai

    client = openai.OpenAI(
        base_url=server.url + "/v1", api_key="bench", max_retries=0, timeout=3600
    )
    stream_chat(client, model, prompt(0, "warm-up"), 4)
    rows = []
    for n in clients:
        # Concurrent: n threads released together.
        results: list[dict] = [{}] * n
        go = threading.Event()

        def one(i: int, nonce: str, results=results, go=go) -> None:
            go.wait()
            results[i] = stream_chat(client, model, prompt(i, nonce), max_tokens)

        threads = [threading.Thread(target=one, args=(i, f"c{n}")) for i in range(n)]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        go.set()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        together = list(results)
        # One at a time: the same prompts (new nonce: no cache hit on their text).
        t0 = time.perf_counter()
        alone = [stream_chat(client, model, prompt(i, f"s{n}"), max_tokens) for i in range(n)]
        serial_wall = time.perf_counter() - t0
        rows.append(
            {
                "n": n,
                "tps": sum(r["tokens"] for r in together) / wall,
                "ttft50": percentile([r["ttft"] for r in together], 0.5),
                "ttft99": percentile([r["ttft"] for r in together], 0.99),
                "serial_tps": sum(r["tokens"] for r in alone) / serial_wall,
                "serial_ttft50": percentile([r["ttft"] for r in alone], 0.5),
                "serial_ttft99": percentile([r["ttft"] for r in alone], 0.99),
            }
        )
        r = rows[-1]
        print(
            f"  {n} clients: {r['tps']:.2f} tokens/s, ttft p50 {r['ttft50']:.2f} s p99 "
            f"{r['ttft99']:.2f} s | one at a time: {r['serial_tps']:.2f} tokens/s, ttft p50 "
            f"{r['serial_ttft50']:.2f} s p99 {r['serial_ttft99']:.2f} s",
            flush=True,
        )
    return rows


def chat_turns(server: ServeProcess, model: str, turns: int, max_tokens: int) -> list[dict]:
    import openai

    client = openai.OpenAI(
        base_url=server.url + "/v1", api_key="bench", max_retries=0, timeout=3600
    )
    messages: list[dict] = []
    out = []
    for turn in range(1, turns + 1):
        topic = TOPICS[turn % len(TOPICS)]
        messages.append(
            {"role": "user", "content": f"Turn {turn}: now say one thing about {topic}."}
        )
        r = stream_chat(client, model, messages, max_tokens)
        messages.append({"role": "assistant", "content": r["text"]})
        out.append(r)
        print(
            f"    turn {turn:2d}: prompt {r['prompt']:5d} tokens, cached {r['cached']:5d}, "
            f"ttft {r['ttft']:.2f} s",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-m", "--model", required=True, help="a converted model folder")
    ap.add_argument("--clients", default="1,4,8", help="comma-separated client counts")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per request")
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--skip", choices=["concurrency", "turns"], action="append", default=[])
    args = ap.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    common = ["--max-context", str(args.max_context), "--max-queue", "64"]
    print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)", flush=True)

    if "concurrency" not in args.skip:
        print(
            f"\n1. concurrent streaming clients, {args.max_tokens} tokens each (greedy):",
            flush=True,
        )
        with ServeProcess(args.model, "--max-concurrency", str(max(clients)), *common) as srv:
            srv.wait_ready()
            rows = concurrency(srv, srv.model_id(), clients, args.max_tokens)
        print(
            "\n| clients | together: tokens/s | TTFT p50 / p99 | one at a time: tokens/s | TTFT p50 / p99 |"
        )
        print("|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['n']} | {r['tps']:.2f} | {r['ttft50']:.2f} / {r['ttft99']:.2f} s | "
                f"{r['serial_tps']:.2f} | {r['serial_ttft50']:.2f} / {r['serial_ttft99']:.2f} s |"
            )

    if "turns" not in args.skip:
        results = {}
        for label, extra in (
            ("prompt cache", []),
            ("no prompt cache", ["--prompt-cache-bytes", "0"]),
        ):
            print(f"\n2. a {args.turns}-turn chat, {label}:", flush=True)
            with ServeProcess(args.model, *common, *extra) as srv:
                srv.wait_ready()
                results[label] = chat_turns(srv, srv.model_id(), args.turns, args.max_tokens)
        print("\n| server | TTFT turn 1 | turn 10 | turn 20 | prompt / cached tokens at turn 20 |")
        print("|---|---|---|---|---|")
        for label, turns in results.items():
            pick = [turns[i - 1] for i in (1, min(10, len(turns)), len(turns))]
            last = turns[-1]
            print(
                f"| {label} | {pick[0]['ttft']:.2f} s | {pick[1]['ttft']:.2f} s | "
                f"{pick[2]['ttft']:.2f} s | {last['prompt']} / {last['cached']} |"
            )
        mean = {k: statistics.mean(t["ttft"] for t in v[1:]) for k, v in results.items()}
        print(
            f"mean TTFT over turns 2..{args.turns}: "
            + ", ".join(f"{k} {v:.2f} s" for k, v in mean.items())
        )
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
