"""Independent oracles for gpt-oss, for tests only: nothing here imports gptoss_mlx.

- `read_hf_folder`: a tiny safetensors reader of our own (not the `safetensors` package, not MLX).
- `numpy_forward`: a float64 numpy forward pass written from the reference equations
  (openai/gpt-oss `gpt_oss/torch/model.py`; YaRN: https://arxiv.org/abs/2309.00071).
- `mlx_lm_forward`: mlx-lm's own gpt_oss model in float32, optionally with the reference's
  unrounded YaRN frequencies swapped in (mlx-lm floors/ceils the YaRN correction range).

Both forward passes take a Hugging Face layout folder (or its config and tensors) and return
logits [T, vocab] as float64, so a test can hold any implementation against either.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

SLIDING = "sliding_attention"

# E2M1 values indexed by a 4-bit code (sign bit is the high bit of the nibble).
FP4_VALUES = np.array(
    [+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
)

# safetensors dtype tag -> how to turn the raw little-endian bytes into numpy.
_RAW_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened to float32 below
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
}


# --------------------------------------------------------------------------- reading


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Read one .safetensors file: u64 LE header length, JSON header, then raw tensor bytes.

    BF16 becomes float32 exactly (the 16 bits are the top half of a float32); other
    dtypes keep their numpy equivalent.
    """
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        tag, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        if tag not in _RAW_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {tag}")
        raw = np.frombuffer(
            data,
            dtype=_RAW_DTYPES[tag],
            count=(end - start) // _RAW_DTYPES[tag].itemsize,
            offset=base + start,
        )
        if tag == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[name] = raw.reshape(shape).copy()
    return out


def read_hf_folder(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a Hugging Face layout folder: (config.json as a dict, every tensor of every shard).

    Shards are those named by model.safetensors.index.json's weight_map, or the single
    model.safetensors when there is no index.
    """
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        tensors.update(read_safetensors(path / shard))
    return config, tensors


# --------------------------------------------------------------------------- building blocks


def mxfp4_decode(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 -> float64. blocks [..., G, 16] uint8, scales [..., G] uint8 -> [..., G*32].

    Each byte holds two E2M1 codes, low nibble first; a group of 32 shares the E8M0 scale
    2^(scale-127). Scale 0xFF is E8M0's NaN.
    """
    blocks = np.asarray(blocks, dtype=np.uint8)
    scales = np.asarray(scales, dtype=np.uint8)
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1)  # (..., G, 16, 2)
    codes = codes.reshape(*blocks.shape[:-1], 32)  # (..., G, 32)
    exp = scales.astype(np.int64) - 127
    mult = np.where(scales == 0xFF, np.nan, np.ldexp(1.0, exp))
    values = FP4_VALUES[codes] * mult[..., None]
    return values.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


