"""The MLX model against independent oracles, on tiny random checkpoints in the real layout.

Oracles (tests/oracles.py, written from the reference equations, not from gptoss_mlx): a float64
numpy forward pass, and mlx-lm's own gpt_oss model with its YaRN correction range unrounded.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_tiny_config
from gptoss_mlx import load_model
from gptoss_mlx.convert.convert import convert
from gptoss_mlx.convert.synthetic import write_hf_checkpoint
from gptoss_mlx.errors import CheckpointError
from gptoss_mlx.model import transformer as model_module
from gptoss_mlx.model.rope import YarnRoPE, rotate, yarn_inv_freq
from oracles import mlx_lm_forward, numpy_forward, read_hf_folder

# head_dim 64 like the real model, so YaRN's ramp spans real dimensions.
WIDE = dict(head_dim=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=2048)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=[128, 8], ids=["window128", "window8"])
def lossless(request, tmp_path_factory) -> tuple[Path, Path]:
    """(HF source, lossless float32 conversion) of a 4-layer model with the given window."""
    root = tmp_path_factory.mktemp(f"w{request.param}")
    cfg = make_tiny_config(num_hidden_layers=4, sliding_window=request.param, **WIDE)
    src = write_hf_checkpoint(root / "hf", cfg, seed=1)
    out = root / "mlx"
    convert(src, out, recipe="mxfp4-bf16", dtype="float32", progress=False)
    return src, out


def prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


@pytest.mark.parametrize("shared_rotation", [True, False], ids=["shared-rotation", "fast-rope"])
def test_logits_match_numpy_float64_reference(lossless, monkeypatch, shared_rotation):
    # Both ways of rotating q and k (the CPU default and the GPU default) against the reference.
    monkeypatch.setattr(model_module, "SHARED_ROTATION", shared_rotation)
    src, out = lossless
    config, tensors = read_hf_folder(src)
    toks = prompt(300, config["vocab_size"])
    ref = numpy_forward(config, tensors, toks)
    model = load_model(out, dtype=mx.float32)
    ours = np.array(model(mx.array([toks]))[0], dtype=np.float64)
    err = rel_err(ours, ref)
    assert err <= 1e-4, f"relative max error {err:.2e} vs the float64 reference"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_shared_rotation_is_as_accurate_as_fast_rope(dtype):
    # One offset (int or scalar array, as the compiled decode step keeps it) and one per row
    # (mlx-lm's batch caches), up to positions far into the 131k context, where float32 angles
    # lose digits in both: each is compared with the rotation computed in float64.
    cfg = make_tiny_config(head_dim=64)
    rope = YarnRoPE(cfg)
    inv_freq = np.array(yarn_inv_freq(cfg)[0], dtype=np.float64)
    x = mx.random.normal((3, 4, 5, 64), key=mx.random.key(0)).astype(dtype)
    xs = np.array(x.astype(mx.float32), dtype=np.float64)
    for offset in (0, 77, mx.array(4000), mx.array([0, 7, 130000])):
        starts = np.broadcast_to(np.array(offset), (3,))
        theta = (starts[:, None] + np.arange(5))[:, None, :, None] * inv_freq  # (3, 1, 5, 32)
        x1, x2 = xs[..., :32], xs[..., 32:]
        cos, sin = np.cos(theta), np.sin(theta)
        truth = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        got = rotate(x, rope.rotation(offset, x.shape[2]))
        assert got.dtype == dtype and got.shape == x.shape
        fast = np.array(rope(x, offset).astype(mx.float32))
        ours = np.array(got.astype(mx.float32))
        for row in range(3):
            err_fast = np.abs(fast[row] - truth[row]).max()
            err_ours = np.abs(ours[row] - truth[row]).max()
            assert err_ours <= 1.5 * err_fast + 1e-5, (offset, row, err_ours, err_fast)


def test_logits_match_mlx_lm_with_unrounded_yarn(lossless):
    src, out = lossless
    config, _ = read_hf_folder(src)
    toks = prompt(300, config["vocab_size"], seed=1)
    theirs = mlx_lm_forward(src, toks, unrounded_yarn=True)
    ours = np.array(load_model(out, dtype=mx.float32)(mx.array([toks]))[0], dtype=np.float64)
    err = rel_err(ours, theirs)
    assert err <= 1e-4, f"relative max error {err:.2e} vs mlx-lm"
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_incremental_and_chunked_prefill_equal_one_pass(lossless):
    _, out = lossless
    model = load_model(out, dtype=mx.float32)
    toks = mx.array([prompt(300, model.config.vocab_size, seed=2)])
    full = model(toks)
    # prefill 150, then one token at a time
    cache = model.make_cache()
    parts = [model(toks[:, :150], cache=cache)]
    parts += [model(toks[:, i : i + 1], cache=cache) for i in range(150, 300)]
    step = mx.concatenate(parts, axis=1)
    # chunks of 37 tokens (crossing the window boundary at odd places)
    cache = model.make_cache()
    chunked = mx.concatenate(
        [model(toks[:, i : i + 37], cache=cache) for i in range(0, 300, 37)], axis=1
    )
    scale = mx.abs(full).max().item()
    assert mx.abs(step - full).max().item() / scale <= 1e-5
    assert mx.abs(chunked - full).max().item() / scale <= 1e-5
    assert cache[0].offset == 300


def test_last_only_equals_last_row(lossless):
    _, out = lossless
    model = load_model(out, dtype=mx.float32)
    toks = mx.array([prompt(40, model.config.vocab_size, seed=3)])
    assert mx.allclose(model(toks, last_only=True)[:, 0], model(toks)[:, -1], atol=1e-5)


def test_batch_rows_are_independent(lossless):
    _, out = lossless
    model = load_model(out, dtype=mx.float32)
    a = prompt(50, model.config.vocab_size, seed=4)
    b = prompt(50, model.config.vocab_size, seed=5)
    both = model(mx.array([a, b]))
    assert mx.allclose(both[1], model(mx.array([b]))[0], atol=1e-4)


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipes")
    # Every expert active (top-4 of 4): with random weights the router's near-ties would
    # otherwise flip under any perturbation and hide the quantization error itself.
    cfg = make_tiny_config(
        num_hidden_layers=2,
        hidden_size=128,
        intermediate_size=128,
        num_local_experts=4,
        num_experts_per_tok=4,
        **WIDE,
    )
    src = write_hf_checkpoint(root / "hf", cfg, seed=2)
    outs = {"source": src}
    for recipe in ("mxfp4-bf16", "mxfp4-q8", "mxfp4-q4"):
        outs[recipe] = root / recipe
        convert(src, outs[recipe], recipe=recipe, dtype="bfloat16", progress=False)
    return outs


def test_every_recipe_loads_with_finite_logits_and_bounded_error(recipes):
    """q8 and q4 quantize embeddings, attention and lm_head (affine, group 64); their error
    against the lossless recipe is the price of the smaller files. Measured on this random model
    (relative to its max |logit| of ~1, which flatters nothing): q8 2.1%, q4 27%. 4-bit steps are
    16x coarser than 8-bit ones, so q4's error must be several times q8's."""
    toks = mx.array([prompt(64, 2048, seed=6)])
    logits = {}
    for recipe in ("mxfp4-bf16", "mxfp4-q8", "mxfp4-q4"):
        out = np.array(load_model(recipes[recipe], dtype=mx.float32)(toks)[0], dtype=np.float64)
        assert np.isfinite(out).all(), recipe
        logits[recipe] = out
    q8 = rel_err(logits["mxfp4-q8"], logits["mxfp4-bf16"])
    q4 = rel_err(logits["mxfp4-q4"], logits["mxfp4-bf16"])
    print(f"\nrelative max error vs lossless: q8 {q8:.4f}, q4 {q4:.4f}")
    assert 0 < q8 < 0.05
    assert 4 * q8 < q4 < 0.5


def test_bfloat16_activations_stay_close(recipes):
    toks = mx.array([prompt(64, 2048, seed=7)])
    f32 = np.array(load_model(recipes["mxfp4-bf16"], dtype=mx.float32)(toks)[0], dtype=np.float64)
    bf16 = load_model(recipes["mxfp4-bf16"], dtype=mx.bfloat16)(toks)[0]
    assert bf16.dtype == mx.bfloat16
    assert rel_err(np.array(bf16.astype(mx.float32), dtype=np.float64), f32) < 0.05


def test_load_refuses_changed_or_missing_files(recipes, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(recipes["mxfp4-q8"], folder)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    with open(shard, "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(folder)
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"missing"):
        load_model(folder)


def test_load_refuses_a_folder_that_is_not_converted(recipes):
    with pytest.raises(CheckpointError, match="gptoss-mlx convert"):
        load_model(recipes["source"])
