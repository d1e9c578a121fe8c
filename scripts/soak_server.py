#!/usr/bin/env python3
"""Soak `gptoss-mlx serve`: a few hundred requests from concurrent clients, a third of them leaving
mid-stream and a tenth malformed, then check that nothing was left behind.

    python scripts/soak_server.py -m /tmp/gpt-oss-2l-mlx
    python scripts/soak_server.py -m MODEL --requests 300 --clients 8 --max-tokens 12

The server runs as a subprocess (`gptoss-mlx serve`, the real command). Each client thread sends
requests by a seeded plan: malformed ones (bad JSON, unknown model or fields, bad items: each must
get its 4xx envelope), streams that read a few events and hang up, and complete chats and
responses, streamed and not, often continuing a conversation (so the prompt cache is hit and
evicted). After a warm-up the server's resident memory is read; after the run it must:
  - still answer (/health and a chat request);
  - hold no sequence: active and queued back to 0;
  - keep the prompt cache within --prompt-cache-bytes;
  - be back within --tolerance (5%) of its memory after warm-up.
Every figure is printed; the exit status is 1 if a check fails.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_process import ServeProcess, log_lines  # noqa: E402

MALFORMED = [
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", {"model": "llama3", "messages": [{"role": "user", "content": "x"}]}),
    ("/v1/chat/completions", {"model": None, "messages": [{"role": "bot", "content": "x"}]}),
    (
        "/v1/chat/completions",
        {"model": None, "messages": [{"role": "user", "content": "x"}], "n": 3},
    ),
    ("/v1/chat/completions", {"model": None, "messages": "hi", "temperature": "hot"}),
    ("/v1/responses", {"model": None, "input": [{"type": "bogus"}]}),
    ("/v1/responses", {"model": None, "input": "x", "previous_response_id": "resp_gone"}),
    ("/v1/responses", {"model": None, "input": "x", "max_output_tokens": 0}),
]
TOPICS = ["tides", "volcanoes", "bread", "chess", "rivers", "comets", "bees", "glass"]


def post(port: int, path: str, body, timeout: float = 600) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def leave_mid_stream(port: int, path: str, body: dict, lines: int) -> int:
    """Open a stream, read `lines` SSE lines, hang up; returns the lines read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request(
            "POST",
            path,
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"stream answered {resp.status}: {resp.read()[:200]!r}")
        n = 0
        while n < lines and resp.readline():
            n += 1
        return n
    finally:
        conn.close()  # the client leaves


