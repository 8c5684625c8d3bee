"""Tensor and expert parallelism: how the model splits across the N processes of an ``mx.distributed`` group,
and which slice of each checkpoint tensor a process owns (README.md, "Several Macs").

Process r of N holds:

- attention: query heads ``[r*H/N, (r+1)*H/N)`` and KV heads ``[r*KV/N, (r+1)*KV/N)``, i.e. those rows of
  q/k/v_proj and the matching input columns of o_proj. A query head h reads KV head ``h // (H/KV)``, so a
  process's query heads read only its own KV heads, and its caches hold only those. o_proj's output is a partial
  sum: one ``all_sum`` per layer;
- MoE layers: the routed experts ``[r*E/N, (r+1)*E/N)``, whole (expert parallelism); the router whole, so every
  process routes every token alike and counts the pairs routed to another process's experts as zero; the shared
  expert split like a dense MLP. Routed and shared partial outputs go through one ``all_sum``;
- dense MLP layers: rows of gate/up, input columns of down, one ``all_sum``;
- everything else whole: embeddings, norms, router, lm_head, the vision tower and the projector.

A row split reads only its rows from the files (``weights.Entry.read``: output rows, or experts); an input-axis
split (o_proj, down_proj) reads the tensor and keeps its columns. Loading thus holds this process's share plus
one tensor. Quantized tensors split along the input only on quantization-group boundaries (their scales split
into N equal parts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from .config import TextConfig
from .moe import Experts, MoE, SwiGLU
from .weights import CheckpointError, Entry, Getter

PARALLEL_MODES = ("tensor", "pipeline")


class ShardingError(ValueError):
    """A model that cannot be split across the processes of a group; the message names the numbers."""


@dataclass(frozen=True)
class Sharding:
    """How a loaded model is split across ``group``: ``mode`` "tensor" (heads, experts and MLP widths) or
    "pipeline" (layers). The group's processes must make the same calls in step."""

    group: mx.distributed.Group
    mode: str

    @property
    def size(self) -> int:
        return self.group.size()


def check_tensor_split(cfg: TextConfig, n: int) -> None:
    """Raise a ``ShardingError`` naming every size of ``cfg`` that ``n`` processes cannot share evenly."""
    sizes = [("num_attention_heads", cfg.num_attention_heads), ("num_key_value_heads", cfg.num_key_value_heads)]
    if cfg.moe_layers:
        sizes += [("num_local_experts", cfg.num_local_experts),
                  ("intermediate_size (the shared expert's width)", cfg.intermediate_size)]
    if len(cfg.moe_layers) < cfg.num_hidden_layers:
        sizes.append(("intermediate_size_mlp (the dense layers' width)", cfg.intermediate_size_mlp))
    bad = [f"{name} = {value}" for name, value in sizes if value % n]
    if bad:
        raise ShardingError(
            f"cannot split this model across {n} processes by tensor parallelism: {', '.join(bad)} "
            f"{'is' if len(bad) == 1 else 'are'} not a multiple of {n}. Use a process count that divides them, "
            "or --parallel pipeline (layers split across processes)"
        )


# Our tensor names -> the axis a process's share is cut along: 0 (output rows, or experts) or -1 (the input).
_LAYER = r"^language_model\.model\.layers\.\d+\."
_SPLITS = (
    (re.compile(_LAYER + r"self_attn\.[qkv]_proj\.weight$"), 0),
    (re.compile(_LAYER + r"self_attn\.o_proj\.weight$"), -1),
    (re.compile(_LAYER + r"feed_forward\.(shared_expert\.)?(gate|up)_proj\.weight$"), 0),
    (re.compile(_LAYER + r"feed_forward\.(shared_expert\.)?down_proj\.weight$"), -1),
    (re.compile(_LAYER + r"feed_forward\.experts\.(gate_up|down)_proj\.weight$"), 0),
)


def split_axis(name: str) -> Optional[int]:
    """The axis along which ``name`` (a planned entry: a weight, with its scales and biases) is split, or None
    for a tensor every process holds whole."""
    return next((axis for pattern, axis in _SPLITS if pattern.match(name)), None)


