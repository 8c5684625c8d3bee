"""Text logits against transformers' Llama4ForConditionalGeneration in float32.

The checkpoints' text weights are scaled (``checkpoints.scale_text_weights``) so that each mechanism moves the
logits: a planted mistake in the temperature formula, the llama3 smooth band, the RoPE pair order, the qk-norm
eps, the expert-score placement, the shared expert or a chunk boundary changes them by 3e-3 or more of the
largest logit, while float32 rounding stays near 2e-6 (``PARITY`` is 1e-5)."""

import mlx.core as mx
import numpy as np
import pytest

from checkpoints import PARITY, rel_err
from mlx_llama4 import load_model
from mlx_llama4.cache import ChunkCache


@pytest.fixture(scope="module")
def loaded(variant):
    name, path, ids, ref = variant
    return name, load_model(path, dtype=mx.float32), ids, ref


def test_full_forward_matches_reference(loaded):
    name, model, ids, ref = loaded
    assert rel_err(model(mx.array(ids)), ref) <= PARITY, name


@pytest.mark.parametrize("steps", [[7, 1, 5, 1, 9, 1, 3, 18], [1] * 45, [20, 25]])
def test_cached_steps_match_full_forward(loaded, steps):
    name, model, ids, ref = loaded
    cache = model.make_cache()
    outs, pos = [], 0
    for n in steps:
        outs.append(np.array(model(mx.array(ids[:, pos : pos + n]), cache=cache)))
        pos += n
    assert pos == ids.shape[1]
    assert rel_err(np.concatenate(outs, axis=1), ref) <= PARITY, name
    chunk = model.config.text.attention_chunk_size
    for c in cache:
        assert c.offset == pos
        if isinstance(c, ChunkCache):
            assert c.keys.shape[2] <= chunk


def test_batch_rows_are_independent(loaded):
    name, model, ids, ref = loaded
    other = (ids + 7) % 1000
    both = np.array(model(mx.array(np.concatenate([ids, other]))))
    assert rel_err(both[:1], ref) <= PARITY, name
    assert rel_err(both[1:], np.array(model(mx.array(other)))) <= PARITY, name
