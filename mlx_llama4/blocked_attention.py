"""Attention over blocks of keys with a running (online) softmax, for the global layers.

A global (NoPE) layer attends to every position so far: at a million tokens, a plain
``softmax(q k^T * scale + mask) v`` builds a (heads, queries, keys) score matrix of hundreds of GB. MLX's fused
kernels avoid that where they exist (float keys on a GPU), but not for quantized keys (mlx-lm's quantized
attention, ``mlx_lm/models/base.py``, materializes the scores) nor on the CPU backend. Here the keys are taken
a block at a time, keeping for each query the running maximum ``m``, the running sum ``l`` of
``exp(score - m)`` and the running weighted sum of values, all in float32, rescaled by ``exp(m_old - m_new)``
whenever the maximum grows (the online softmax of Milakov and Gimelshein, 2018, as in FlashAttention). The
result equals the plain formula up to float32 rounding, and the memory of one call is bounded by
queries x key block, whatever the number of keys.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import mlx.core as mx

# Float32 scores of one key block stay under this many bytes. MLX allocates each operation's output when it
# queues it, ahead of the one that runs, so over a dozen block-sized temporaries can be alive at once (measured:
# up to 13x this, 7 MB, whatever the number of keys): the bound of one call's memory. It is small so that the
# bound is reached within a few thousand keys and stays a small share of a small model's memory; blocks down
# to this size run as fast as 8x larger ones on MLX's CPU backend (prefill and decode steps, 8K-64K keys).
SCORE_BLOCK_BYTES = 2**19
MIN_BLOCK = 128  # keys; below this the per-block overhead dominates
_MASKED = float(mx.finfo(mx.float32).min)  # a masked score, as mlx-lm writes boolean masks

Mask = Union[None, str, mx.array]


def key_block(batch: int, heads: int, queries: int) -> int:
    """Keys per block so that one block's float32 scores (batch, heads, queries, block) fit
    ``SCORE_BLOCK_BYTES``: large blocks for a decode step (one query), small ones for a prefill step."""
    return max(MIN_BLOCK, SCORE_BLOCK_BYTES // (4 * batch * heads * queries))


def global_attention(queries: mx.array, keys: Any, values: Any, cache: Any, scale: float, mask: Mask) -> mx.array:
    """Attention for a global layer: MLX's fused kernel where this backend has one for float keys (it never
    materializes the scores), else ``blocked_attention``. Keys and values are arrays, or ``(packed, scales,
    biases)`` triples when the cache is quantized (it has ``bits`` and ``group_size``, mlx-lm's convention)."""
    bits = getattr(cache, "bits", None)
    if bits is None and mx.default_device() != mx.cpu:
        try:
            return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask,
                                                        force_fused=True)
        except ValueError:  # no fused kernel for this shape on this backend
            pass
    return blocked_attention(queries, keys, values, scale=scale, mask=mask, bits=bits,
                             group_size=getattr(cache, "group_size", 64))


def blocked_attention(
    queries: mx.array,
    keys: Any,
    values: Any,
    *,
    scale: float,
    mask: Mask = None,
    block: Optional[int] = None,
    bits: Optional[int] = None,
    group_size: int = 64,
) -> mx.array:
    """``softmax(queries keys^T * scale + mask) values`` over blocks of ``block`` keys (default: ``key_block``).

    queries (B, H, L, D); keys and values (B, KV, S, D) with H a multiple of KV (grouped-query attention), or
    ``mx.quantize`` triples of them with ``bits`` and ``group_size``. ``mask``: None, ``"causal"`` (aligned to
    the last key: query i sees keys j <= S - L + i), or a boolean (True: attend) or additive array that
    broadcasts to (B, H or 1, L, S). Returns (B, H, L, D) in the queries' dtype.
    """
    B, H, L, D = queries.shape
    kv = keys[0] if bits else keys
    KV, S = kv.shape[1], kv.shape[2]
    R = H // KV
    block = block or key_block(B, H, L)
    # The R query heads that read one KV head, stacked along the query axis: one plain batched matmul per
    # block (broadcasting the keys over a head axis instead runs several times slower on MLX's CPU backend).
    q = (queries * scale).reshape(B, KV, R * L, D)

    def matmul(x: mx.array, y: Any, transpose: bool) -> mx.array:
        if bits:
            return mx.quantized_matmul(x, *y, transpose=transpose, group_size=group_size, bits=bits)
        return x @ (y.swapaxes(-1, -2) if transpose else y)

    def rows(x: Any, a: int, b: int) -> Any:  # positions [a, b) of keys or values
        return tuple(t[..., a:b, :] for t in x) if bits else x[..., a:b, :]

    def masked(s: mx.array, keep: mx.array) -> mx.array:  # keep broadcasts to (B, KV, R, L, block)
        return mx.where(keep, s.reshape(B, KV, R, L, -1), _MASKED).reshape(s.shape)

    if isinstance(mask, mx.array) and mask.ndim == 4:
        mask = mx.expand_dims(mask, 2)  # (B, 1, 1, L, S): the same for the R heads of a group
    first_query = S - L  # the causal position of query 0

    m = l = acc = None
    for a in range(0, S, block):
        b = min(a + block, S)
        s = _f32(matmul(q, rows(keys, a, b), True))  # (B, KV, R * L, b - a)
        if isinstance(mask, str):
            if b - 1 > first_query:  # some key of this block lies after some query
                s = masked(s, mx.arange(a, b)[None] <= mx.arange(first_query, S)[:, None])  # (L, b - a)
        elif mask is not None:
            part = mask[..., a:b] if mask.shape[-1] > 1 else mask
            if part.dtype == mx.bool_:
                s = masked(s, part)
            else:
                s = (s.reshape(B, KV, R, L, -1) + _f32(part)).reshape(s.shape)
        v = rows(values, a, b)
        if b - a == S:  # one block: the plain formula
            p = mx.softmax(s, axis=-1, precise=True)
            return matmul(_cast(p, queries.dtype), v, False).reshape(B, H, L, D)
        block_max = s.max(axis=-1, keepdims=True)
        m_new = block_max if m is None else mx.maximum(m, block_max)
        p = mx.exp(s - m_new)
        pv = _f32(matmul(_cast(p, queries.dtype), v, False))  # (B, KV, R * L, D)
        if m is None:
            l, acc = p.sum(axis=-1, keepdims=True), pv
        else:
            correction = mx.exp(m - m_new)  # rescales what was summed under the old maximum
            l = l * correction + p.sum(axis=-1, keepdims=True)
            acc = acc * correction + pv
        m = m_new
    return _cast(acc / l, queries.dtype).reshape(B, H, L, D)  # (B, KV, R * L, D) -> (B, H, L, D)


def _cast(x: mx.array, dtype: mx.Dtype) -> mx.array:
    return x if x.dtype == dtype else x.astype(dtype)


def _f32(x: mx.array) -> mx.array:
    return _cast(x, mx.float32)
