"""Text logits against transformers' Llama4ForConditionalGeneration in float32."""

import mlx.core as mx
import numpy as np
import pytest

from checkpoints import rel_err
from mlx_llama4 import load_model
from mlx_llama4.cache import ChunkCache

BAR = 1e-4


@pytest.fixture(scope="module")
def loaded(variant):
    name, path, ids, ref = variant
    return name, load_model(path), ids, ref


def test_full_forward_matches_reference(loaded):
    name, model, ids, ref = loaded
    assert rel_err(model(mx.array(ids)), ref) <= BAR, name


@pytest.mark.parametrize("steps", [[7, 1, 5, 1, 9, 1, 3, 18], [1] * 45, [20, 25]])
def test_cached_steps_match_full_forward(loaded, steps):
    name, model, ids, ref = loaded
    cache = model.make_cache()
    outs, pos = [], 0
    for n in steps:
        outs.append(np.array(model(mx.array(ids[:, pos : pos + n]), cache=cache)))
        pos += n
    assert pos == ids.shape[1]
    assert rel_err(np.concatenate(outs, axis=1), ref) <= BAR, name
    chunk = model.config.text.attention_chunk_size
    for c in cache:
        assert c.offset == pos
        if isinstance(c, ChunkCache):
            assert c.keys.shape[2] <= chunk


def test_batch_rows_are_independent(loaded):
    name, model, ids, ref = loaded
    other = (ids + 7) % 1000
    both = np.array(model(mx.array(np.concatenate([ids, other]))))
    assert rel_err(both[:1], ref) <= BAR, name
    assert rel_err(both[1:], np.array(model(mx.array(other)))) <= BAR, name
