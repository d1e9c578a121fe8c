#!/usr/bin/env python3
"""Print the parity figures of the model against the independent oracles (tests/oracles.py).

    python scripts/parity_report.py

Lossless recipe in float32, 4-layer random checkpoints (head_dim 64), 300-token prompts with
sliding windows 128 and 8: relative max error and argmax agreement against a float64 numpy
reference and mlx-lm with the reference (unrounded) YaRN. The tests assert the same bounds.
"""

import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "tests"))
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from conftest import make_tiny_config
from gptoss_mlx import load_model
from gptoss_mlx.convert.convert import convert
from gptoss_mlx.convert.synthetic import write_hf_checkpoint
from oracles import mlx_lm_forward, numpy_forward, read_hf_folder

root = Path(tempfile.mkdtemp())
for w in (128, 8):
    cfg = make_tiny_config(
        num_hidden_layers=4,
        sliding_window=w,
        head_dim=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=2048,
    )
    src = write_hf_checkpoint(root / f"hf{w}", cfg, seed=1)
    out = root / f"mlx{w}"
    convert(src, out, recipe="mxfp4-bf16", dtype="float32", progress=False)
    config, tensors = read_hf_folder(src)
    toks = np.random.default_rng(0).integers(0, 2048, 300).tolist()
    ref = numpy_forward(config, tensors, toks)
    lm = mlx_lm_forward(src, toks, unrounded_yarn=True)
    ours = np.array(load_model(out, dtype=mx.float32)(mx.array([toks]))[0], dtype=np.float64)
    e1 = np.abs(ours - ref).max() / np.abs(ref).max()
    e2 = np.abs(ours - lm).max() / np.abs(lm).max()
    print(
        f"window {w}, 300 tokens: vs numpy f64 {e1:.2e} (argmax equal {(ours.argmax(-1) == ref.argmax(-1)).all()}), vs mlx-lm unrounded {e2:.2e} (argmax equal {(ours.argmax(-1) == lm.argmax(-1)).all()})"
    )
