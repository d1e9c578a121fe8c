"""Aggregate decode throughput of `BatchEngine` at several batch sizes against a loop of single
`generate` calls, on a random model of chosen size (no checkpoint needed).

    python scripts/bench_batch.py --hidden 512 --layers 4 --vocab 201088 --prompts 16

Every engine run must reproduce the loop's greedy tokens exactly; the script stops otherwise.

With --via-job the prompts are JSONL text lines run the way `gptoss-mlx batch` runs them (parsed,
harmony-rendered, `BatchJob`, records written to a file), against a loop of `run_turn` (what
`gptoss-mlx generate` runs) on the same rendered prompts; greedy records must match exactly.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np

from gptoss_mlx.convert.synthetic import random_model
from gptoss_mlx.engine.batching import BatchEngine, BatchRequest
from gptoss_mlx.engine.generate import SamplingParams, generate
from gptoss_mlx.model.config import ModelConfig
from gptoss_mlx.model.transformer import GptOss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=201088)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--min-prompt", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=160)
    ap.add_argument("--max-tokens", type=int, default=48, help="the most any request generates")
    ap.add_argument("--batch-sizes", default="1,4,8,16")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy, checked exactly")
    ap.add_argument(
        "--bits",
        type=int,
        default=8,
        choices=[0, 4, 8],
        help="quantize attention, embeddings and lm_head as the q8/q4 recipes do (0: float)",
    )
    ap.add_argument(
        "--via-job", action="store_true", help="run JSONL lines through BatchJob (the CLI's path)"
    )
    args = ap.parse_args()

    cfg = ModelConfig(
        num_hidden_layers=args.layers,
        hidden_size=args.hidden,
        intermediate_size=args.hidden,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        vocab_size=args.vocab,
        sliding_window=args.window,
    )
    model = random_model(cfg, bits=args.bits or None)
    rng = np.random.default_rng(0)
    if args.via_job:
        bench_job(args, model, rng)
        return
    lengths = rng.integers(args.min_prompt, args.max_prompt + 1, args.prompts)
    budgets = rng.integers(args.max_tokens // 2, args.max_tokens + 1, args.prompts)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]
    sampling = [SamplingParams(temperature=args.temperature, seed=i) for i in range(args.prompts)]
    print(
        f"model: {args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, "
        f"{args.experts} experts top-{args.top_k}, vocab {args.vocab}, window {args.window}, "
        f"{f'q{args.bits}' if args.bits else 'float'} attention/embeddings/lm_head; "
        f"{args.prompts} prompts of {lengths.min()}..{lengths.max()} tokens, "
        f"{budgets.sum()} tokens to generate; mlx {mx.__version__}, {mx.default_device()}"
    )
    generate(model, prompts[0][:8], max_tokens=4, sampling=sampling[0])  # warm-up

    t0 = time.perf_counter()
    runs = [
        generate(model, p, max_tokens=int(n), sampling=s)
        for p, n, s in zip(prompts, budgets, sampling, strict=True)
    ]
    loop_s = time.perf_counter() - t0
    singles = [r.tokens for r in runs]
    total = sum(len(t) for t in singles)
    loop_tps = total / loop_s
    loop_dec = total / sum(r.stats.generation_seconds for r in runs)
    print(
        f"single loop : {total} tokens in {loop_s:6.2f} s = {loop_tps:7.1f} tokens/s; "
        f"decoding {loop_dec:7.1f} tokens/s"
    )

    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        engine = BatchEngine(model, batch_size=bs, stop_ids=())
        reqs = [
            BatchRequest(p, int(n), s, id=i)
            for i, (p, n, s) in enumerate(zip(prompts, budgets, sampling, strict=True))
        ]
        got = {r.id: r.tokens for r in engine.run(reqs)}
        st = engine.stats
        if args.temperature == 0 and [got[i] for i in range(len(prompts))] != singles:
            raise SystemExit(f"batch size {bs}: tokens differ from the single-sequence loop")
        print(
            f"batch {bs:3d}   : {st.completion_tokens} tokens in {st.seconds:6.2f} s = "
            f"{st.tokens_per_second:7.1f} tokens/s (x{st.tokens_per_second / loop_tps:5.2f}); "
            f"decoding {st.generation_tps:7.1f} tokens/s (x{st.generation_tps / loop_dec:5.2f}); "
            f"mean batch {st.mean_batch:.1f}, {st.steps} steps"
        )


def bench_job(args: argparse.Namespace, model: GptOss, rng: np.random.Generator) -> None:
    """The `gptoss-mlx batch` path against a loop of single `run_turn`s, in one process."""
    import io
    import json
    import tempfile
    from pathlib import Path

    from gptoss_mlx.cli.batch_files import RecordWriter, read_lines
    from gptoss_mlx.cli.batch_job import BatchDefaults, BatchJob, parse_line, render_item
    from gptoss_mlx.convert.synthetic import write_byte_level_tokenizer_json
    from gptoss_mlx.engine.chat import run_turn
    from gptoss_mlx.harmony.tokenizer import (
        find_default_vocab,
        load_default_tokenizer,
        load_tokenizer,
    )

    tmp = Path(tempfile.mkdtemp())
    if find_default_vocab() is not None:
        tok, vocab = load_default_tokenizer(), "o200k_harmony"
    else:
        write_byte_level_tokenizer_json(tmp / "tokenizer.json")
        tok, vocab = load_tokenizer(tmp), "synthetic byte-level"
    words = "the of and to in is was for on that with as by at from it an be this are".split()
    lengths = rng.integers(args.min_prompt, args.max_prompt + 1, args.prompts)
    budgets = rng.integers(args.max_tokens // 2, args.max_tokens + 1, args.prompts)
    lines = [
        {"id": i, "prompt": " ".join(rng.choice(words, int(n))), "max_tokens": int(b)}
        for i, (n, b) in enumerate(zip(lengths, budgets, strict=True))
    ]
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    defaults = BatchDefaults(sampling=SamplingParams(temperature=args.temperature))
    date = "2025-01-01"
    items = [render_item(parse_line(x, defaults), tok, date) for x in read_lines(io.BytesIO(data))]
    sizes = [len(it.prompt) for it in items]
    print(f"via BatchJob, {vocab} tokenizer: prompts of {min(sizes)}..{max(sizes)} tokens")
    run_turn(model, tok, items[0].prompt, sampling=items[0].sampling, max_tokens=4)  # warm-up
    t0 = time.perf_counter()
    singles = [
        run_turn(model, tok, it.prompt, sampling=it.sampling, max_tokens=it.max_tokens).to_json()
        for it in items
    ]
    loop_s = time.perf_counter() - t0
    total = sum(r["usage"]["completion_tokens"] for r in singles)
    loop_tps = total / loop_s
    print(f"single loop : {total} tokens in {loop_s:6.2f} s = {loop_tps:7.1f} tokens/s")
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        job = BatchJob(model, tok, defaults=defaults, batch_size=bs, date=date)
        writer = RecordWriter(open(tmp / f"out-{bs}.jsonl", "wb"), f"out-{bs}.jsonl")  # noqa: SIM115
        try:
            s = job.run(read_lines(io.BytesIO(data)), writer.write)
        finally:
            writer.close()
        got = {}
        for text in (tmp / f"out-{bs}.jsonl").read_text().splitlines():
            record = json.loads(text)
            got[record["id"]] = {k: v for k, v in record.items() if k not in ("id", "line")}
        if args.temperature == 0 and [got[i] for i in range(len(lines))] != singles:
            raise SystemExit(f"batch size {bs}: records differ from the single-turn loop")
        print(
            f"batch {bs:3d}   : {s.completion_tokens} tokens in {s.seconds:6.2f} s = "
            f"{s.tokens_per_second:7.1f} tokens/s (x{s.tokens_per_second / loop_tps:5.2f}); "
            f"mean batch {job.engine.stats.mean_batch:.1f}"
        )


if __name__ == "__main__":
    main()