class Client(threading.Thread):
    def __init__(self, index: int, port: int, model: str, plan: list[str], args, stats):
        super().__init__(name=f"client-{index}", daemon=True)
        import openai

        self.rng = random.Random(args.seed * 1000 + index)
        self.port, self.model, self.plan, self.args, self.stats = port, model, plan, args, stats
        self.openai = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="soak", max_retries=0, timeout=600
        )
        self.messages: list[dict] = []

    def run(self) -> None:
        for kind in self.plan:
            t0 = time.perf_counter()
            try:
                getattr(self, kind)()
                self.stats.record(kind, time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                self.stats.fail(kind, f"{type(e).__name__}: {str(e)[:200]}")

    def _user(self) -> str:
        topic = self.rng.choice(TOPICS)
        return f"Tell me one fact about {topic} (#{self.rng.randrange(10**6)})."

    def malformed(self) -> None:
        path, body = self.rng.choice(MALFORMED)
        if isinstance(body, dict) and body.get("model", 1) is None:
            body = {**body, "model": self.model}
        status, raw = post(self.port, path, body)
        err = json.loads(raw).get("error") if raw.startswith(b"{") else None
        if not (400 <= status < 500 and isinstance(err, dict) and err.get("message")):
            raise RuntimeError(f"malformed request answered {status}: {raw[:200]!r}")

    def disconnect(self) -> None:
        tokens = self.args.max_tokens * 20  # would run long: the hang-up must end it
        if self.rng.random() < 0.5:
            body = {"model": self.model, "messages": [{"role": "user", "content": self._user()}],
                    "max_tokens": tokens, "stream": True}  # fmt: skip
            leave_mid_stream(self.port, "/v1/chat/completions", body, self.rng.randint(1, 12))
        else:
            body = {"model": self.model, "input": self._user(), "max_output_tokens": tokens,
                    "stream": True, "store": False}  # fmt: skip
            leave_mid_stream(self.port, "/v1/responses", body, self.rng.randint(2, 16))

    def complete(self) -> None:
        if not self.messages or len(self.messages) > 10 or self.rng.random() < 0.3:
            self.messages = []
        self.messages.append({"role": "user", "content": self._user()})
        n = self.args.max_tokens
        way = self.rng.randrange(4)
        if way == 0:
            r = self.openai.chat.completions.create(
                model=self.model, messages=self.messages, max_tokens=n
            )
            self.messages.append(r.choices[0].message.model_dump(exclude_none=True))
        elif way == 1:
            text = ""
            stream = self.openai.chat.completions.create(
                model=self.model, messages=self.messages, max_tokens=n, stream=True
            )
            for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
            self.messages.append({"role": "assistant", "content": text})
        elif way == 2:
            r = self.openai.responses.create(
                model=self.model, input=self.messages, max_output_tokens=n, store=False
            )
            self.messages.append({"role": "assistant", "content": r.output_text})
        else:
            with self.openai.responses.stream(
                model=self.model, input=self.messages, max_output_tokens=n, store=False
            ) as stream:
                for _ in stream:
                    pass
            self.messages.append({"role": "assistant", "content": "(streamed)"})


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.done: Counter = Counter()
        self.seconds: dict[str, list[float]] = {}
        self.failures: list[str] = []

    def record(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.done[kind] += 1
            self.seconds.setdefault(kind, []).append(seconds)

    def fail(self, kind: str, why: str) -> None:
        with self.lock:
            self.failures.append(f"{kind}: {why}")


def plan_requests(n: int, clients: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    kinds = ["malformed"] * (n // 10) + ["disconnect"] * (n // 3)
    kinds += ["complete"] * (n - len(kinds))
    rng.shuffle(kinds)
    return [kinds[i::clients] for i in range(clients)]


def run_clients(port, model, n, args, seed) -> Stats:
    stats = Stats()
    threads = [
        Client(i, port, model, plan, args, stats)
        for i, plan in enumerate(plan_requests(n, args.clients, seed))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stats


def settle(server: ServeProcess, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    health = server.health()
    while time.monotonic() < deadline and (health["active"] or health["queued"]):
        time.sleep(0.2)
        health = server.health()
    return health


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-m", "--model", required=True, help="a converted model folder")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=48, help="requests before memory is read")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--max-concurrency", type=int, default=8)
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--prompt-cache-bytes", default="64M")
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from gptoss_mlx.cli.serve import ByteSize

    cache_bound = ByteSize().convert(args.prompt_cache_bytes, None, None)
    server = ServeProcess(
        args.model,
        "--max-concurrency", str(args.max_concurrency), "--max-queue", "64",
        "--max-context", str(args.max_context), "--prompt-cache-bytes", str(cache_bound),
    )  # fmt: skip
    try:
        server.wait_ready()
        model = server.model_id()
        print(f"server: {server.url}, model {model}, log {server.log_path}", flush=True)
        t0 = time.perf_counter()
        # Warm up until the prompt cache is about full and the process has stopped growing
        # (allocator arenas, MLX's buffer cache): memory is then compared at the same level.
        warm = Stats()
        trail = []
        for round_ in range(12):
            part = run_clients(server.port, model, args.warmup, args, args.seed + 1 + round_)
            warm.done.update(part.done)
            warm.failures += part.failures
            full = settle(server)["cached_bytes"] >= 0.9 * cache_bound
            time.sleep(1.0)
            trail.append(server.rss_bytes())
            if full and len(trail) >= 2 and trail[-1] <= trail[-2] * 1.01:
                break
        print("warm-up rss by round: " + ", ".join(f"{r / 2**20:.0f}" for r in trail) + " MiB")
        rss_warm = server.rss_bytes()
        cached = server.health()["cached_bytes"]
        print(f"warm-up: {sum(warm.done.values())} requests in {time.perf_counter() - t0:.0f} s, "
              f"rss {rss_warm / 2**20:.0f} MiB, prompt cache {cached / 2**20:.1f} MiB, "
              f"failures {len(warm.failures)}", flush=True)  # fmt: skip
        t1 = time.perf_counter()
        stats = run_clients(server.port, model, args.requests, args, args.seed)
        elapsed = time.perf_counter() - t1
        health = settle(server)
        time.sleep(1.0)
        rss_after = server.rss_bytes()
        status, raw = post(server.port, "/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 2})  # fmt: skip
        answered = status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 2
        health = server.health()
    finally:
        code = server.stop()
    lines = log_lines(server.log_path)
    drift = (rss_after - rss_warm) / rss_warm
    print(f"\n{args.requests} requests from {args.clients} clients in {elapsed:.0f} s:")
    for kind in ("complete", "disconnect", "malformed"):
        secs = sorted(stats.seconds.get(kind, [0.0]))
        print(
            f"  {kind:10s} {stats.done[kind]:4d} ok, p50 {secs[len(secs) // 2]:.2f} s, max {secs[-1]:.2f} s"
        )
    print(f"  unexpected failures: {len(stats.failures) + len(warm.failures)}")
    for f in (warm.failures + stats.failures)[:5]:
        print(f"    {f}")
    print(f"  log lines with token counts: {len(lines)} (server exit status {code})")
    print(f"after: active {health['active']}, queued {health['queued']}, prompt cache "
          f"{health['cached_entries']} entries / {health['cached_bytes'] / 2**20:.1f} MiB "
          f"(bound {cache_bound / 2**20:.0f} MiB)")  # fmt: skip
    print(f"memory: rss after warm-up {rss_warm / 2**20:.0f} MiB, after the run "
          f"{rss_after / 2**20:.0f} MiB ({drift * 100:+.1f}%)")  # fmt: skip
    checks = {
        "no unexpected failure": not stats.failures and not warm.failures,
        "still answers": answered,
        "no sequence left (active 0, queued 0)": health["active"] == 0 and health["queued"] == 0,
        "prompt cache within its bound": health["cached_bytes"] <= cache_bound,
        f"memory within {args.tolerance:.0%} of warm-up": abs(drift) <= args.tolerance,
        "clean shutdown": code == 0,
    }
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
