"""The undocumented parts of mlx-lm's cache protocol that mlx-llama4 relies on (mlx_llama4/mlx_lm_cache.py lists
them), checked against the installed mlx-lm: an mlx-lm release that changes one fails here by name."""

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache

from mlx_llama4.cache import ChunkCache, QuantizedChunkCache
from mlx_llama4.mlx_lm_cache import BaseCache, KVCache, QuantizedKVCache, maybe_quantize_kv_cache
from mlx_llama4.mlx_lm_cache import scaled_dot_product_attention as sdpa


def _kv(n: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal((1, 2, n, 64)).astype(np.float32))


def test_from_state_builds_a_cache_without_init():
    cache = ChunkCache(8)
    cache.update_and_fetch(_kv(5), _kv(5, 1))
    rebuilt = ChunkCache.from_state(cache.state)
    assert isinstance(rebuilt, BaseCache) and rebuilt.offset == 5 and rebuilt.chunk_size == 8
    assert mx.array_equal(rebuilt.state[0], cache.state[0])


def test_attention_is_quantized_exactly_when_the_cache_has_bits():
    q, k, v = _kv(1, 2), _kv(6, 3), _kv(6, 4)
    plain = ChunkCache(8)
    keys, values = plain.update_and_fetch(k, v)
    reference = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=None)
    assert mx.array_equal(sdpa(q, keys, values, cache=plain, scale=0.125, mask=None), reference)

    quantized = QuantizedChunkCache(8, group_size=64, bits=8)
    qkeys, qvalues = quantized.update_and_fetch(k, v)  # (packed, scales, biases) triples
    out = sdpa(q * 1, qkeys, qvalues, cache=quantized, scale=0.125, mask=None)  # (it scales its queries in place)
    dequantized = [mx.dequantize(*t, group_size=64, bits=8) for t in (qkeys, qvalues)]
    expected = mx.fast.scaled_dot_product_attention(q, *dequantized, scale=0.125, mask=None)
    assert np.allclose(out, expected, atol=1e-5) and not mx.array_equal(out, reference)


def test_generation_quantizes_the_caches_that_have_to_quantized():
    chunked, grown = ChunkCache(8), KVCache()
    for c in (chunked, grown):
        c.update_and_fetch(_kv(3), _kv(3, 1))
    caches = [chunked, grown]
    maybe_quantize_kv_cache(caches, quantized_kv_start=4, kv_group_size=64, kv_bits=8)
    assert caches == [chunked, grown]  # below the start: left alone
    maybe_quantize_kv_cache(caches, quantized_kv_start=0, kv_group_size=64, kv_bits=8)
    assert isinstance(caches[0], QuantizedChunkCache) and isinstance(caches[1], QuantizedKVCache)
    assert caches[0].bits == 8 and caches[0].group_size == 64 and caches[0].offset == 3


def test_kv_cache_state_offset_and_trim():
    cache = KVCache()
    cache.update_and_fetch(_kv(5), _kv(5, 1))
    # save_prompt_cache writes state[:2] as arrays and state[2:] as scalars; the buffer may hold spare slots
    keys, values, offset = cache.state
    assert keys.shape[:2] == (1, 2) and keys.shape[2] >= 5 and cache.offset == offset == 5
    assert cache.trim(2) == 2 and cache.offset == 3
    rebuilt = KVCache.from_state(cache.state)
    assert rebuilt.offset == 3 and mx.array_equal(rebuilt.state[0][..., :3, :], keys[..., :3, :])


def test_can_trim_prompt_cache_asks_without_a_count():
    asked = []

    class Recorder(ChunkCache):
        def is_trimmable(self, n=None):
            asked.append(n)
            return super().is_trimmable(n)

    assert can_trim_prompt_cache([Recorder(8)]) and asked == [None]
