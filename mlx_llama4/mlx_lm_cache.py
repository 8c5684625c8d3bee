"""mlx-lm's KV-cache protocol as mlx-llama4 relies on it: the one module that touches its undocumented parts.

Our caches (``cache.ChunkCache``, ``engine.batch_cache.BatchKV``) plug into mlx-lm's attention and generation
code, which reads them through a protocol mlx-lm does not document. We rely on these points, each checked by
``tests/test_mlx_lm_contract.py`` against the installed mlx-lm, whose tested range pyproject.toml pins:

1. ``_BaseCache`` (private): the base class of every mlx-lm cache. ``from_state`` builds a cache from its
   ``state`` without calling ``__init__`` (``load_prompt_cache`` rebuilds caches that way).
2. ``scaled_dot_product_attention(q, k, v, cache, scale, mask)`` runs quantized attention when the cache has a
   ``bits`` attribute (reading its ``group_size``), the keys and values being ``(packed, scales, biases)``
   triples of ``mx.quantize``; otherwise MLX's fused attention. ``mask`` may be None, ``"causal"`` or an array.
   (The quantized path scales the queries array it is given in place: pass a temporary.)
3. ``generate_step(..., kv_bits, kv_group_size, quantized_kv_start)`` calls ``maybe_quantize_kv_cache``, which
   replaces each cache that has ``to_quantized`` and ``offset >= quantized_kv_start`` by
   ``cache.to_quantized(group_size=..., bits=...)``, in the list it was given.
4. ``KVCache`` / ``QuantizedKVCache``: the one-row caches the engine's batch cache gives back
   (``BatchKV.extract``; the global layers' own are ``cache.GlobalCache``); ``state`` is
   ``(keys, values, *scalars)`` (quantized: triples), ``offset`` the positions held; ``trim(n)`` drops the
   last ``n``.
5. ``can_trim_prompt_cache`` asks ``is_trimmable()`` with no argument (ours answer for every trim then).
"""

from mlx_lm.generate import maybe_quantize_kv_cache
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import KVCache, QuantizedKVCache
from mlx_lm.models.cache import _BaseCache as BaseCache

__all__ = ["BaseCache", "KVCache", "QuantizedKVCache", "maybe_quantize_kv_cache", "scaled_dot_product_attention"]
