"""Text self-attention: chunked local RoPE layers and global NoPE layers (iRoPE)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .blocked_attention import global_attention
from .config import TextConfig
from .mlx_lm_cache import scaled_dot_product_attention
from .rope import TextRoPE


class Attention(nn.Module):
    """GQA attention. RoPE layers: RoPE, then weightless RMS qk-norm (if configured), within their chunk.
    NoPE layers: no rotation, q scaled by a temperature that grows with absolute position, global causal."""

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.eps = cfg.rms_norm_eps
        self.uses_rope = cfg.uses_rope[layer]
        self.use_qk_norm = cfg.use_qk_norm and self.uses_rope
        self.temperature_tuning = cfg.attn_temperature_tuning and not self.uses_rope
        self.floor_scale = cfg.floor_scale
        self.attn_scale = cfg.attn_scale
        # Set by sharding.py when heads are split across processes: this process holds n_heads / n_kv_heads of
        # them, and o_proj's output is a partial sum over the group.
        self.group = None

        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        if self.uses_rope:
            self.rope = TextRoPE(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        # A chunked layer attends to at most one chunk of keys; a global layer's keys grow with the context.
        self.attend = scaled_dot_product_attention if self.uses_rope and cfg.attention_chunk_size else global_attention

    def _temperature(self, offset: int | mx.array, length: int) -> mx.array:
        """``1 + attn_scale * ln(floor((p + 1) / floor_scale) + 1)`` for absolute positions p; shape (L, 1),
        or (B, 1, L, 1) for per-row offsets (B,)."""
        if isinstance(offset, mx.array):
            pos = offset.astype(mx.float32)[:, None, None, None] + mx.arange(length, dtype=mx.float32)[:, None]
        else:
            pos = mx.arange(offset, offset + length, dtype=mx.float32)[:, None]
        return 1.0 + self.attn_scale * mx.log(mx.floor((pos + 1.0) / self.floor_scale) + 1.0)

    def __call__(self, x: mx.array, cache: Any) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, H, L, Dh)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, KV, L, Dh)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        offset = cache.offset  # an int; a batch cache (mlx_llama4.engine) gives each row's position, (B,)
        if self.uses_rope:
            q, k = self.rope(q, offset), self.rope(k, offset)
            if self.use_qk_norm:
                q = mx.fast.rms_norm(q, None, self.eps)
                k = mx.fast.rms_norm(k, None, self.eps)
        elif self.temperature_tuning:
            q = (q.astype(mx.float32) * self._temperature(offset, L)).astype(q.dtype)
        if isinstance(offset, mx.array):
            mask = cache.make_mask(L)  # (B, 1, 1, S): the slots each row attends to
        else:
            # Steps never cross a chunk boundary, so a causal mask (aligned to the last key) is all a layer needs.
            mask = "causal" if L > 1 else None
        k, v = cache.update_and_fetch(k, v)
        out = self.attend(q, k, v, cache=cache, scale=self.scale, mask=mask)  # float or quantized KV
        out = self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))
        return out if self.group is None else mx.distributed.all_sum(out, group=self.group)