def _part(entry: Entry, name: str, axis: int, rank: int, n: int) -> tuple[int, int]:
    """Process ``rank``'s range along ``axis`` of the tensor ``name`` that ``entry`` yields."""
    size = entry.outputs[name].shape[axis]
    if size % n:
        if axis == 0:
            what = "experts" if ".experts." in name else "rows"
        else:
            what = "quantization groups along the input" if name.endswith((".scales", ".biases")) else "input columns"
        raise CheckpointError(f"{name}: its {size} {what} cannot be split evenly across {n} processes")
    step = size // n
    return rank * step, (rank + 1) * step


class TensorParallel:
    """Process ``group.rank()``'s share of the model for tensor and expert parallelism (module docstring)."""

    mode = "tensor"

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.rank, self.size = group.rank(), group.size()

    def apply(self, model, entries: list[Entry]) -> None:
        """Give ``model`` (built, not loaded) this process's shapes: fewer heads, its experts, a slice of each
        MLP's width, and the group that sums the partial outputs."""
        cfg = model.config.text
        check_tensor_split(cfg, self.size)
        for entry in entries:  # every tensor splits evenly (quantized: whole groups), checked before any is read
            axis = split_axis(entry.name)
            if axis is not None:
                for name in entry.outputs:
                    _part(entry, name, axis, self.rank, self.size)
        n, d, head = self.size, cfg.hidden_size, cfg.head_dim
        for layer in model.layers:
            attn = layer.self_attn
            attn.n_heads, attn.n_kv_heads = cfg.num_attention_heads // n, cfg.num_key_value_heads // n
            attn.q_proj = nn.Linear(d, attn.n_heads * head, bias=False)
            attn.k_proj = nn.Linear(d, attn.n_kv_heads * head, bias=False)
            attn.v_proj = nn.Linear(d, attn.n_kv_heads * head, bias=False)
            attn.o_proj = nn.Linear(attn.n_heads * head, d, bias=False)
            attn.group = self.group
            if isinstance(layer.feed_forward, MoE):
                moe, local = layer.feed_forward, cfg.num_local_experts // n
                moe.experts = Experts(d, cfg.intermediate_size, local)
                moe.first_expert = self.rank * local
                moe.shared_expert = SwiGLU(d, cfg.intermediate_size // n)  # summed with the experts, by the MoE
                moe.group = self.group
            else:
                layer.feed_forward = SwiGLU(d, cfg.intermediate_size_mlp // n)
                layer.feed_forward.group = self.group

    def read(self, entry: Entry, get: Getter) -> dict[str, mx.array]:
        """This process's part of ``entry``'s tensors, read through ``get`` (rows from the files)."""
        axis = split_axis(entry.name)
        if axis is None:
            return entry.read(get, None, None)
        if axis == 0:
            return entry.read(get, *_part(entry, entry.name, 0, self.rank, self.size))
        out = {}
        for name, array in entry.read(get, None, None).items():
            a, b = _part(entry, name, -1, self.rank, self.size)
            out[name] = mx.contiguous(array[..., a:b])  # a copy, so that the whole tensor can be freed
        return out


def rank0_sampler(sampler: Callable[[mx.array], mx.array], group: mx.distributed.Group):
    """``sampler``, but every process gets process 0's token. Equal logits can still draw different tokens (each
    process's random state; another chip's rounding), and every process must feed the same one."""

    def sample(logprobs: mx.array) -> mx.array:
        if group.rank() == 0:
            token = sampler(logprobs).astype(mx.uint32)
        else:  # after the step's other collectives, as on process 0, where the token depends on them
            token = mx.depends(mx.zeros(logprobs.shape[:-1], mx.uint32), logprobs)
        return mx.distributed.all_sum(token, group=group)

    return sample


def process_group() -> Optional[mx.distributed.Group]:
    """The processes ``mlx.launch`` started (README.md, "Several Macs"), or None when this is the only one."""
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def everywhere(model, flag: bool) -> bool:
    """Whether ``flag`` holds in every process of a split model (just ``flag`` for a whole one): for choices the
    processes must make alike, such as reading a file each machine must have."""
    if model.sharding is None:
        return flag
    group = model.sharding.group
    return mx.distributed.all_sum(mx.array([int(flag)]), group=group).item() == group.size()
