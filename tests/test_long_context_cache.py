"""The long-context workflow around the caches: the KV size formula against real caches, the global cache's
growth, prompt cache files (exact round trip, no spare slots, no second copy in memory while saving or
loading, refused for another model), a document questioned many times at the cost of each question's own
tokens, the automatic KV quantization of long prompts, and the CLI's cache-prompt / generate --prompt-cache."""

import re

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from checkpoints import build_hf_model, save_hf_model
from convert_checkpoints import write_tokenizer
from mlx_llama4 import (PromptCache, cache_document, document_messages, load, load_model, load_prompt_cache,
                        save_prompt_cache, stream_generate)
from mlx_llama4 import long_context
from mlx_llama4.cache import ChunkCache, GlobalCache, QuantizedGlobalCache, can_trim_cache, global_kv_bits
from mlx_llama4.cli import main
from mlx_llama4.long_context import kv_bytes_per_position, kv_cache_bytes, kv_layers

CHUNK = 16


def _text_model(path, seed, chunk=CHUNK, **overrides):
    """Text-only Scout-like model (3 chunked layers, 1 global) with head size 32, so its KV quantizes."""
    hf = build_hf_model("scout", seed=seed, vision=False, attention_chunk_size=chunk, hidden_size=32, head_dim=32,
                        num_attention_heads=2, num_key_value_heads=1, **overrides)
    save_hf_model(hf, path)
    write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def doc_model(tmp_path_factory):
    path = _text_model(tmp_path_factory.mktemp("doc-model"), seed=21)
    model, processor = load(path, dtype=mx.float32)
    return model, processor, path


def _words(n: int, seed: int) -> str:
    return " ".join(f"w{i}" for i in np.random.default_rng(seed).integers(3, 1000, n))


def _prefill(model, processor, n: int, seed: int = 0) -> PromptCache:
    cache = PromptCache(model)
    ids = np.random.default_rng(seed).integers(3, 1000, n).tolist()
    list(stream_generate(model, processor, ids, max_tokens=0, prompt_cache=cache, kv_bits=None))
    return cache


def _held(cache) -> int:
    return sum(x.nbytes for c in cache.layers for _, x in tree_flatten(list(c.state[:2])))


# ---- sizes and growth ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_kv_formula_equals_the_bytes_the_caches_hold(doc_model, bits, monkeypatch):
    """Global layers quantized (or not) and chunked layers float, as kv_bits="auto" keeps a long context."""
    model, processor, _ = doc_model
    cfg = model.config.text
    monkeypatch.setattr(long_context, "LONG_CONTEXT_TOKENS", 1 if bits else 10**6)
    monkeypatch.setattr(long_context, "LONG_CONTEXT_KV_BITS", bits)
    cache = PromptCache(model)
    n = 768  # a multiple of the buffer's 256-slot step: the reservation is exact
    ids = np.random.default_rng(1).integers(3, 1000, n).tolist()
    list(stream_generate(model, processor, ids, max_tokens=0, prompt_cache=cache, kv_group_size=32))
    assert global_kv_bits(cache.layers) == bits
    expected = kv_cache_bytes(cfg, n, global_bits=bits, group_size=32, float_bytes=4)
    assert _held(cache) == expected
    assert sum(c.nbytes for c in cache.layers) == expected  # reserved exactly: no spare slots allocated


def test_global_cache_is_sized_once_when_reserved_and_grows_geometrically_otherwise(monkeypatch):
    resizes = []
    real = GlobalCache._resize
    monkeypatch.setattr(GlobalCache, "_resize", lambda self, n: resizes.append(n) or real(self, n))
    kv = lambda n: mx.ones((1, 2, n, 32))  # noqa: E731
    reserved = GlobalCache()
    reserved.reserve(10_000)
    for _ in range(100):
        reserved.update_and_fetch(kv(100), kv(100))
    assert resizes == [10_000] and reserved.keys.shape[2] == 10_240
    resizes.clear()
    grown = GlobalCache()
    for _ in range(100):
        keys, _ = grown.update_and_fetch(kv(100), kv(100))
    assert keys.shape[2] == grown.offset == 10_000
    assert len(resizes) <= 16  # mlx-lm's KVCache: 40 copies of the whole history, one per 256 slots


