#!/usr/bin/env python3
"""A/B measurements of our engine's performance options, side by side in one process.

    python scripts/bench_variants.py -m DIR compile                # compiled vs plain decode step
    python scripts/bench_variants.py -m DIR dtype                  # float32 vs bfloat16 activations
    python scripts/bench_variants.py -m DIR fused                  # fused q/k/v and gate/up
    python scripts/bench_variants.py -m DIR prefill-chunk 128 256 512
    python scripts/bench_variants.py -m DIR sort-threshold 64 1000000000
    python scripts/bench_variants.py -m DIR threads 1 2            # matmuls split across CPU streams
    python scripts/bench_variants.py -m DIR rotation               # shared RoPE rotation vs fast.rope

Each variant is a separate engine; engines run in alternation (A, B, A, B, ...) on the same random
prompt so that a shared machine's drift hits them alike, and the table gives each variant's ratio
to the first one (median over pairs of adjacent runs). See docs/PERFORMANCE.md for the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

import gptoss_mlx.model.moe as moe
import gptoss_mlx.model.transformer as model_mod
from gptoss_mlx import load_model
from gptoss_mlx.engine import bench
from gptoss_mlx.model.attention import Attention
from gptoss_mlx.model.moe import ExpertLinear, Experts, swiglu

# --- the fused-projection experiment (not in the library: it did not pay off, see PERFORMANCE.md)


class FusedAttention(Attention):
    """Attention with q, k and v computed by one projection of the concatenated weights."""

    def project_qkv(self, x):
        nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        return mx.split(self.qkv_proj(x), [nq, nq + nk], axis=-1)


class FusedExperts(Experts):
    """Experts whose gate and up projections are one gather of the stacked [E, 2W, H] weights."""

    def __call__(self, x, experts):
        lead, K, H = experts.shape[:-1], experts.shape[-1], x.shape[-1]
        if experts.size >= moe.SORT_THRESHOLD:
            flat = experts.flatten()
            order = mx.argsort(flat)
            idx = flat[order]
            xs = x.reshape(-1, 1, H)[order // K]
            gate, up = mx.split(self.gate_up_proj(xs, None, idx, True), 2, axis=-1)
            y = self.down_proj(swiglu(gate, up, self.limit), None, idx, True)
            return y[mx.argsort(order)].reshape(*lead, K, H)
        N = experts.size // K
        idx, xs = experts.reshape(N, K), x.reshape(N, 1, H)
        tokens, pairs = moe._pair_index(N, K, True), moe._pair_index(N, K, False)
        gate, up = mx.split(self.gate_up_proj(xs, tokens, idx, False), 2, axis=-1)
        y = self.down_proj(swiglu(gate, up, self.limit), pairs, idx, False)
        return y.reshape(*lead, K, H)


def _concat_linear(parts: list[nn.Module]) -> nn.Module:
    """One (quantized) linear layer computing the given ones side by side."""
    fused = parts[0]
    names = [n for n in ("weight", "scales", "biases", "bias") if n in fused]
    for n in names:
        fused[n] = mx.concatenate([p[n] for p in parts], axis=0)
    return fused


def fuse(model) -> None:
    """Turn `model` into the fused variant in place (weights concatenated at load time)."""
    for layer in model.layers:
        att = layer.self_attn
        att.qkv_proj = _concat_linear([att.q_proj, att.k_proj, att.v_proj])
        for n in ("q_proj", "k_proj", "v_proj"):
            att.pop(n)
        att.__class__ = FusedAttention
        ex = layer.mlp.experts
        gu = ExpertLinear(1, 32, 8)
        for n in ("weight", "scales", "bias"):
            gu[n] = mx.concatenate([ex.gate_proj[n], ex.up_proj[n]], axis=1)
        ex.gate_up_proj = gu
        ex.pop("gate_proj")
        ex.pop("up_proj")
        ex.__class__ = FusedExperts
    mx.eval(model.parameters())


# --- variants ------------------------------------------------------------------------------------


def _setting(module, name: str, value) -> Callable[[], contextlib.AbstractContextManager]:
    @contextlib.contextmanager
    def ctx():
        old = getattr(module, name)
        setattr(module, name, value)
        try:
            yield
        finally:
            setattr(module, name, old)

    return ctx


def engines_for(args) -> tuple[list[bench.Engine], nn.Module]:
    """The engines to compare, and one of their models (for the setup description)."""
    compiled = not args.plain_decode
    if args.variant == "compile":
        model = load_model(args.model)
        return [
            bench.ours_engine(model, "plain", compiled=False),
            bench.ours_engine(model, "compiled", compiled=True),
        ], model
    if args.variant == "dtype":
        f32, bf16 = load_model(args.model, mx.float32), load_model(args.model, mx.bfloat16)
        return [
            bench.ours_engine(f32, "float32", compiled=compiled),
            bench.ours_engine(bf16, "bfloat16", compiled=compiled),
        ], f32
    if args.variant == "rotation":
        # One model each: a compiled decode step is traced once per model, with the setting of
        # its first run.
        models = [load_model(args.model), load_model(args.model)]
        return [
            bench.ours_engine(
                m, name, compiled=compiled, context=_setting(model_mod, "SHARED_ROTATION", v)
            )
            for m, (name, v) in zip(models, (("fast.rope", False), ("shared", True)), strict=True)
        ], models[0]
    if args.variant == "fused":
        fused = load_model(args.model)
        fuse(fused)
        plain = load_model(args.model)
        return [
            bench.ours_engine(plain, "separate", compiled=compiled),
            bench.ours_engine(fused, "fused", compiled=compiled),
        ], plain
    if not args.values:
        sys.exit(f"{args.variant}: give the values to compare")
    if args.variant == "threads":
        models = [load_model(args.model, threads=v) for v in args.values]
        return [
            bench.ours_engine(m, f"threads={v}", compiled=compiled)
            for m, v in zip(models, args.values, strict=True)
        ], models[0]
    model = load_model(args.model)
    if args.variant == "prefill-chunk":
        return [
            bench.ours_engine(model, f"chunk={v}", prefill_chunk=v, compiled=compiled)
            for v in args.values
        ], model
    return [
        bench.ours_engine(
            model, f"sort>={v}", compiled=compiled, context=_setting(moe, "SORT_THRESHOLD", v)
        )
        for v in args.values
    ], model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-m", "--model", required=True, help="a converted model folder")
    ap.add_argument(
        "variant",
        choices=[
            "compile",
            "dtype",
            "fused",
            "prefill-chunk",
            "sort-threshold",
            "threads",
            "rotation",
        ],
    )
    ap.add_argument(
        "values", nargs="*", type=int, help="prefill-chunk / sort-threshold / threads values"
    )
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--plain-decode", action="store_true", help="decode uncompiled everywhere")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    engines, model = engines_for(args)
    setup = bench.describe_model(Path(args.model), model)
    setup.update(
        variant=args.variant,
        compiled_decode=not args.plain_decode,
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        batch=args.batch,
        runs=args.runs,
    )
    ids = bench.random_prompt(model.config.vocab_size, args.batch, args.prompt_tokens)
    report = bench.compare(
        engines,
        ids,
        args.gen_tokens,
        args.runs,
        setup=setup,
        baseline=engines[0].name,
        progress=None if args.json else lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else bench.format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
