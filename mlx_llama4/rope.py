"""Rotary position embeddings.

Llama 4 rotates *adjacent pairs* ``(x[2i], x[2i+1])`` as complex numbers (MLX ``traditional=True``), not the
rotate-half layout: Hugging Face's conversion keeps Meta's q/k row order.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn


def llama3_inv_freq(inv_freq: mx.array, scaling: dict) -> mx.array:
    """Apply llama3 frequency scaling: long wavelengths are divided by ``factor``, short ones kept, smooth between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = mx.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    if high != low:  # with low == high (Scout) the smooth band is empty
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        scaled = mx.where(in_band, blended, scaled)
    return scaled


class TextRoPE(nn.Module):
    """Interleaved-pair RoPE over the whole head, with optional llama3 scaling, at absolute positions."""

    def __init__(self, head_dim: int, theta: float, scaling: Optional[dict]):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = 1.0 / (theta ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim))
        if scaling is not None:
            inv_freq = llama3_inv_freq(inv_freq, scaling)
        # mx.fast.rope takes periods (angle = position / freq), the reciprocal of inv_freq.
        self._periods = 1.0 / inv_freq
        # Evaluated now: MLX runs a lazy array on the stream of the thread that built it, and the model may
        # run on another thread (the engine's, the app's).
        mx.eval(self._periods)

    def __call__(self, x: mx.array, offset: int | mx.array) -> mx.array:
        # x: (B, H, L, Dh); positions offset .. offset + L - 1, offset an int or one per row (B,)
        return mx.fast.rope(
            x, self.head_dim, traditional=True, base=None, scale=1.0, offset=offset, freqs=self._periods
        )
