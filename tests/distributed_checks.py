"""What the multi-process tests measure, for a sharded model and for the unsharded reference alike.

Run under `mlx.launch` as a script (`python tests/distributed_checks.py SPEC OUT`): every rank
joins the group with `mx.distributed.init(strict=True)` (through engine/distributed.join, which is
strict under a launcher, and the size is checked against SPEC), loads its share of each model in
each mode, runs `measure` and writes what it saw to OUT/rank{r}-{model}-{mode}.npz. The test
process runs the same `measure` on the unsharded model and compares.

`measure` covers what the issue lists: logits of a prompt in one pass and in chunks, decode steps
across the sliding window (plain and compiled), rows of a batch cache joining and decoding, a
prompt cache reused after a checkpoint rewind, and greedy and seeded token streams (engine
`generate`, the batch engine).
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from gptoss_mlx.engine.batching import BatchEngine, BatchRequest, merge_caches
from gptoss_mlx.engine.generate import SamplingParams, generate, generate_tokens, prefill
from gptoss_mlx.engine.prompt_cache import PromptCache
from gptoss_mlx.model.compiled_decode import CompiledDecoder

GREEDY = SamplingParams(temperature=0.0)


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def tokens(n: int, vocab: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def measure(model: Any, window: int, full: bool = True) -> dict[str, Any]:
    """Logits (float32 arrays) and token lists of `model`; `full=False` is the short version for
    runs over 4 ranks on a shared 2-core machine, where every collective is slow."""
    vocab = model.config.vocab_size
    T = 2 * window + 5  # past the window twice
    seq = tokens(T + 12, vocab, seed=1)
    out: dict[str, Any] = {}
    if not full:
        # Prefill past the window in one pass, then three decode steps and two greedy tokens.
        cache = model.make_cache()
        steps = [model(mx.array([seq[: window + 2]]), cache=cache)[0]]
        for t in seq[window + 2 : window + 5]:
            mx.eval(steps[-1])
            steps.append(model(mx.array([[t]]), cache=cache)[0])
        out["chunked"] = _np(mx.concatenate(steps))
        out["greedy"] = generate(model, seq[:window], max_tokens=2, sampling=GREEDY).tokens
        return out
    # One pass over the prompt.
    out["prefill"] = _np(model(mx.array([seq[:T]]))[0])
    # The same prompt in chunks of 5 into a cache, then one token at a time across the window.
    cache = model.make_cache()
    steps = []
    for i in range(0, window + 3, 5):
        steps.append(model(mx.array([seq[i : min(i + 5, window + 3)]]), cache=cache)[0])
        mx.eval(steps[-1])
    for i in range(window + 3, T):
        steps.append(model(mx.array([[seq[i]]]), cache=cache)[0])
        mx.eval(steps[-1])
    out["chunked"] = _np(mx.concatenate(steps))
    out["greedy"] = generate(model, seq[:T], max_tokens=6, sampling=GREEDY).tokens
    # Decode steps under mx.compile (the engine's decoder), teacher-forced through the window.
    cache = model.make_cache()
    prefill(model, seq[:5], cache)
    decoder = CompiledDecoder.start(model, cache)
    logits = []
    for t in seq[5 : 5 + window + 4]:
        logits.append(decoder.step(mx.array([t], dtype=mx.uint32)))
        mx.eval(logits[-1])
    decoder.finish()
    out["compiled"] = _np(mx.concatenate(logits))
    # Seeded sampling: rank 0's draw, shared, equals the unsharded draw with the same seed.
    seeded = SamplingParams(temperature=1.0, seed=3)
    out["seeded"] = generate(model, seq[:T], max_tokens=6, sampling=seeded).tokens
    out["batch"] = _np(batch_logits(model, seq, window))
    requests = [
        BatchRequest(seq[:n], max_tokens=m, sampling=GREEDY, id=n)
        for n, m in ((3, 5), (T, 4), (window + 1, 6))
    ]
    engine = BatchEngine(model, batch_size=2, stop_ids=())
    results = {r.id: r.tokens for r in engine.run(requests)}
    out["engine"] = [results[r.id] for r in requests]
    out["reuse"] = _np(reused(model, seq, window))
    return out


def batch_logits(model: Any, seq: list[int], window: int) -> mx.array:
    """Two sequences prefilled alone, merged into mlx-lm's batch caches, a third joining later;
    the logits of every decode step [steps, rows, vocab] (the batch engine's forward passes)."""
    starts = [3, window + 2, 6]
    singles = []
    for n in starts[:2]:
        singles.append(model.make_cache())
        mx.eval(prefill(model, seq[:n], singles[-1]))
    cache = merge_caches(singles)
    pos = starts[:2]
    out = []
    for step in range(window + 2):
        if step == 2:  # a row joins mid-way
            joining = model.make_cache()
            mx.eval(prefill(model, seq[: starts[2]], joining))
            for mine, theirs in zip(cache, merge_caches([joining]), strict=True):
                mine.extend(theirs)
            pos = pos + [starts[2]]
        feed = mx.array([[seq[p]] for p in pos])
        logits = model(feed, cache=cache)[:, -1]
        mx.eval(logits)
        out.append(mx.pad(logits, [(0, 3 - logits.shape[0]), (0, 0)]))
        pos = [p + 1 for p in pos]
    return mx.stack(out)


def reused(model: Any, seq: list[int], window: int) -> mx.array:
    """A chat's prompt cache: turn 1 prefills and generates; turn 2's prompt shares only part of
    it, so the cache rewinds to a checkpoint and prefills the rest. The logits of turn 2's last
    prompt token, and of 3 decode steps after it."""
    pc = PromptCache(model)
    first = seq[: window + 4]
    pc.prepare(first)
    mx.eval(prefill(model, first, pc.cache))
    pc.checkpoint(first)
    fed = [seq[window + 4]]
    fed += list(generate_tokens(model, fed, max_tokens=3, sampling=GREEDY, cache=pc.cache))
    pc.record(fed)  # the cache holds all but the last generated token
    second = first + tokens(window, model.config.vocab_size, seed=9)
    reused_n = pc.prepare(second)
    assert reused_n == len(first), (reused_n, len(first))
    out = [prefill(model, second[reused_n:], pc.cache)]
    for t in tokens(3, model.config.vocab_size, seed=10):
        out.append(model(mx.array([[t]]), cache=pc.cache)[0, -1])
        mx.eval(out[-1])
    return mx.stack(out)


def save(path: Path, results: dict[str, Any]) -> None:
    arrays = {k: v for k, v in results.items() if isinstance(v, np.ndarray)}
    lists = {k: v for k, v in results.items() if not isinstance(v, np.ndarray)}
    np.savez(path, **arrays, tokens=np.array(json.dumps(lists)))


def load(path: Path) -> dict[str, Any]:
    with np.load(path) as data:
        out = {k: data[k] for k in data.files if k != "tokens"}
        out.update(json.loads(str(data["tokens"])))
    return out


def main(spec_path: str, out_dir: str) -> None:
    """Under mlx.launch: every rank measures its share of each model in each mode."""
    from gptoss_mlx.engine.distributed import Cluster, join
    from gptoss_mlx.engine.runtime import load_for_inference

    spec = json.loads(Path(spec_path).read_text())
    threads = spec.get("cpu_streams", 1)
    if threads > 1:  # each rank also spreads its matmuls over CPU streams (cpu_streams.py)
        from gptoss_mlx.model import cpu_streams

        cpu_streams.MIN_ROWS_PER_SHARD = 16
    cluster = join(spec["modes"][0], timeout=spec.get("timeout", 120))
    assert cluster is not None and cluster.size == spec["ranks"], "no group of the expected size"
    out = Path(out_dir)
    for name, folder in spec["models"].items():
        for mode in spec["modes"]:
            this = Cluster(cluster.group, mode, cluster.timeout)
            mx.reset_peak_memory()
            model, _, _ = load_for_inference(
                folder, 4096, dtype=mx.float32, threads=threads, cluster=this
            )
            model.heartbeat = cluster.beat
            loaded_peak = mx.get_peak_memory()
            results = measure(model, spec["window"], full=spec["full"])
            results["peak_after_load"] = [loaded_peak]
            save(out / f"rank{cluster.rank}-{name}-{mode}.npz", results)
            del model
            gc.collect()
            mx.clear_cache()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