def test_a_global_cache_holds_its_buffer_once_when_allocated_and_when_grown():
    """The first write into a reserved cache allocates the reserved buffer once, and growing a filled cache
    holds the old and the new buffer only: the peak is the bytes held afterwards (before, the zero-filled
    spare part of a concatenation was alive beside the result: 2x the KV at a long prompt's first step)."""
    kv = mx.ones((1, 2, 100, 32))
    cache = GlobalCache()
    cache.reserve(100_000)  # 51 MB of keys and values
    for reserve in (None, 200_000):
        if reserve:
            mx.eval(cache.update_and_fetch(kv, kv))  # filled, then grown below
        mx.eval(kv)
        before = mx.get_active_memory()  # inputs, and the filled buffer when growing
        mx.reset_peak_memory()
        if reserve:
            cache.reserve(reserve)
        else:
            mx.eval(cache.update_and_fetch(kv, kv))
        assert mx.get_peak_memory() - before <= 1.01 * cache.nbytes


def test_prefill_memory_beyond_the_kv_does_not_grow_with_the_context(tmp_path):
    """stream_generate's peak MLX memory less the KV cache it fills is the same for 4K and 8K prompt tokens:
    only the KV grows with the context (the goal of benchmark item 9). Steps of 256 tokens (the chunk) keep the
    global layer's key blocks at 256 keys, so its attention reaches its bound within 4K keys. The global layer
    is the second: a prefill step evaluates the caches only, so the last layer's attention never runs in it."""
    path = _text_model(tmp_path, seed=23, chunk=256, max_position_embeddings=16384, no_rope_layers=[1, 0, 1, 1])
    model, processor = load(path, dtype=mx.float32)

    def beyond_kv(n: int) -> int:
        cache = PromptCache(model)
        ids = np.random.default_rng(n).integers(3, 1000, n).tolist()
        mx.clear_cache()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        list(stream_generate(model, processor, ids, max_tokens=1, prompt_cache=cache, kv_bits=None))
        return mx.get_peak_memory() - before - sum(c.nbytes for c in cache.layers)

    small, large = beyond_kv(4096), beyond_kv(8192)
    # Measured: +0.02 to 0.4 MB (how far MLX runs ahead varies with the machine's load); with 4 MiB key blocks,
    # +16.7 MB (the blocks' temporaries kept piling up to 13 of them, 51 MB, until 16K keys)
    assert large - small <= 2**21, (small, large)


# ---- prompt cache files -----------------------------------------------------------------------------------------


def _states(cache):
    return [tree_flatten(list(c.state[:2])) for c in cache.layers]


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_cache_file_round_trips_exactly_without_spare_slots(doc_model, tmp_path, kv_bits):
    model, processor, _ = doc_model
    cache = PromptCache(model)
    ids = np.random.default_rng(2).integers(3, 1000, 300).tolist()
    list(stream_generate(model, processor, ids, max_tokens=5, prompt_cache=cache, kv_bits=kv_bits))
    cache.metadata["note"] = "ünïcode ✓"
    global_ = next(c for c in cache.layers if isinstance(c, GlobalCache))
    assert tree_flatten(global_.keys)[0][1].shape[2] > cache.offset  # spare slots, which the file leaves out
    save_prompt_cache(tmp_path / "c.cache", cache)
    loaded = load_prompt_cache(tmp_path / "c.cache", model)
    assert [type(c) for c in loaded.layers] == [type(c) for c in cache.layers]
    assert loaded.offset == cache.offset == 305 and np.array_equal(loaded.keys, cache.keys)
    assert loaded.metadata == {"note": "ünïcode ✓"}
    for a, b in zip(_states(loaded), _states(cache)):
        assert all(n1 == n2 and x.dtype == y.dtype and mx.array_equal(x, y) for (n1, x), (n2, y) in zip(a, b))
    data = (tmp_path / "c.cache").read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    n_global, n_chunked = kv_layers(model.config.text)
    per_position = kv_bytes_per_position(model.config.text, kv_bits, group_size=32, float_bytes=4)
    live = cache.offset % CHUNK or CHUNK  # a chunked layer holds its current chunk's positions
    assert len(data) - header == (n_global * cache.offset + n_chunked * live) * per_position + 8 * cache.offset
    assert tree_flatten(next(c for c in loaded.layers if isinstance(c, GlobalCache)).keys)[0][1].shape[2] == 305


