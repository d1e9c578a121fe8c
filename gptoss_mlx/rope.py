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
        # mx.fast.rope takes wavelengths-per-radian ("freqs"), i.e. 1 / inverse frequency.
        self._periods = 1.0 / inv_freq
        # Evaluate now: a lazy array here would be recomputed inside every traced decode step
        # (it is not a parameter, so loading never evaluates it).
        mx.eval(self._periods)

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
