"""Feed-forward blocks: dense SwiGLU and the mixture of experts (router, routed experts, shared expert)."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear

from .config import TextConfig

# Below this many (token, expert) pairs, sorting costs more than it saves.
_SORT_THRESHOLD = 64
# From this many pairs on (a prompt, not a decode step), a process holding only some experts (sharding.py) runs
# only its own pairs: counting them waits for the router, which costs less than computing the others' pairs.
_OWN_PAIRS_THRESHOLD = 512


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases: Maverick's dense layers and the shared expert."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.group = None  # set by sharding.py for a dense layer split across processes: down's output is partial

    def __call__(self, x: mx.array) -> mx.array:
        y = self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))
        return y if self.group is None else mx.distributed.all_sum(y, group=self.group)


class Experts(nn.Module):
    """Routed SwiGLU experts as two gather-matmuls: one over the fused gate|up weight, one over down.

    Only the rows of the selected experts are read, whether the weights are float or quantized
    (``SwitchLinear.to_quantized``). Weights are stored ``[E, out, in]`` so quantization runs along the input.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int):
        super().__init__()
        self.hidden = hidden
        self.num_experts = num_experts
        self.gate_up_proj = SwitchLinear(dim, 2 * hidden, num_experts, bias=False)  # (E, 2I, D): gate | up
        self.down_proj = SwitchLinear(hidden, dim, num_experts, bias=False)  # (E, D, I)

    def __call__(self, x: mx.array, indices: mx.array, owned: Optional[mx.array] = None) -> mx.array:
        # x: (T, k, 1, D) expert inputs (already scaled), indices: (T, k) -> (T, k, 1, D). owned (T, k): with the
        # experts split across processes, the pairs routed to this process's experts; the others' inputs are 0.
        shape = indices.shape
        if owned is not None and indices.size >= _OWN_PAIRS_THRESHOLD:
            return self._own_pairs(x, indices, owned)
        do_sort = indices.size >= _SORT_THRESHOLD
        if do_sort:  # group tokens by expert so each expert's weights are read once per step
            flat = indices.flatten()
            order = mx.argsort(flat)
            x, indices = x.flatten(0, 1)[order], flat[order]
        y = self._swiglu(x, indices, do_sort)
        if do_sort:
            y = mx.unflatten(y[mx.argsort(order)], 0, shape)
        return y

    def _swiglu(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        gate_up = self.gate_up_proj(x, indices, sorted_indices=sorted_indices)
        gate, up = mx.split(gate_up, [self.hidden], axis=-1)
        return self.down_proj(nn.silu(gate) * up, indices, sorted_indices=sorted_indices)

    def _own_pairs(self, x: mx.array, indices: mx.array, owned: mx.array) -> mx.array:
        """Only the ``owned`` pairs, grouped by expert; the others' outputs are zero."""
        flat = mx.where(owned, indices, self.num_experts).flatten()  # the others' pairs sort last
        order = mx.argsort(flat)
        n = int(owned.sum().item())
        y = mx.zeros((flat.size, *x.shape[2:]), x.dtype)  # (T*k, 1, D)
        if n:
            mine = order[:n]
            y[mine] = self._swiglu(x.flatten(0, 1)[mine], flat[mine], True)
        return mx.unflatten(y, 0, indices.shape)


class MoE(nn.Module):
    """Top-k router with sigmoid scores that scale the expert *input*, plus an always-on shared expert."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = Experts(cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts)
        self.shared_expert = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        # Set by sharding.py when the experts are split across processes: this process holds the routed experts
        # [first_expert, first_expert + experts.num_experts) and a slice of the shared expert's width.
        self.group = None
        self.first_expert = 0

    def __call__(self, x: mx.array) -> mx.array:
        # x: (B, L, D)
        logits = self.router(x)  # (B, L, E)
        if self.top_k == 1:
            indices = mx.argmax(logits, axis=-1, keepdims=True)
        else:
            indices = mx.argpartition(-logits, self.top_k - 1, axis=-1)[..., : self.top_k]
        chosen = mx.take_along_axis(logits, indices, axis=-1)  # (B, L, k)
        scores = mx.sigmoid(chosen.astype(mx.float32)).astype(x.dtype)
        owned = None
        if self.group is not None:  # pairs routed to another process's experts add exactly zero here
            indices = indices.astype(mx.int32) - self.first_expert  # (argmax gives unsigned ids)
            owned = (indices >= 0) & (indices < self.experts.num_experts)  # (B, L, k)
            indices, scores = mx.where(owned, indices, 0), mx.where(owned, scores, 0)
        # SwiGLU is not linear: the score must scale the input, not the output.
        expert_in = x[..., None, None, :] * scores[..., None, None]  # (B, L, k, 1, D)
        B, L, k = indices.shape
        routed = self.experts(expert_in.reshape(B * L, k, 1, -1), indices.reshape(B * L, k),
                              None if owned is None else owned.reshape(B * L, k))
        out = routed.sum(axis=(1, 2)).reshape(B, L, -1) + self.shared_expert(x)  # (B, L, D)
        return out if self.group is None else mx.distributed.all_sum(out, group=self.group)
