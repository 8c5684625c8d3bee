"""Logits at a 16K-token context against transformers' Llama4ForCausalLM in float32: a tiny checkpoint with a
chunk of 128 (128 chunks), a chunked RoPE layer (qk-norm, llama3 RoPE, dense) and a global NoPE layer
(temperature tuning, MoE, grouped-query heads), prefilled one chunk per step as ``stream_generate`` feeds it,
then decoded token by token, the global layer attending over ragged blocks of 1000 keys.

transformers runs the whole sequence in one forward pass (sdpa attention: 14 s and 1.8 GB here). Float KV:
within float32 rounding (``PARITY``). 8-bit KV (every layer): argmax agreement >= 95% (measured 98.8%)."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_llama4.blocked_attention as blocked
from checkpoints import PARITY, build_hf_model, hf_logits, rel_err, save_hf_model
from mlx_llama4 import load_model
from mlx_llama4.cache import ChunkCache, GlobalCache, QuantizedGlobalCache

CHUNK = 128
PROMPT = 128 * CHUNK  # 16384 positions, prefilled a chunk per step
DECODE = 16
BLOCK = 1000  # keys per block in the global layer: every step ends on a ragged block


@pytest.fixture(scope="module")
def long16k(tmp_path_factory):
    """(our model, ids (1, PROMPT + DECODE), transformers' float32 logits (1, PROMPT + DECODE, V))."""
    hf = build_hf_model(
        "scout", seed=11, vision=False, attention_chunk_size=CHUNK, max_position_embeddings=32768,
        num_hidden_layers=2, no_rope_layers=[1, 0], interleave_moe_layer_step=2,
        hidden_size=32, head_dim=32, num_attention_heads=2, num_key_value_heads=1,  # head 32: KV quantizes
    )
    ids = np.random.default_rng(12).integers(0, 1000, size=(1, PROMPT + DECODE))
    ref = hf_logits(hf, ids)
    path = save_hf_model(hf, tmp_path_factory.mktemp("long16k"))
    return load_model(path, dtype=mx.float32), ids, ref


def _run(model, ids, cache, monkeypatch) -> np.ndarray:
    """Prefill a chunk per step, then decode one token per step; the logits of every position."""
    blocks = []
    monkeypatch.setattr(blocked, "key_block", lambda *shape: blocks.append(shape) or BLOCK)
    outs = []
    for a in range(0, PROMPT, CHUNK):
        outs.append(np.array(model(mx.array(ids[:, a : a + CHUNK]), cache=cache)))
    for p in range(PROMPT, PROMPT + DECODE):
        outs.append(np.array(model(mx.array(ids[:, p : p + 1]), cache=cache)))
    assert len(blocks) == PROMPT // CHUNK + DECODE  # the global layer took the blocked path at every step
    return np.concatenate(outs, axis=1)


def test_float_kv_matches_transformers_at_16k(long16k, monkeypatch):
    model, ids, ref = long16k
    cache = model.make_cache()
    out = _run(model, ids, cache, monkeypatch)
    assert rel_err(out[:, :PROMPT], ref[:, :PROMPT]) <= PARITY
    assert rel_err(out[:, PROMPT:], ref[:, PROMPT:]) <= PARITY
    chunked, global_ = cache
    assert isinstance(chunked, ChunkCache) and chunked.keys.shape[2] == CHUNK
    assert isinstance(global_, GlobalCache) and global_.offset == PROMPT + DECODE


def test_8bit_kv_agrees_with_transformers_at_16k(long16k, monkeypatch):
    model, ids, ref = long16k
    cache = [c.to_quantized(group_size=32, bits=8) for c in model.make_cache()]
    out = _run(model, ids, cache, monkeypatch)
    assert isinstance(cache[1], QuantizedGlobalCache) and cache[1].bits == 8
    agree = out.argmax(-1) == ref.argmax(-1)
    assert agree.mean() >= 0.95 and agree[:, PROMPT:].mean() >= 0.95, (agree.mean(), agree[:, PROMPT:].mean())