def _big_cache(model, n: int) -> PromptCache:
    """A cache of ``n`` positions with random keys and values, built directly (no prefill)."""
    cache = PromptCache(model)
    rng = np.random.default_rng(3)
    for i, c in enumerate(cache.layers):
        if isinstance(c, ChunkCache):
            live = n % CHUNK or CHUNK
            kv = [mx.array(rng.standard_normal((1, 1, live, 32)).astype(np.float32)) for _ in range(2)]
            cache.layers[i] = ChunkCache.from_state((*kv, n, CHUNK))
        else:
            c.reserve(n + 100)  # spare slots, as after a generation
            c.update_and_fetch(*(mx.array(rng.standard_normal((1, 1, n, 32)).astype(np.float32)) for _ in range(2)))
    cache.keys = np.arange(n) % 1000
    mx.eval([c.state for c in cache.layers])
    return cache


def test_saving_and_loading_hold_the_cache_once(doc_model, tmp_path):
    """Peak MLX memory while saving stays within 1% of what the cache holds (mx.save_safetensors of the
    sliced buffers measured twice the cache), and loading allocates the file's tensors once."""
    model, _, _ = doc_model
    cache = _big_cache(model, 400_000)  # 102 MB in the global layer
    held = _held(cache)
    expected = [np.array(x) for _, x in _states(cache)[3]]
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    save_prompt_cache(tmp_path / "big.cache", cache)
    assert mx.get_peak_memory() - base <= 0.01 * held
    del cache
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    loaded = load_prompt_cache(tmp_path / "big.cache", model)
    assert mx.get_peak_memory() - base <= 1.05 * (tmp_path / "big.cache").stat().st_size
    assert all(np.array_equal(np.array(x), y) for (_, x), y in zip(_states(loaded)[3], expected))


def test_cache_file_is_refused_for_another_model_or_without_its_model(doc_model, tmp_path):
    model, processor, _ = doc_model
    cache = _prefill(model, processor, 40)
    save_prompt_cache(tmp_path / "doc.cache", cache)
    other = load_model(_text_model(tmp_path / "other", seed=22), dtype=mx.float32)  # same shapes, other weights
    with pytest.raises(ValueError, match=r"doc.cache was filled by another model"):
        load_prompt_cache(tmp_path / "doc.cache", other)
    arrays, meta = mx.load(str(tmp_path / "doc.cache"), format="safetensors", return_metadata=True)
    for name, changed in (("nomodel", {k: v for k, v in meta.items() if k != "model"}),
                          ("v1", dict(meta, format="mlx-llama4 prompt cache 1"))):
        with open(tmp_path / f"{name}.cache", "wb") as f:
            mx.save_safetensors(f, arrays, changed)
    with pytest.raises(ValueError, match=r"nomodel.cache was filled by another model"):
        load_prompt_cache(tmp_path / "nomodel.cache", model)
    with pytest.raises(ValueError, match=r"v1.cache: a prompt cache of an older format .* prefill the prompt again"):
        load_prompt_cache(tmp_path / "v1.cache", model)


# ---- a document questioned many times ----------------------------------------------------------------------------


def test_each_question_on_a_cached_document_costs_its_own_tokens(doc_model, tmp_path):
    """Three questions, each with a reply that carries the chunked layers past the document's last chunk: each
    feeds only its own tokens (the question and the template's tail), from the file or from memory, and
    replies as a fresh run of the whole prompt does."""
    model, processor, _ = doc_model
    made = cache_document(model, processor, _words(200, 4))
    save_prompt_cache(tmp_path / "doc.cache", made)
    prefix = made.offset
    for cache in (load_prompt_cache(tmp_path / "doc.cache", model), made):
        for q, question in enumerate((_words(5, 5), _words(9, 6), _words(3, 7))):
            messages = document_messages(cache, question)
            total = np.asarray(processor(messages=messages)["input_ids"]).shape[1]
            got = list(stream_generate(model, processor, messages, max_tokens=24, temperature=0.0,
                                       prompt_cache=cache))
            fresh = list(stream_generate(model, processor, messages, max_tokens=24, temperature=0.0))
            assert got[0].prompt_tokens == total - prefix, q
            assert [c.token for c in got] == [c.token for c in fresh]
            assert not can_trim_cache(cache.layers, cache.offset - prefix)  # only the pin restores the prefix


def test_document_messages_need_a_document_cache(doc_model):
    with pytest.raises(ValueError, match="holds no document"):
        document_messages(PromptCache(doc_model[0]), "Why?")


