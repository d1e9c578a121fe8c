"""Rotary position embedding with YaRN, computed exactly as the gpt-oss reference does.

YaRN (https://arxiv.org/abs/2309.00071) stretches RoPE from 4096 to 131072 positions: "NTK by parts"
interpolates the low-frequency dimensions by the scaling factor, keeps the high-frequency ones, and
ramps linearly in between. The reference does *not* round the ramp's end points (HF `truncate:
false`); mlx-lm does (floor/ceil), which moves logits visibly from ~64 tokens on.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig


def yarn_inv_freq(cfg: ModelConfig) -> tuple[mx.array, float]:
    """Return (inverse frequencies [head_dim/2] as float32, concentration) for `cfg`."""
    d = cfg.head_dim
    freq = cfg.rope_theta ** (mx.arange(0, d, 2, dtype=mx.float32) / d)
    factor = cfg.rope_scaling_factor
    if factor <= 1.0:
        return 1.0 / freq, 1.0
    d_half = d / 2

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength fits `num_rotations` times into the original context.
        ctx = cfg.initial_context_length
        return d_half * math.log(ctx / (num_rotations * 2 * math.pi)) / math.log(cfg.rope_theta)

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if high == low:  # degenerate configs: avoid dividing by zero, as a ramp of width ~0
        high = low + 1e-3
    ramp = mx.clip((mx.arange(d_half, dtype=mx.float32) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1 where the original (extrapolated) frequency is kept
    inv_freq = (1.0 / (factor * freq)) * (1.0 - keep) + (1.0 / freq) * keep
    concentration = 0.1 * math.log(factor) + 1.0
    return inv_freq, concentration


class YarnRoPE(nn.Module):
    """Non-interleaved (half-split) rotary embedding with YaRN frequencies.

    The reference multiplies cos and sin by the YaRN "concentration" c for both q and k, which
    scales every attention logit by c**2. Rotation is linear, so we leave q and k unscaled and fold
    c**2 into the attention scale instead (see `Attention`): two fewer multiplies per layer.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.concentration = yarn_inv_freq(cfg)
        self.dims = cfg.head_dim
        self._inv_freq = inv_freq
        # mx.fast.rope takes wavelengths-per-radian ("freqs"), i.e. 1 / inverse frequency.
        self._periods = 1.0 / inv_freq
        # Evaluate now: lazy arrays here would be recomputed inside every traced decode step
        # (they are not parameters, so loading never evaluates them).
        mx.eval(self._inv_freq, self._periods)

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._periods,
        )

    def rotation(self, offset: int | mx.array, length: int) -> tuple[mx.array, mx.array]:
        """cos and sin (float32) of the angles at positions offset .. offset+length-1, for
        `rotate`: [length, head_dim/2] for one offset (an int or a scalar array), or
        [B, 1, length, head_dim/2] for one offset per sequence (an array [B], as mlx-lm's batch
        caches keep them).

        On MLX's CPU backend `mx.fast.rope` has no kernel of its own: it expands into about twenty
        operations (positions, angles, cos, sin, ...) at every call, i.e. twice per layer. The
        model computes the rotation once per forward pass and shares it across layers and q/k
        instead: a traced 4-layer decode step drops from 458 to 408 operations
        (`scripts/count_decode_ops.py` with and without `--fast-rope`).
        """
        steps = mx.arange(length)
        if isinstance(offset, mx.array) and offset.ndim == 1:
            pos = (offset[:, None] + steps)[:, None, :, None]  # (B, 1, L, 1): over the heads
        else:
            pos = (steps + offset)[:, None]  # (L, 1)
        theta = pos.astype(mx.float32) * self._inv_freq
        return mx.cos(theta), mx.sin(theta)


def rotate(x: mx.array, rotation: tuple[mx.array, mx.array]) -> mx.array:
    """x [..., L, head_dim] rotated half-split style (as mx.fast.rope with traditional=False) by
    a `YarnRoPE.rotation` for its L positions."""
    cos, sin = rotation
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
