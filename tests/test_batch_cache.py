"""Batch caches against the one-sequence caches: slots, masks, rows joining and leaving, and batched decode
logits equal to each row's own one-sequence logits at different positions and chunk phases."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from checkpoints import build_hf, rel_err, save_hf_model, text_config
from mlx_llama4 import load_model
from mlx_llama4.cache import ChunkCache
from mlx_llama4.engine.batch_cache import BatchCache, BatchKV

BAR = 1e-5


def _positions_cache(cache, n, kv=2, dim=4):
    """Feed ``n`` positions whose keys and values hold their position, one at a time (chunk boundaries)."""
    for p in range(n):
        x = mx.full((1, kv, 1, dim), float(p))
        cache.update_and_fetch(x, x)
    return cache


def _held(batch: BatchKV, row: int) -> list[float]:
    """Position held in each slot of ``row`` (key channel 0 of head 0)."""
    return np.array(batch.keys[row, 0, :, 0]).tolist()


@pytest.mark.parametrize("window", [8, None])
def test_rows_at_different_phases_keep_their_slots(window):
    batch = BatchKV(window)
    lengths = [3, 8, 13, 16, 21]  # mid-chunk, boundary, second chunk, boundary, third chunk
    for n in lengths:
        batch.add(_positions_cache(ChunkCache(window) if window else KVCache(), n))
    assert batch.positions == lengths and np.array(batch.offset).tolist() == lengths
    for row, n in enumerate(lengths):
        held = n % window or min(n, window) if window else n  # what the row's one-sequence cache held
        start = n - held
        assert _held(batch, row)[:held] == [float(p) for p in range(start, n)]
    mask = np.array(batch.make_mask(1))[:, 0, 0]  # (B, S) for the next token of each row
    for row, n in enumerate(lengths):
        slot = n % window if window else n
        live = [j for j in range(mask.shape[1]) if mask[row, j]]
        assert live == list(range(slot + 1)), (row, n)  # the current chunk up to the new position, no more
    x = mx.array(np.array(lengths, np.float32)[:, None, None, None] * np.ones((1, 2, 1, 4), np.float32))
    k, _ = batch.update_and_fetch(x, x)
    assert k.shape[2] == mask.shape[1]
    for row, n in enumerate(lengths):
        slot = n % window if window else n
        assert _held(batch, row)[slot] == float(n)
    if window:
        assert batch.keys.shape[2] <= window  # never more than one chunk


def test_filter_keeps_order_and_frees_memory():
    batch = BatchKV(None)
    for n in [5, 300, 9]:
        batch.add(_positions_cache(KVCache(), n))
    before = batch.nbytes
    batch.filter([2, 0])  # the long row leaves; the others swap places
    assert batch.positions == [9, 5]
    assert _held(batch, 0)[:9] == [float(p) for p in range(9)]
    assert _held(batch, 1)[:5] == [float(p) for p in range(5)]
    assert batch.nbytes < before / 2  # the slots only the long row needed are gone
    out = batch.extract(0)
    assert out.offset == 9 and np.array(out.keys[0, 0, :, 0]).tolist() == [float(p) for p in range(9)]


def test_extract_round_trips_a_chunk_row():
    batch = BatchKV(8)
    for n in [11, 16]:
        batch.add(_positions_cache(ChunkCache(8), n))
    for row, n in enumerate([11, 16]):
        out = batch.extract(row)
        ref = _positions_cache(ChunkCache(8), n)
        assert isinstance(out, ChunkCache) and out.offset == n
        assert np.array_equal(np.array(out.state[0]), np.array(ref.state[0]))


# ---- batched forward against one-sequence forwards ------------------------------------------------------


@pytest.fixture(scope="module", params=["scout", "irregular", "unchunked"])
def model(request, tmp_path_factory):
    hf = build_hf(text_config(request.param), None, seed=2)
    return load_model(save_hf_model(hf, tmp_path_factory.mktemp(request.param)), dtype=mx.float32)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """head_dim 64, so that keys and values can be quantized in groups of 64."""
    cfg = dict(text_config("scout"), hidden_size=64, head_dim=64, num_attention_heads=2, num_key_value_heads=1)
    return load_model(save_hf_model(build_hf(cfg, None, seed=4), tmp_path_factory.mktemp("wide")), dtype=mx.float32)


def _prefill(model, ids, kv_bits=None):
    cache = model.make_cache()
    model(mx.array(ids)[None], cache=cache)
    if kv_bits:
        cache = [c.to_quantized(group_size=64, bits=kv_bits) for c in cache]
    return cache


def _run_batch(model, kv_bits=None, steps=14):
    """Rows at different positions decode together; one joins mid-run (mid-chunk), one leaves; every step's
    batched logits are compared with each row's own one-sequence step."""
    rng = np.random.default_rng(0)
    lengths = [3, 8, 13, 21]
    rows = [rng.integers(0, 1000, n) for n in lengths]
    singles = [_prefill(model, ids, kv_bits) for ids in rows]
    batch = BatchCache(model.make_cache(), kv_bits=kv_bits, kv_group_size=64)
    for ids in rows[:3]:
        batch.add(_prefill(model, ids, kv_bits))  # a copy: the one-sequence caches go on separately
    live = [0, 1, 2]
    worst = 0.0
    for step in range(steps):
        if step == 4:  # a row joins in the middle of its chunk
            batch.add(_prefill(model, rows[3], kv_bits))
            live.append(3)
        if step == 9:  # a row leaves; the others keep their order
            batch.filter([0, 2, 3])
            live = [live[0], live[2], live[3]]
        tokens = rng.integers(0, 1000, len(live))
        out = np.array(model(mx.array(tokens)[:, None], cache=batch.layers))  # (B, 1, V)
        for b, r in enumerate(live):
            ref = np.array(model(mx.array(tokens[b : b + 1])[None], cache=singles[r]))
            worst = max(worst, rel_err(out[b : b + 1], ref))
        assert batch.positions == [singles[r][0].offset for r in live]
    return worst


def test_batched_decode_equals_single_rows(model):
    assert _run_batch(model) <= BAR


def test_quantized_batched_decode_equals_single_rows(wide_model):
    from mlx_llama4.engine.batch_cache import QuantizedBatchKV

    assert _run_batch(wide_model, kv_bits=8) <= BAR
    batch = BatchCache(wide_model.make_cache(), kv_bits=4, kv_group_size=64)
    assert all(isinstance(layer, QuantizedBatchKV) and layer.bits == 4 for layer in batch.layers)
