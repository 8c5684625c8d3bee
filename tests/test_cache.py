"""Chunk cache: bounded buffer, exact-or-refused trimming."""

import mlx.core as mx
import numpy as np
import pytest

from checkpoints import build_hf_model, hf_logits, rel_err, save_hf_model
from mlx_llama4 import load_model
from mlx_llama4.cache import ChunkCache, can_trim_cache, trim_cache


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
    hf = build_hf_model("scout", seed=3)
    path = save_hf_model(hf, tmp_path_factory.mktemp("scout-cache"))
    ids = np.random.default_rng(5).integers(0, 1000, size=(1, 40))
    return load_model(path), ids, hf_logits(hf, ids)


def _prefill(model, ids, n):
    cache = model.make_cache()
    model(mx.array(ids[:, :n]), cache=cache)
    return cache


def test_buffer_is_reused_not_grown_after_first_chunk():
    c = ChunkCache(chunk_size=8)
    kv = lambda n, v: mx.full((1, 2, n, 4), v)  # noqa: E731
    c.update_and_fetch(kv(8, 1.0), kv(8, 1.0))
    buffer_shape = c.keys.shape
    k, _ = c.update_and_fetch(kv(1, 2.0), kv(1, 2.0))  # position 8 starts a new chunk
    assert k.shape[2] == 1 and float(k.max()) == 2.0  # only the live key, nothing of the old chunk
    k, _ = c.update_and_fetch(kv(3, 3.0), kv(3, 3.0))
    assert k.shape[2] == 4 and c.keys.shape == buffer_shape == (1, 2, 8, 4)
    with pytest.raises(ValueError, match="crosses a chunk boundary"):
        c.update_and_fetch(kv(5, 0.0), kv(5, 0.0))


@pytest.mark.parametrize("prefill,trim", [(20, 2), (20, 4), (6, 6), (30, 0), (7, 7)])
def test_exact_trim_restores_reference_logits(scout, prefill, trim):
    model, ids, ref = scout
    cache = _prefill(model, ids, prefill)
    assert can_trim_cache(cache, trim)
    assert trim_cache(cache, trim)
    start = prefill - trim
    out = model(mx.array(ids[:, start:]), cache=cache)
    assert rel_err(out, ref[:, start:]) <= 1e-4


@pytest.mark.parametrize("prefill,trim", [(20, 5), (20, 13), (33, 10), (20, 21)])
def test_trim_into_dropped_chunk_is_refused(scout, prefill, trim):
    model, ids, ref = scout
    cache = _prefill(model, ids, prefill)
    assert not can_trim_cache(cache, trim)
    assert not trim_cache(cache, trim)
    assert all(c.offset == prefill for c in cache)  # nothing was half-trimmed
    chunked = next(c for c in cache if isinstance(c, ChunkCache))
    with pytest.raises(ValueError, match="already dropped|cannot trim"):
        chunked.trim(trim)
    # untouched cache still continues exactly
    assert rel_err(model(mx.array(ids[:, prefill:]), cache=cache), ref[:, prefill:]) <= 1e-4


def test_mlx_lm_protocol_is_conservative(scout):
    from mlx_lm.models.cache import can_trim_prompt_cache

    model, ids, _ = scout
    assert can_trim_prompt_cache(_prefill(model, ids, 8))  # nothing dropped yet: any trim is exact
    assert not can_trim_prompt_cache(_prefill(model, ids, 9))  # first chunk dropped: mlx-lm cannot ask per n
