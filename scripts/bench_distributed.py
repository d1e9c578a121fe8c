#!/usr/bin/env python
"""Latency of the collectives a sharded gpt-oss run makes per token, and (with --model) decode
speed and memory per rank in each --shard mode against the unsharded model.

    python scripts/bench_distributed.py                      # 2 ranks on this machine (loopback)
    python scripts/bench_distributed.py --ranks 4
    python scripts/bench_distributed.py --model DIR --tokens 32
    mlx.launch --hostfile hosts.json -- python scripts/bench_distributed.py --worker   # two Macs

Without --worker it starts --ranks copies of itself on this machine as ring ranks (as mlx.launch
would, but without its relay loop, which busy-polls; --via-mlx-launch uses mlx.launch itself). Each figure is the median of --reps timed repetitions after a warm-up.
The messages are those of one decode token: an all_sum of one hidden state (2880 values, bf16 as
on a Mac and float32 as on MLX's CPU backend) per layer (expert: one, tensor: two), an all_sum of
one int32 (rank 0's token, every mode), a neighbour send/recv of one hidden state (pipeline).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HIDDEN = 2880


def _median_us(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def collectives(group, reps: int) -> dict[str, float]:
    import mlx.core as mx

    rank, size = group.rank(), group.size()
    out = {}
    for name, dtype in (("bf16", mx.bfloat16), ("f32", mx.float32)):
        x = mx.ones((1, HIDDEN), dtype=dtype)
        out[f"all_sum hidden {name}"] = _median_us(
            lambda x=x: mx.eval(mx.distributed.all_sum(x, group=group)), reps
        )
    token = mx.array([7], dtype=mx.int32)
    out["all_sum token int32"] = _median_us(
        lambda: mx.eval(mx.distributed.all_sum(token, group=group)), reps
    )
    # One hop of a pipeline: rank r sends to r-1 (ring neighbours only); even ranks send first
    # and odd ranks receive first, each evaluated alone (a send and a receive in one evaluation
    # on both sides deadlock).
    h = mx.ones((1, HIDDEN), dtype=mx.bfloat16)

    def hop() -> None:
        for phase in (0, 1):
            if (rank + phase) % 2 == 0 and rank > 0:
                mx.eval(mx.distributed.send(h, rank - 1, group=group))
            elif (rank + phase) % 2 == 1 and rank < size - 1:
                mx.eval(mx.distributed.recv_like(h, rank + 1, group=group))

    out["send/recv hidden bf16 (one hop)"] = _median_us(hop, reps)
    return out


def decode(group, folder: str, tokens: int) -> dict[str, dict]:
    """Tokens/s (rank 0's view) and peak memory per rank, unsharded and in each mode that fits."""
    import mlx.core as mx

    from gptoss_mlx.engine.distributed import Cluster
    from gptoss_mlx.engine.generate import SamplingParams, generate
    from gptoss_mlx.errors import GptOssError
    from gptoss_mlx.weights.loading import load_model

    prompt = list(range(1000, 1064))
    greedy = SamplingParams(temperature=0.0)
    results = {}
    runs = [
        ("unsharded", None),
        ("expert", "expert"),
        ("tensor", "tensor"),
        ("pipeline", "pipeline"),
    ]
    for label, mode in runs:
        mx.reset_peak_memory()
        cluster = Cluster(group, mode or "expert")
        if mode is None:
            # Rank 0 alone, the others waiting: one process on this machine's cores.
            if group.rank() == 0:
                model = load_model(folder)
                generate(model, prompt, max_tokens=4, sampling=greedy)
                res = generate(model, prompt, max_tokens=tokens, sampling=greedy)
                results[label] = {
                    "decode_tokens_per_s": res.stats.generation_tps,
                    "prefill_tokens_per_s": res.stats.prompt_tps,
                    "peak_gb_after_load": res.stats.peak_memory_bytes / 1e9,
                }
                del model
                gc.collect()
            cluster.together(lambda: None)
            continue
        try:
            from gptoss_mlx.engine.runtime import load_for_inference

            model = load_for_inference(folder, 4096, cluster=cluster)[0]
        except (GptOssError, SystemExit) as e:
            results[label] = {"skipped": str(e) or "refused (see rank 0)"}
            continue
        loaded = mx.get_peak_memory()
        generate(model, prompt, max_tokens=4, sampling=greedy)  # warm-up (compiles the step)
        res = generate(model, prompt, max_tokens=tokens, sampling=greedy)
        results[label] = {
            "decode_tokens_per_s": res.stats.generation_tps,
            "prefill_tokens_per_s": res.stats.prompt_tps,
            "peak_gb_after_load": loaded / 1e9,
        }
        del model
        gc.collect()  # a compiled decode step's trace holds the weights in a cycle
    return results


def worker(args: argparse.Namespace) -> None:
    import mlx.core as mx

    group = mx.distributed.init(strict=True)
    report = {
        "ranks": group.size(),
        "rank": group.rank(),
        "collectives_us": collectives(group, args.reps),
    }
    if args.model:
        report["decode"] = decode(group, args.model, args.tokens)
    print(json.dumps(report), flush=True)


def launched(ranks: int, worker_cmd: list[str], env: dict[str, str]) -> str:
    """The ranks under this virtualenv's mlx.launch (ring backend)."""
    launcher = Path(sys.executable).with_name("mlx.launch")
    cmd = [str(launcher), "-n", str(ranks), "--backend", "ring", "--", *worker_cmd]
    # Its stdin stays open (never written): at end of file mlx.launch spins on it.
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    output = proc.stdout.read()
    proc.wait()
    proc.stdin.close()
    return output


def direct(ranks: int, worker_cmd: list[str], env: dict[str, str]) -> str:
    """The ranks started here the way mlx.launch starts ring ranks on one machine (MLX_RANK and
    MLX_HOSTFILE), without the launcher: its relay loop busy-polls the ranks' pipes (a third of
    a core with MLX 0.32), which on a small machine slows the very ranks being timed."""
    import socket
    import tempfile

    ports = []
    for _ in range(ranks):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([[f"127.0.0.1:{p}"] for p in ports], f)
    procs = [
        subprocess.Popen(
            worker_cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**env, "MLX_RANK": str(r), "MLX_HOSTFILE": f.name},
        )
        for r in range(ranks)
    ]
    try:
        return "".join(p.communicate(timeout=3600)[0] for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        os.unlink(f.name)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ranks", type=int, default=2, help="processes to start on this machine")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--model", help="a converted folder: also time decoding in each mode")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--worker", action="store_true", help="run as one rank (under mlx.launch)")
    p.add_argument(
        "--via-mlx-launch",
        action="store_true",
        help="start the ranks with mlx.launch (default: directly, as it would, without its relay)",
    )
    args = p.parse_args()
    if args.worker:
        return worker(args)
    worker_cmd = [sys.executable, __file__, "--worker", "--reps", str(args.reps)]
    worker_cmd += ["--tokens", str(args.tokens)] + (["--model", args.model] if args.model else [])
    env = {**os.environ, "GPTOSS_MLX_THREADS": os.environ.get("GPTOSS_MLX_THREADS", "1")}
    output = (launched if args.via_mlx_launch else direct)(args.ranks, worker_cmd, env)
    reports = sorted(
        (json.loads(line) for line in output.splitlines() if line.startswith("{")),
        key=lambda r: r["rank"],
    )
    if len(reports) != args.ranks:
        sys.exit(f"expected {args.ranks} reports, got {len(reports)}:\n{output[-2000:]}")
    print(f"{args.ranks} ranks on this machine, ring backend over loopback; median of {args.reps}")
    for name in reports[0]["collectives_us"]:
        per_rank = [r["collectives_us"][name] for r in reports]
        print(f"  {name:34s} {max(per_rank):9.1f} us  (slowest rank)")
    if args.model:
        print(f"decode of {args.tokens} tokens after a 64-token prompt (rank 0):")
        for label, fig in reports[0]["decode"].items():
            if "skipped" in fig:
                print(f"  {label:10s} skipped: {fig['skipped']}")
                continue
            peaks = ", ".join(
                f"{r['decode'][label]['peak_gb_after_load']:.2f}"
                for r in reports
                if "peak_gb_after_load" in r["decode"].get(label, {})
            )
            print(
                f"  {label:10s} decode {fig['decode_tokens_per_s']:7.2f} tokens/s, prefill "
                f"{fig['prefill_tokens_per_s']:7.1f} tokens/s, peak GB after load per rank: {peaks}"
            )


if __name__ == "__main__":
    main()
