"""One piece of a prompt's prefill, run alike by the engine (process 0) and by its followers (follower.py), so
that every process of a split model feeds the same positions in the same forward passes."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import mlx.core as mx

from ..mlx_lm_cache import maybe_quantize_kv_cache
from ..model import Model


def feed_piece(model: Model, ids: Sequence[int], embeddings: Optional[mx.array], caches: list[Any], last: bool,
               kv_bits: Optional[int], kv_group_size: Optional[int]) -> mx.array:
    """Feed the prompt positions ``ids`` (n,) (``embeddings`` (n, D) when they hold images) into ``caches``,
    quantizing the KV as mlx-lm's generate_step does. A piece that is not the ``last`` is evaluated here and
    MLX's buffer cache freed, so the next piece starts from bounded memory. Returns the logits (1, n, V)."""
    logits = model.language_model(mx.array(ids)[None], cache=caches,
                                  input_embeddings=None if embeddings is None else embeddings[None])
    maybe_quantize_kv_cache(caches, 0, kv_group_size, kv_bits)
    if not last:
        mx.eval([c.state for c in caches])
        mx.clear_cache()
    return logits
