"""Attention over key blocks with a running softmax (``mlx_llama4.blocked_attention``) against the plain
formula: MLX's ``scaled_dot_product_attention`` for float keys, mlx-lm's quantized attention for quantized
keys, and float64 numpy; on random inputs with ragged last blocks, grouped-query heads, several queries per
step with causal and array masks. Also: its memory does not grow with the number of keys."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.base import quantized_scaled_dot_product_attention

from mlx_llama4.blocked_attention import blocked_attention, global_attention, key_block

D = 32
SCALE = D**-0.5
TOL = 1e-5  # float32 rounding, relative to the largest output


def _rand(shape, seed, gain=1.0):
    return mx.array((gain * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32))


def _inputs(B, H, KV, L, S, seed=0):
    # gain 3 on q: peaked attention, so a wrong rescaling or a dropped block shows
    return _rand((B, H, L, D), seed, 3.0), _rand((B, KV, S, D), seed + 1), _rand((B, KV, S, D), seed + 2)


def _numpy_reference(q, k, v, mask):
    """float64 softmax(q k^T * scale + mask) v, mask as in ``blocked_attention``."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, H, L, _ = q.shape
    S = k.shape[2]
    rep = H // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = q @ k.swapaxes(-1, -2) * SCALE
    if isinstance(mask, str):
        s = np.where(np.arange(S)[None] <= np.arange(S - L, S)[:, None], s, -np.inf)
    elif mask is not None:
        m = np.asarray(mask)
        s = np.where(m, s, -np.inf) if m.dtype == np.bool_ else s + m
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape
    return float(np.abs(out - ref).max() / np.abs(ref).max())


# (B, H, KV, L, S, block): ragged last blocks (S % block != 0), grouped-query heads (H > KV), several queries
@pytest.mark.parametrize("B,H,KV,L,S,block", [
    (1, 4, 4, 1, 1000, 128),
    (1, 8, 2, 1, 1000, 300),
    (2, 8, 1, 7, 517, 64),
    (1, 4, 2, 64, 1000, 100),
    (1, 4, 2, 37, 37, 16),  # a prefill step of the whole prompt
    (1, 4, 2, 5, 300, 1000),  # one block
])
@pytest.mark.parametrize("mask", [None, "causal"])
def test_float_keys_equal_the_plain_formula(B, H, KV, L, S, block, mask):
    q, k, v = _inputs(B, H, KV, L, S)
    out = blocked_attention(q, k, v, scale=SCALE, mask=mask, block=block)
    plain = mx.fast.scaled_dot_product_attention(q, k, v, scale=SCALE, mask=mask)
    assert out.dtype == mx.float32
    assert _err(out, plain) <= TOL
    assert _err(out, _numpy_reference(q, k, v, mask)) <= TOL


def test_array_masks_including_rows_whose_first_blocks_are_all_masked():
    """Boolean (B, 1, 1, S) masks as the engine's batch caches give (row 1 sees only keys 150..299, so its
    first two blocks of 64 are entirely masked), per-query boolean masks and additive masks."""
    B, H, KV, L, S = 2, 4, 2, 3, 300
    q, k, v = _inputs(B, H, KV, L, S, seed=3)
    rows = np.ones((B, 1, 1, S), bool)
    rows[1, ..., :150] = False
    rows[0, ..., 290:] = False
    per_query = np.random.default_rng(4).random((1, 1, L, S)) < 0.7
    per_query[..., 0] = True
    additive = np.random.default_rng(5).standard_normal((1, 1, L, S)).astype(np.float32)
    for mask in (rows, per_query, additive):
        out = blocked_attention(q, k, v, scale=SCALE, mask=mx.array(mask), block=64)
        plain = mx.fast.scaled_dot_product_attention(q, k, v, scale=SCALE, mask=mx.array(mask))
        assert _err(out, plain) <= TOL
        assert _err(out, _numpy_reference(q, k, v, mask)) <= TOL


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("L,mask", [(1, None), (9, "causal")])
def test_quantized_keys_equal_mlx_lm_quantized_attention(bits, L, mask):
    B, H, KV, S = 1, 8, 2, 700
    q, k, v = _inputs(B, H, KV, L, S, seed=6)
    qk, qv = tuple(mx.quantize(k, group_size=32, bits=bits)), tuple(mx.quantize(v, group_size=32, bits=bits))
    out = blocked_attention(q, qk, qv, scale=SCALE, mask=mask, block=96, bits=bits, group_size=32)
    plain = quantized_scaled_dot_product_attention(q * 1, qk, qv, scale=SCALE, mask=mask, group_size=32, bits=bits)
    assert _err(out, plain) <= TOL
    dequantized = [mx.dequantize(*t, group_size=32, bits=bits) for t in (qk, qv)]
    assert _err(out, _numpy_reference(q, *dequantized, mask)) <= TOL


def test_global_attention_uses_blocks_on_the_cpu(monkeypatch):
    """On the CPU backend (no fused kernel) global layers take the blocked path, quantized or not."""
    calls = []
    import mlx_llama4.blocked_attention as ba

    real = ba.blocked_attention
    monkeypatch.setattr(ba, "blocked_attention", lambda *a, **kw: calls.append(kw["bits"]) or real(*a, **kw))

    class Quantized:
        bits, group_size = 8, 32

    q, k, v = _inputs(1, 4, 2, 2, 50)
    with mx.stream(mx.cpu):
        out = global_attention(q, k, v, object(), SCALE, "causal")
        global_attention(q, *(tuple(mx.quantize(x, group_size=32, bits=8)) for x in (k, v)), Quantized(), SCALE,
                         "causal")
    assert calls == [None, 8]
    assert _err(out, mx.fast.scaled_dot_product_attention(q, k, v, scale=SCALE, mask="causal")) <= TOL


def test_memory_does_not_grow_with_the_number_of_keys():
    """Peak memory above the inputs is the same for 8K and 64K keys, a small multiple of one block's scores
    (MLX keeps about ten operations in flight); the plain formula's scores alone would be 134 MB at 64K."""
    B, H, KV, L, block = 1, 8, 2, 64, 1024
    extra = {}
    for S in (8192, 65536):
        q, k, v = _inputs(B, H, KV, L, S, seed=7)
        mx.eval(q, k, v)
        mx.synchronize()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(blocked_attention(q, k, v, scale=SCALE, mask="causal", block=block))
        extra[S] = mx.get_peak_memory() - base
        del q, k, v
        mx.clear_cache()
    scores = B * H * L * block * 4
    assert extra[65536] <= 1.1 * extra[8192] and extra[65536] <= 16 * scores, extra


def test_key_block_bounds_the_scores():
    assert key_block(1, 40, 1) * 40 * 4 <= 2**19 < (key_block(1, 40, 1) + 1) * 40 * 4  # decode: large blocks
    assert key_block(1, 4, 128) == 256
    assert key_block(1, 40, 8192) == 128  # a long prefill step: the smallest block