def yarn_inv_freq(
    head_dim: int,
    theta: float,
    factor: float,
    initial_context: int,
    beta_fast: float,
    beta_slow: float,
    rounded: bool = False,
) -> tuple[float, np.ndarray]:
    """(concentration, inv_freq [head_dim/2]) of YaRN RoPE, as the reference computes them.

    NTK-by-parts: dimensions below `low` keep their frequency (extrapolation), above `high`
    they are divided by `factor` (interpolation), with a linear ramp in between. The reference
    leaves low/high fractional; `rounded=True` instead reproduces mlx-lm's YarnRoPE (floor low,
    ceil high, clip to [0, head_dim-1]) so tests can confirm what they are replacing.
    """
    freq = theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factor <= 1.0:
        return 1.0, 1.0 / freq
    concentration = 0.1 * math.log(factor) + 1.0
    d_half = head_dim / 2
    low = d_half * math.log(initial_context / (beta_fast * 2 * math.pi)) / math.log(theta)
    high = d_half * math.log(initial_context / (beta_slow * 2 * math.pi)) / math.log(theta)
    if rounded:
        low, high = max(math.floor(low), 0), min(math.ceil(high), head_dim - 1)
        if low == high:
            high += 0.001
    elif not 0 < low < high < d_half - 1:
        # The reference asserts this; outside it the ramp is not what the paper describes.
        raise ValueError(f"YaRN correction range ({low:.3f}, {high:.3f}) outside (0, {d_half - 1})")
    ramp = np.clip((np.arange(d_half) - low) / (high - low), 0.0, 1.0)
    mask = 1.0 - ramp  # 1 = keep the original frequency
    inv_freq = (1.0 / (factor * freq)) * (1.0 - mask) + (1.0 / freq) * mask
    return concentration, inv_freq


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    # x (T, heads, D); cos/sin (T, D/2). Non-interleaved: first half pairs with second half.
    x1, x2 = np.split(x, 2, axis=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def _hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The hyper-parameters the forward pass needs, from Hugging Face config.json names."""
    n_layers = config["num_hidden_layers"]
    rs = config.get("rope_scaling") or {}
    layer_types = config.get("layer_types") or [
        SLIDING if i % 2 == 0 else "full_attention" for i in range(n_layers)
    ]
    return {
        "n_layers": n_layers,
        "n_heads": config["num_attention_heads"],
        "n_kv": config["num_key_value_heads"],
        "head_dim": config["head_dim"],
        "eps": config.get("rms_norm_eps", 1e-5),
        "theta": config["rope_theta"],
        "factor": rs.get("factor", 1.0),
        "initial_context": rs.get(
            "original_max_position_embeddings", config.get("initial_context_length", 4096)
        ),
        "beta_fast": rs.get("beta_fast", 32.0),
        "beta_slow": rs.get("beta_slow", 1.0),
        "window": config["sliding_window"],
        "layer_types": layer_types,
        "top_k": config.get("num_experts_per_tok", config.get("experts_per_token")),
        "limit": config.get("swiglu_limit", 7.0),
    }


# --------------------------------------------------------------------------- numpy forward


def _attention(
    x: np.ndarray, t: dict[str, np.ndarray], p: str, hp: dict[str, Any], cos, sin, sliding: bool
) -> np.ndarray:
    T = x.shape[0]
    nh, nkv, d = hp["n_heads"], hp["n_kv"], hp["head_dim"]
    q = (x @ t[p + "q_proj.weight"].T + t[p + "q_proj.bias"]).reshape(T, nh, d)
    k = (x @ t[p + "k_proj.weight"].T + t[p + "k_proj.bias"]).reshape(T, nkv, d)
    v = (x @ t[p + "v_proj.weight"].T + t[p + "v_proj.bias"]).reshape(T, nkv, d)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    # GQA: query head h reads kv head h // (nh / nkv).
    k = np.repeat(k, nh // nkv, axis=1)  # (T, nh, d)
    v = np.repeat(v, nh // nkv, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)  # (nh, Tq, Tk)
    qpos, kpos = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = kpos <= qpos
    if sliding:
        allowed &= qpos - kpos < hp["window"]
    scores = np.where(allowed[None], scores, -np.inf)
    # The sink: one extra logit per head in the softmax denominator, its weight dropped.
    sinks = np.broadcast_to(t[p + "sinks"][:, None, None], (nh, T, 1))
    w = _softmax(np.concatenate([scores, sinks], axis=-1))[..., :-1]
    out = np.einsum("hqk,khd->qhd", w, v).reshape(T, nh * d)
    return out @ t[p + "o_proj.weight"].T + t[p + "o_proj.bias"]


def _moe(x: np.ndarray, t: dict[str, np.ndarray], p: str, hp: dict[str, Any]) -> np.ndarray:
    T = x.shape[0]
    k, limit = hp["top_k"], hp["limit"]
    logits = x @ t[p + "router.weight"].T + t[p + "router.bias"]  # (T, E)
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]  # (T, k)
    weights = _softmax(np.take_along_axis(logits, top, axis=-1))  # softmax over the k only
    w1 = mxfp4_decode(t[p + "experts.gate_up_proj_blocks"], t[p + "experts.gate_up_proj_scales"])
    b1 = t[p + "experts.gate_up_proj_bias"]
    w2 = mxfp4_decode(t[p + "experts.down_proj_blocks"], t[p + "experts.down_proj_scales"])
    b2 = t[p + "experts.down_proj_bias"]
    out = np.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = np.nonzero(top == e)
        if tok.size == 0:
            continue
        h = x[tok] @ w1[e].T + b1[e]  # (n, 2I): rows interleaved gate, up, gate, up, ...
        gate = np.minimum(h[:, 0::2], limit)
        up = np.clip(h[:, 1::2], -limit, limit)
        act = gate / (1.0 + np.exp(-1.702 * gate)) * (up + 1.0)
        y = act @ w2[e].T + b2[e]  # (n, H)
        np.add.at(out, tok, y * weights[tok, slot][:, None])
    assert out.shape == (T, x.shape[1])
    return out


def numpy_forward(
    config: dict[str, Any], tensors: dict[str, np.ndarray], tokens: list[int]
) -> np.ndarray:
    """Logits [T, vocab] (float64) of gpt-oss over `tokens`, from Hugging Face names and config.

    Written from the reference equations, not from any runtime: pre-norm RMSNorm, q/k/v with
    bias, YaRN RoPE (unrounded correction range, concentration on cos/sin), attention with
    per-head sinks and a sliding window on "sliding_attention" layers, top-k MoE over MXFP4
    experts with the clamped SwiGLU, final norm and lm_head.
    """
    hp = _hparams(config)
    t = {
        k: np.asarray(v, dtype=np.float64) if v.dtype != np.uint8 else v for k, v in tensors.items()
    }
    T = len(tokens)
    conc, inv_freq = yarn_inv_freq(
        hp["head_dim"], hp["theta"], hp["factor"], hp["initial_context"],
        hp["beta_fast"], hp["beta_slow"],
    )  # fmt: skip
    angles = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]  # (T, D/2)
    cos, sin = np.cos(angles) * conc, np.sin(angles) * conc

    x = t["model.embed_tokens.weight"][np.asarray(tokens)]
    for i in range(hp["n_layers"]):
        p = f"model.layers.{i}."
        sliding = hp["layer_types"][i] == SLIDING
        h = _rms_norm(x, t[p + "input_layernorm.weight"], hp["eps"])
        x = x + _attention(h, t, p + "self_attn.", hp, cos, sin, sliding)
        h = _rms_norm(x, t[p + "post_attention_layernorm.weight"], hp["eps"])
        x = x + _moe(h, t, p + "mlp.", hp)
    x = _rms_norm(x, t["model.norm.weight"], hp["eps"])
    return x @ t["lm_head.weight"].T


# --------------------------------------------------------------------------- mlx-lm


def mlx_lm_forward(path: str | Path, tokens: list[int], unrounded_yarn: bool = True) -> np.ndarray:
    """Logits [T, vocab] (float64) from mlx-lm's own gpt_oss model, run in float32.

    Loads the Hugging Face layout folder with `mlx_lm.utils.load_model` (which splits
    gate_up_proj and keeps the experts as MLX mxfp4), casts every float parameter to float32,
    and, when `unrounded_yarn`, replaces each layer's YaRN frequencies with the reference's
    unrounded ones (mlx-lm floors/ceils the correction range). The model object is patched
    in memory only.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.models.rope_utils import YarnRoPE
    from mlx_lm.utils import load_model

    model, config = load_model(Path(path))
    hp = _hparams(config)
    if hp["limit"] != 7.0:
        # mlx-lm's SwigluOAI hard-codes limit 7; a different one would not be compared fairly.
        raise ValueError(f"mlx-lm's gpt_oss assumes swiglu_limit 7.0, config has {hp['limit']}")

    model.update(
        tree_map(
            lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a,
            model.parameters(),
        )
    )
    left = [
        a.dtype
        for _, a in tree_flatten(model.parameters())
        if mx.issubdtype(a.dtype, mx.floating) and a.dtype != mx.float32
    ]
    if left:
        raise AssertionError(f"parameters still in {set(left)} after the float32 cast")

    yarn = dict(
        head_dim=hp["head_dim"], theta=hp["theta"], factor=hp["factor"],
        initial_context=hp["initial_context"], beta_fast=hp["beta_fast"],
        beta_slow=hp["beta_slow"],
    )  # fmt: skip
    _, rounded = yarn_inv_freq(**yarn, rounded=True)
    _, unrounded = yarn_inv_freq(**yarn)
    for i, layer in enumerate(model.layers):
        rope = layer.self_attn.rope
        if not isinstance(rope, YarnRoPE):
            raise TypeError(f"layer {i}: expected mlx-lm YarnRoPE, got {type(rope).__name__}")
        # mlx-lm stores periods (1/inv_freq). Confirm they are the rounded ones we think they
        # are before replacing them, so an mlx-lm change cannot pass unnoticed.
        have = np.array(rope._freqs, dtype=np.float64)
        if not np.allclose(have, 1.0 / rounded, rtol=1e-5):
            raise AssertionError(
                f"layer {i}: mlx-lm's YaRN periods differ from the expected rounding"
            )
        if unrounded_yarn:
            rope._freqs = mx.array((1.0 / unrounded).astype(np.float32))

    logits = model(mx.array([list(tokens)], dtype=mx.int32))[0]
    mx.eval(logits)
    if logits.dtype != mx.float32:
        raise AssertionError(f"mlx-lm ran in {logits.dtype}, expected float32 after the cast")
    return np.array(logits).astype(np.float64)
