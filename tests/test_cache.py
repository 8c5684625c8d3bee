"""Chunk cache: bounded buffer, growth while the first chunk fills, exact-or-refused trimming, prompt caches
saved at and between chunk boundaries."""

import mlx.core as mx
import numpy as np
import pytest

from checkpoints import PARITY, build_hf_model, hf_logits, rel_err, save_hf_model
from convert_checkpoints import write_tokenizer
from mlx_llama4 import PromptCache, load, load_model, load_prompt_cache, save_prompt_cache, stream_generate
from mlx_llama4.cache import ChunkCache, can_trim_cache, trim_cache

# An attention chunk above the buffer's growth step (ChunkCache.step, 256), as in the published models (8192):
# the first chunk's buffer grows, copying the positions it holds, as steps fill it.
LONG_CHUNK = 600


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
    hf = build_hf_model("scout", seed=3)
    path = save_hf_model(hf, tmp_path_factory.mktemp("scout-cache"))
    ids = np.random.default_rng(5).integers(0, 1000, size=(1, 40))
    return load_model(path, dtype=mx.float32), ids, hf_logits(hf, ids)


@pytest.fixture(scope="module")
def long_chunk(tmp_path_factory):
    """Text-only Scout-like model with chunk 600 and a word-level tokenizer: (model, processor, ids (1, 700),
    transformers float32 logits (1, 700, V))."""
    assert LONG_CHUNK > ChunkCache.step
    hf = build_hf_model("scout", seed=4, vision=False, attention_chunk_size=LONG_CHUNK)
    path = save_hf_model(hf, tmp_path_factory.mktemp("long-chunk"))
    write_tokenizer(path)
    ids = np.random.default_rng(6).integers(0, 1000, size=(1, 700))
    model, processor = load(path, dtype=mx.float32)
    return model, processor, ids, hf_logits(hf, ids)


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


# (16, 2): the offset is a chunk multiple; (16, 8), (24, 16): the trim lands on one
@pytest.mark.parametrize("prefill,trim", [(20, 2), (20, 4), (6, 6), (30, 0), (7, 7), (16, 2), (16, 8), (24, 16)])
def test_exact_trim_restores_reference_logits(scout, prefill, trim):
    model, ids, ref = scout
    cache = _prefill(model, ids, prefill)
    assert can_trim_cache(cache, trim)
    assert trim_cache(cache, trim)
    start = prefill - trim
    out = model(mx.array(ids[:, start:]), cache=cache)
    assert rel_err(out, ref[:, start:]) <= PARITY


@pytest.mark.parametrize("prefill,trim", [(20, 5), (20, 13), (33, 10), (20, 21), (16, 9)])
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
    assert rel_err(model(mx.array(ids[:, prefill:]), cache=cache), ref[:, prefill:]) <= PARITY


def test_mlx_lm_protocol_is_conservative(scout):
    from mlx_lm.models.cache import can_trim_prompt_cache

    model, ids, _ = scout
    assert can_trim_prompt_cache(_prefill(model, ids, 8))  # nothing dropped yet: any trim is exact
    assert not can_trim_prompt_cache(_prefill(model, ids, 9))  # first chunk dropped: mlx-lm cannot ask per n


# -- a chunk larger than the growth step ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps,grown",
    [
        ([100, 200, 1, 255, 44, 1, 30, 69], [256, 512, 512, 600, 600, 600, 600, 600]),  # copies 100, then 301
        ([255] + [1] * 10 + [335, 100], [256, 256] + [512] * 9 + [600, 600]),  # copies 256 at a decode step
    ],
)
def test_long_chunk_buffer_grows_exactly(long_chunk, steps, grown):
    model, _, ids, ref = long_chunk
    cache = model.make_cache()
    chunked = next(c for c in cache if isinstance(c, ChunkCache))
    outs, pos, slots = [], 0, []
    for n in steps:
        outs.append(np.array(model(mx.array(ids[:, pos : pos + n]), cache=cache)))
        pos += n
        slots.append(chunked.keys.shape[2])
    assert pos == ids.shape[1] and slots == grown
    assert rel_err(np.concatenate(outs, axis=1), ref) <= PARITY


# (700, 100), (650, 50): the trim lands on the chunk boundary 600; (600, 10): from the boundary back into the
# full first chunk; (300, 44): onto the growth step
@pytest.mark.parametrize("prefill,trim", [(700, 100), (650, 50), (600, 10), (300, 44)])
def test_long_chunk_trim_restores_reference_logits(long_chunk, prefill, trim):
    model, _, ids, ref = long_chunk
    cache = _prefill(model, ids, prefill)
    assert trim_cache(cache, trim)
    start = prefill - trim
    assert rel_err(model(mx.array(ids[:, start:]), cache=cache), ref[:, start:]) <= PARITY


@pytest.mark.parametrize("words", [591, 441])
def test_prompt_cache_saved_at_and_between_chunk_boundaries(long_chunk, tmp_path, words):
    """A document prefilled in steps of 100 (so the buffer grows) and saved at offset 600 (the chunk boundary:
    the whole first chunk must be kept) or 450; the next prompt changes the document's last five words, so the
    reloaded cache is trimmed back inside the first chunk and continued. Greedy tokens equal a fresh run."""
    model, processor, _, _ = long_chunk
    doc = [f"w{i}" for i in np.random.default_rng(words).integers(3, 1000, words)]
    first = [{"role": "user", "content": " ".join(doc)}]
    second = [{"role": "user", "content": " ".join(doc[:-5] + ["w1", "w2", "w3", "w4", "w5"])}]
    cache = PromptCache(model)
    list(stream_generate(model, processor, first, max_tokens=1, temperature=0.0, prompt_cache=cache,
                         prefill_step_size=100))
    assert cache.offset == words + 9  # 8 template tokens around the words, and the one sampled token
    save_prompt_cache(tmp_path / "doc.safetensors", cache)

    def tokens(prompt_cache=None):
        chunks = list(stream_generate(model, processor, second, max_tokens=20, temperature=0.0,
                                      prompt_cache=prompt_cache))
        return [c.token for c in chunks], chunks[0].prompt_tokens

    fresh, fed = tokens()
    assert fed == words + 8
    for reused in (load_prompt_cache(tmp_path / "doc.safetensors", model), cache):
        got, fed = tokens(reused)
        assert fed == 9  # only the five new words and the template's tail, after the 4 + words - 5 kept
        assert got == fresh
