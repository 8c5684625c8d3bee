"""Feed-forward blocks: dense SwiGLU and the mixture of experts (router, routed experts, shared expert)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear

from .config import TextConfig

# Below this many (token, expert) pairs, sorting costs more than it saves.
_SORT_THRESHOLD = 64


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases: Maverick's dense layers and the shared expert."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """Routed SwiGLU experts as two gather-matmuls: one over the fused gate|up weight, one over down.

    Only the rows of the selected experts are read, whether the weights are float or quantized
    (``SwitchLinear.to_quantized``). Weights are stored ``[E, out, in]`` so quantization runs along the input.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int):
        super().__init__()
        self.hidden = hidden
        self.gate_up_proj = SwitchLinear(dim, 2 * hidden, num_experts, bias=False)  # (E, 2I, D): gate | up
        self.down_proj = SwitchLinear(hidden, dim, num_experts, bias=False)  # (E, D, I)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        # x: (T, k, 1, D) expert inputs (already scaled), indices: (T, k) -> (T, k, 1, D)
        shape = indices.shape
        do_sort = indices.size >= _SORT_THRESHOLD
        if do_sort:  # group tokens by expert so each expert's weights are read once per step
            flat = indices.flatten()
            order = mx.argsort(flat)
            x, indices = x.flatten(0, 1)[order], flat[order]
        gate_up = self.gate_up_proj(x, indices, sorted_indices=do_sort)
        gate, up = mx.split(gate_up, [self.hidden], axis=-1)
        y = self.down_proj(nn.silu(gate) * up, indices, sorted_indices=do_sort)
        if do_sort:
            y = mx.unflatten(y[mx.argsort(order)], 0, shape)
        return y


class MoE(nn.Module):
    """Top-k router with sigmoid scores that scale the expert *input*, plus an always-on shared expert."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = Experts(cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts)
        self.shared_expert = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def __call__(self, x: mx.array) -> mx.array:
        # x: (B, L, D)
        logits = self.router(x)  # (B, L, E)
        if self.top_k == 1:
            indices = mx.argmax(logits, axis=-1, keepdims=True)
        else:
            indices = mx.argpartition(-logits, self.top_k - 1, axis=-1)[..., : self.top_k]
        chosen = mx.take_along_axis(logits, indices, axis=-1)  # (B, L, k)
        scores = mx.sigmoid(chosen.astype(mx.float32)).astype(x.dtype)
        # SwiGLU is not linear: the score must scale the input, not the output.
        expert_in = x[..., None, None, :] * scores[..., None, None]  # (B, L, k, 1, D)
        B, L, k = indices.shape
        routed = self.experts(expert_in.reshape(B * L, k, 1, -1), indices.reshape(B * L, k))
        routed = routed.sum(axis=(1, 2)).reshape(B, L, -1)  # (B, L, D)
        return routed + self.shared_expert(x)