# ---- automatic KV quantization of long contexts -----------------------------------------------------------------


def test_long_contexts_quantize_the_global_layers_only(doc_model, monkeypatch):
    model, processor, _ = doc_model
    monkeypatch.setattr(long_context, "LONG_CONTEXT_TOKENS", 100)
    long_prompt, short_prompt = _words(90, 8), _words(40, 9)  # 90 words + template + 8 tokens >= 100

    def run(prompt, **kw):
        cache = PromptCache(model)
        chunks = list(stream_generate(model, processor, prompt, max_tokens=8, temperature=0.0, prompt_cache=cache,
                                      **kw))
        return chunks, cache

    chunks, cache = run(long_prompt)
    assert chunks[-1].kv_bits == 8 == global_kv_bits(cache.layers)
    assert {type(c) for c in cache.layers} == {ChunkCache, QuantizedGlobalCache}
    for prompt, kw in ((long_prompt, dict(kv_bits=None)), (short_prompt, {})):
        chunks, cache = run(prompt, **kw)
        assert chunks[-1].kv_bits is None and {type(c) for c in cache.layers} == {ChunkCache, GlobalCache}
    chunks, cache = run(short_prompt, kv_bits=4)
    assert chunks[-1].kv_bits == 4 and all(c.bits == 4 for c in cache.layers)


def test_prefill_progress_reports_steps_of_at_most_a_chunk(doc_model):
    model, processor, _ = doc_model
    calls = []
    list(stream_generate(model, processor, _words(100, 10), max_tokens=1, progress=lambda d, t: calls.append((d, t))))
    done = [d for d, _ in calls]
    assert calls[0][0] == 0 and done == sorted(done) and calls[-1][0] == calls[-1][1]
    assert max(np.diff(done)) <= CHUNK


# ---- the CLI ------------------------------------------------------------------------------------------------------


def test_cli_cache_prompt_then_questions(doc_model, tmp_path, capsys, monkeypatch):
    model, processor, path = doc_model
    doc = tmp_path / "doc.txt"
    doc.write_text(_words(150, 11))
    monkeypatch.setattr(long_context, "LONG_CONTEXT_TOKENS", 100)
    assert main(["cache-prompt", "--model", str(path), "--file", str(doc), "--out", str(tmp_path / "doc.cache")]) == 0
    out = capsys.readouterr().out
    prefix = load_prompt_cache(tmp_path / "doc.cache", model).offset
    assert f"cached {prefix} tokens of {doc}" in out and "time per 1K prompt tokens: " in out
    assert "KV of the global layers quantized to 8 bits past 100 tokens" in out
    assert f"--prompt-cache {tmp_path / 'doc.cache'}" in out

    question = _words(4, 12)
    assert main(["generate", "--model", str(path), "--prompt-cache", str(tmp_path / "doc.cache"), "--prompt",
                 question, "-m", "6", "--temp", "0"]) == 0
    cached = capsys.readouterr().out
    total = np.asarray(processor(messages=doc.read_text() + "\n\n" + question)["input_ids"]).shape[1]
    assert re.search(r"\[prompt: (\d+) tokens", cached)[1] == str(total - prefix)  # the question's own tokens
    assert "KV of the global layers quantized to 8 bits past 100 tokens" in cached
    assert main(["generate", "--model", str(path), "--prompt", doc.read_text() + "\n\n" + question, "-m", "6",
                 "--temp", "0"]) == 0
    assert cached.split("\n[prompt:")[0] == capsys.readouterr().out.split("\n[prompt:")[0]

    other = _text_model(tmp_path / "other", seed=23)
    for argv, message in (
        (["--model", str(other)], "doc.cache was filled by another model"),
        (["--model", str(path), "--system", "Be brief."], "--image and --system-prompt do not apply"),
    ):
        assert main(["generate", *argv, "--prompt-cache", str(tmp_path / "doc.cache"), "--prompt", "w5"]) == 2
        assert message in capsys.readouterr().err
    assert main(["cache-prompt", "--model", str(path), "--file", str(tmp_path / "none.txt"), "--out",
                 str(tmp_path / "x.cache")]) == 2
    assert "none.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's usage error
        main(["generate", "--model", str(path), "--prompt", "w5", "--kv-bits", "seven"])
    assert e.value.code == 2 and "--kv-bits: expected bits (1-6 or 8), 'auto' or 'none'" in capsys.readouterr().err
