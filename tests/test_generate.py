"""load / generate / stream_generate against transformers' greedy generate; end tokens, sampling parameters and
their effect; prompt cache reuse, saving and ownership; KV quantization against float KV and transformers."""

import json
import re
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_llama4 import PromptCache, generate, load, load_model, load_prompt_cache, save_prompt_cache, stream_generate
from mlx_llama4 import generation, prompt_cache
from real_vocab import build_checkpoint, random_image

END_IDS = [200001, 200007, 200008]  # <|end_of_text|>, <|eom|>, <|eot|>


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real-vocab")
    hf = build_checkpoint(folder)
    model, processor = load(folder, dtype=mx.float32)
    return hf, model, processor, folder




def _hf_greedy(hf, inputs, n):
    import torch

    kwargs = dict(input_ids=torch.from_numpy(np.asarray(inputs["input_ids"])).long())
    if inputs["pixel_values"] is not None:
        kwargs["pixel_values"] = torch.from_numpy(np.asarray(inputs["pixel_values"]))
    with torch.no_grad():
        out = hf.generate(**kwargs, max_new_tokens=n, do_sample=False, eos_token_id=END_IDS)
    return out[0, kwargs["input_ids"].shape[1]:].tolist()


class FixedLogits(nn.Module):
    """Stands in for ``lm_head``: the same logits at every position, whatever the hidden state."""

    def __init__(self, logits: mx.array):
        super().__init__()
        self.logits = logits  # (V,)

    def __call__(self, h: mx.array) -> mx.array:
        return mx.broadcast_to(self.logits, (*h.shape[:-1], self.logits.shape[0]))  # (B, L, V)


@contextmanager
def forced(model, scores: dict):
    """Make the model's logits 0 everywhere except ``scores`` (token id -> logit), at every step."""
    logits = np.zeros(model.config.text.vocab_size, np.float32)
    for token, value in scores.items():
        logits[token] = value
    head = model.language_model.lm_head
    model.language_model.lm_head = FixedLogits(mx.array(logits))
    try:
        yield
    finally:
        model.language_model.lm_head = head


def _tokens(model, processor, prompt="Hi", **kw):
    return [c.token for c in stream_generate(model, processor, prompt, **kw)]


# ---- greedy parity, lengths, end tokens ------------------------------------------------------------------------


@pytest.mark.parametrize("with_image", [False, True])
def test_greedy_tokens_match_transformers(tiny, with_image):
    hf, model, processor, _ = tiny
    images = [random_image()] if with_image else None
    content = [{"type": "image"}, {"type": "text", "text": "What is this?"}] if with_image else "Say something."
    messages = [{"role": "user", "content": content}]
    inputs = processor(messages=messages, images=images)
    expected = _hf_greedy(hf, inputs, 45)
    chunks = list(stream_generate(model, processor, messages, images=images, max_tokens=45, temperature=0.0))
    tokens = [c.token for c in chunks]
    assert tokens == expected
    assert inputs["input_ids"].shape[1] + len(tokens) > 5 * 8  # crosses several chunks of 8
    last = chunks[-1]
    assert last.finish_reason in ("stop", "length") and all(c.finish_reason is None for c in chunks[:-1])
    assert last.prompt_tokens == inputs["input_ids"].shape[1] and last.generation_tokens == len(tokens)
    assert last.time_to_first_token > 0 and last.peak_memory > 0
    text = "".join(c.text for c in chunks)
    assert generate(model, processor, messages, images=images, max_tokens=45) == text
    if with_image:  # a string prompt is one user turn with the images before the text
        assert generate(model, processor, "What is this?", images=images, max_tokens=45) == text


def test_max_tokens_and_length_reason(tiny):
    _, model, processor, _ = tiny
    word = processor.encode(" apple")[0]
    with forced(model, {word: 10.0}):  # never an end token
        chunks = list(stream_generate(model, processor, "Hi", max_tokens=3))
        assert [(c.token, c.finish_reason, c.generation_tokens) for c in chunks] == [
            (word, None, 1), (word, None, 2), (word, "length", 3)]
        cache = PromptCache(model)
        assert list(stream_generate(model, processor, "Hi", max_tokens=0, prompt_cache=cache)) == []
    assert cache.offset == processor(messages="Hi")["input_ids"].shape[1]  # max_tokens=0 only prefills


def test_generation_config_is_read(tiny, tmp_path):
    _, _, processor, _ = tiny
    assert processor.generation_config == {"eos_token_ids": END_IDS}  # transformers' file: no do_sample
    file = tmp_path / "generation_config.json"
    file.write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": 7}))
    assert generation.read_generation_config(tmp_path) == {"eos_token_ids": [7], "temperature": 0.6, "top_p": 0.9}
    file.write_text(json.dumps({"do_sample": False, "temperature": 0.6, "eos_token_id": [7, 8]}))
    assert generation.read_generation_config(tmp_path) == {"eos_token_ids": [7, 8]}
    file.write_text(json.dumps({"do_sample": True, "top_p": 1.5}))
    with pytest.raises(ValueError, match=r"generation_config.json: top_p must be a number in \(0, 1\].*got 1.5"):
        generation.read_generation_config(tmp_path)


# Each source of end tokens on its own: the token is forced, and listed by that source only.
END_SOURCES = ["tokenizer eos", "<|eot|>", "<|eom|>", "<|end_of_text|>", "generation_config.json", "config.json"]


@pytest.mark.parametrize("source", END_SOURCES)
def test_stops_on_every_end_token(tiny, source):
    _, model, processor, _ = tiny
    tokenizer, saved = processor.tokenizer, (processor.tokenizer.eos_token, processor.generation_config,
                                             model.config.text.eos_token_id)
    word = processor.encode(" apple")[0]
    other_eos = "<|reserved_special_token_5|>"
    token = {"tokenizer eos": processor.token_id(other_eos), "generation_config.json": word,
             "config.json": word}.get(source) or processor.token_id(source)
    try:
        # Only the source under test lists the token: the tokenizer's eos is a token nothing else lists (or the
        # forced one), generation_config.json and config.json list nothing (or the forced one).
        tokenizer.eos_token = other_eos
        processor.generation_config = {"eos_token_ids": [word] if source == "generation_config.json" else []}
        model.config.text.eos_token_id = [word] if source == "config.json" else []
        with forced(model, {token: 10.0}):
            chunks = list(stream_generate(model, processor, "Hi", max_tokens=5))
        assert [(c.token, c.finish_reason, c.text) for c in chunks] == [(token, "stop", "")]
    finally:
        tokenizer.eos_token, processor.generation_config, model.config.text.eos_token_id = saved


@pytest.mark.parametrize("special", ["<|reserved_special_token_303|>", "<|python_start|>", "<|python_end|>"])
def test_reply_text_has_no_special_tokens(tiny, special):
    _, model, processor, _ = tiny
    s, word = processor.token_id(special), processor.encode(" apple")[0]
    # With a repetition penalty of 2 the forced logits give: special (10), word (9.9 > 10 / 2), special (5 > 4.95).
    with forced(model, {s: 10.0, word: 9.9}):
        chunks = list(stream_generate(model, processor, "Hi", max_tokens=4, repetition_penalty=2.0))
    assert [c.token for c in chunks] == [s, word, s, s]  # every id is still reported
    assert "".join(c.text for c in chunks) == " apple"


# ---- sampling parameters and their effect ----------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(tiny):
    _, model, processor, _ = tiny
    run = lambda seed: generate(model, processor, "Hi", max_tokens=12, temperature=1.0, top_p=0.9, seed=seed)  # noqa
    assert run(3) == run(3)
    assert len({run(s) for s in range(4)}) > 1


@pytest.fixture
def sampler_spy(monkeypatch):
    """The arguments of every sampler ``stream_generate`` builds, and the sampler itself."""
    calls = []
    real = generation.make_sampler

    def spy(**kw):
        calls.append(dict(kw, sampler=real(**kw)))
        return calls[-1]["sampler"]

    monkeypatch.setattr(generation, "make_sampler", spy)
    return calls


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_scales_the_distribution(tiny, sampler_spy, temperature):
    """Samples from the sampler that stream_generate builds follow softmax(logits / T), computed in numpy from
    the model's own logits (eight tokens across the range of the logits; sampling one row does not depend on
    the width of the vocabulary)."""
    _, model, processor, _ = tiny
    list(stream_generate(model, processor, "Hi", max_tokens=1, temperature=temperature, top_p=1.0, top_k=0))
    sampler = sampler_spy[-1]["sampler"]
    logits = np.array(model(mx.array(processor(messages="Hi")["input_ids"]))[0, -1], np.float64)  # (V,)
    order = np.argsort(logits)
    picked = logits[order[np.linspace(0, len(order) - 1, 8).astype(int)]]  # lowest ... highest
    n = 200_000
    mx.random.seed(0)
    samples = np.array(sampler(mx.broadcast_to(mx.array(picked, mx.float32), (n, 8))))
    observed = np.bincount(samples, minlength=8) / n

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    expected = softmax(picked / temperature)
    assert np.abs(observed - expected).max() < 0.006  # ~4 standard errors at n = 200k
    assert np.abs(softmax(picked * temperature) - expected).max() > 0.03  # an inverted T would be seen


def test_top_k_1_and_min_p_1_are_greedy(tiny):
    _, model, processor, _ = tiny
    greedy = _tokens(model, processor, max_tokens=20, temperature=0.0)
    for seed in (1, 2):
        assert _tokens(model, processor, max_tokens=20, temperature=1.5, top_p=1.0, top_k=1, seed=seed) == greedy
        assert _tokens(model, processor, max_tokens=20, temperature=1.5, top_p=1.0, min_p=1.0, seed=seed) == greedy
    sampled = {tuple(_tokens(model, processor, max_tokens=20, temperature=1.5, top_p=1.0, seed=s)) for s in (1, 2)}
    assert tuple(greedy) not in sampled  # without the filters the same seeds do not give the greedy reply


def test_repetition_penalty_changes_the_choice(tiny):
    _, model, processor, _ = tiny
    a, b = processor.encode(" apple")[0], processor.encode(" banana")[0]
    with forced(model, {a: 5.0, b: 4.5}):  # a wins, unless it was seen: 5 / 2 < 4.5
        assert _tokens(model, processor, max_tokens=4) == [a] * 4
        assert _tokens(model, processor, max_tokens=4, repetition_penalty=2.0) == [a, b, a, a]


def test_generation_config_defaults_are_used(tiny, sampler_spy):
    _, model, processor, _ = tiny
    saved = processor.generation_config
    try:
        processor.generation_config = dict(saved, temperature=0.7, top_p=0.8, top_k=5)
        list(stream_generate(model, processor, "Hi", max_tokens=1))
        list(stream_generate(model, processor, "Hi", max_tokens=1, temperature=0.3, top_p=0.95, top_k=7))
    finally:
        processor.generation_config = saved
    list(stream_generate(model, processor, "Hi", max_tokens=1))
    args = [{k: c[k] for k in ("temp", "top_p", "top_k", "min_p")} for c in sampler_spy]
    assert args == [dict(temp=0.7, top_p=0.8, top_k=5, min_p=0.0), dict(temp=0.3, top_p=0.95, top_k=7, min_p=0.0),
                    dict(temp=0.0, top_p=1.0, top_k=0, min_p=0.0)]  # no defaults: greedy


BAD_ARGUMENTS = [
    ("max_tokens", -1), ("max_tokens", 2.5), ("max_tokens", True), ("max_tokens", "3"),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", True),
    ("top_p", 0), ("top_p", 1.5), ("top_k", -1), ("top_k", 2.0), ("top_k", False),
    ("min_p", -0.1), ("min_p", 1.1), ("repetition_penalty", 0), ("repetition_penalty", -1.0),
    ("seed", 1.5), ("seed", True), ("seed", -1), ("kv_bits", 7), ("kv_bits", 0), ("kv_bits", True),
    ("prefill_step_size", 0),
]


@pytest.mark.parametrize("name,value", BAD_ARGUMENTS)
def test_bad_sampling_arguments(tiny, name, value):
    _, model, processor, _ = tiny
    with pytest.raises(ValueError, match=rf"^{name} must be .*, got {re.escape(repr(value))}$"):
        generate(model, processor, "Hi", **{name: value})


@pytest.mark.parametrize("as_", ["path", "str", "pil", "bytes", "array"])
def test_one_image_is_not_a_list(tiny, tmp_path, as_):
    _, model, processor, _ = tiny
    image = random_image()
    image.save(tmp_path / "pic.png")
    one = {"path": tmp_path / "pic.png", "str": str(tmp_path / "pic.png"), "pil": image,
           "bytes": (tmp_path / "pic.png").read_bytes(), "array": np.asarray(image)}[as_]
    expected = _tokens(model, processor, "What is this?", images=[image], max_tokens=3)
    assert _tokens(model, processor, "What is this?", images=one, max_tokens=3) == expected


def test_oversized_image_says_how_to_raise_the_limit(tiny, tmp_path):
    import dataclasses

    _, model, processor, _ = tiny
    random_image().save(tmp_path / "pic.png")
    saved = processor.image_settings
    try:
        processor.image_settings = dataclasses.replace(saved, max_pixels=1000)
        with pytest.raises(ValueError) as e:
            generate(model, processor, "What is this?", images=tmp_path / "pic.png", max_tokens=1)
    finally:
        processor.image_settings = saved
    message = str(e.value)
    assert "above the limit of 1,000 pixels" in message and "load_processor(path, max_pixels=N)" in message
    assert "processor.image_settings" in message


# ---- prompt cache -----------------------------------------------------------------------------------------------


def _chat(model, processor, turns, cache=None, images_per_turn=None, n=12):
    """Run a conversation; with a cache, only new tokens are fed. Returns the replies' tokens."""
    messages, replies = [], []
    for i, text in enumerate(turns):
        imgs = (images_per_turn or {}).get(i, [])
        content = [{"type": "image", "image": im} for im in imgs] + [{"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
        chunks = list(stream_generate(model, processor, messages, max_tokens=n, prompt_cache=cache))
        replies.append([c.token for c in chunks])
        messages.append({"role": "assistant", "content": "".join(c.text for c in chunks)})
    return replies, messages


def test_kept_cache_equals_fresh_prompts_across_chunk_slides(tiny):
    _, model, processor, _ = tiny
    turns = ["Hello there, how are you today?", "Tell me more.", "And then?", "Why?"]
    images = {0: [random_image(seed=1)], 2: [random_image(90, 90, seed=2)]}
    fresh, _ = _chat(model, processor, turns, None, images)
    cache = PromptCache(model)
    kept, messages = _chat(model, processor, turns, cache, images)
    assert kept == fresh
    assert cache.offset > 4 * model.config.text.attention_chunk_size  # the chunk window slid several times


def test_reused_prefix_is_not_refed(tiny):
    _, model, processor, _ = tiny
    cache = PromptCache(model)
    messages = [{"role": "user", "content": "A long document. " * 10}]
    first = list(stream_generate(model, processor, messages, max_tokens=4, prompt_cache=cache))
    full = first[-1].prompt_tokens
    messages += [{"role": "assistant", "content": "".join(c.text for c in first)},
                 {"role": "user", "content": "Summarise."}]
    second = list(stream_generate(model, processor, messages, max_tokens=4, prompt_cache=cache))
    total = processor(messages=messages)["input_ids"].shape[1]
    assert second[-1].prompt_tokens < total - full + 8  # fed little more than the new turn
    fresh = list(stream_generate(model, processor, messages, max_tokens=4))
    assert [c.token for c in second] == [c.token for c in fresh]


def test_saved_prompt_cache_continues_identically(tiny, tmp_path):
    _, model, processor, folder = tiny
    doc = [{"role": "user", "content": [{"type": "image", "image": random_image(seed=4)},
                                         {"type": "text", "text": "Here is a document. " * 6}]}]
    cache = PromptCache(model)
    list(stream_generate(model, processor, doc, max_tokens=0, prompt_cache=cache))
    file = tmp_path / "doc.cache"  # any name: written as is, not with an extra ".safetensors"
    save_prompt_cache(file, cache)
    assert [p.name for p in tmp_path.iterdir()] == ["doc.cache"]
    question = doc + [{"role": "assistant", "content": "Ok."}, {"role": "user", "content": "What is it?"}]
    a = [c.token for c in stream_generate(model, processor, question, max_tokens=10, prompt_cache=cache)]
    reloaded = load_model(folder, dtype=mx.float32)  # the same checkpoint loaded again is the same model
    loaded = load_prompt_cache(file, reloaded)
    b_chunks = list(stream_generate(reloaded, processor, question, max_tokens=10, prompt_cache=loaded))
    fresh = [c.token for c in stream_generate(model, processor, question, max_tokens=10)]
    assert a == [c.token for c in b_chunks] == fresh
    assert b_chunks[-1].prompt_tokens < processor(messages=question)["input_ids"].shape[1] - 20


def test_prompt_cache_refuses_another_model(tiny, tmp_path):
    _, model, processor, folder = tiny
    cache = PromptCache(model)
    list(stream_generate(model, processor, "Hi", max_tokens=2, prompt_cache=cache))
    save_prompt_cache(tmp_path / "hi.cache", cache)
    assert PromptCache(load_model(folder, dtype=mx.bfloat16)).model_id == cache.model_id  # same weights, other dtype
    tuned = load_model(folder, dtype=mx.float32)
    k_proj = tuned.language_model.model.layers[2].self_attn.k_proj
    k_proj.weight = k_proj.weight + 1e-3  # a fine-tune of one tensor
    with pytest.raises(ValueError, match="this prompt cache was filled by another model"):
        list(stream_generate(tuned, processor, "Hi", max_tokens=2, prompt_cache=cache))
    with pytest.raises(ValueError, match=r"hi.cache was filled by another model"):
        load_prompt_cache(tmp_path / "hi.cache", tuned)


def test_prompt_cache_file_errors(tiny, tmp_path, monkeypatch):
    import os

    _, model, processor, folder = tiny
    cache = PromptCache(model)
    with pytest.raises(ValueError, match="empty"):
        save_prompt_cache(tmp_path / "x", cache)
    list(stream_generate(model, processor, "Hi", max_tokens=1, prompt_cache=cache))
    with pytest.raises(FileNotFoundError, match=r"nowhere/x: cannot save the prompt cache, the folder .* not exist"):
        save_prompt_cache(tmp_path / "nowhere" / "x", cache)
    with pytest.raises(IsADirectoryError, match="this is a folder"):
        save_prompt_cache(tmp_path, cache)
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="locked/x: cannot write the prompt cache"):
            save_prompt_cache(locked / "x", cache)

    def disk_full(f, *a, **kw):
        import errno

        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(prompt_cache, "_write_safetensors", disk_full)
        with pytest.raises(OSError, match=r"full.cache: cannot write the prompt cache \(No space left on device\)"):
            save_prompt_cache(tmp_path / "full.cache", cache)
    assert not list(tmp_path.glob("*full.cache*"))  # no partial file left behind

    with pytest.raises(FileNotFoundError, match="missing.cache: no such prompt cache file"):
        load_prompt_cache(tmp_path / "missing.cache", model)
    (tmp_path / "text.cache").write_text("hello")
    with pytest.raises(ValueError, match="text.cache: not a prompt cache"):
        load_prompt_cache(tmp_path / "text.cache", model)
    with pytest.raises(ValueError, match="model.safetensors: not a prompt cache written by save_prompt_cache"):
        load_prompt_cache(folder / "model.safetensors", model)
    save_prompt_cache(tmp_path / "good.cache", cache)
    data = (tmp_path / "good.cache").read_bytes()
    (tmp_path / "cut.cache").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="cut.cache: not a prompt cache, or a corrupt or truncated one"):
        load_prompt_cache(tmp_path / "cut.cache", model)
    arrays, meta = mx.load(str(tmp_path / "good.cache"), format="safetensors", return_metadata=True)
    mx.save_safetensors(str(tmp_path / "bad.safetensors"), arrays, dict(meta, classes='["NoSuchCache"]'))
    with pytest.raises(ValueError, match="bad.safetensors: corrupt prompt cache"):
        load_prompt_cache(tmp_path / "bad.safetensors", model)


# ---- KV quantization --------------------------------------------------------------------------------------------


def test_kv_constants_are_what_mlx_quantizes():
    x = mx.zeros((1, 128))
    accepted = set()
    for bits in range(1, 9):
        for group in (16, 32, 64, 128, 256):
            try:
                mx.eval(mx.quantize(x, group_size=group, bits=bits))
                accepted.add((bits, group))
            except ValueError:
                pass
    assert accepted == {(b, g) for b in generation.KV_BITS for g in generation.KV_GROUP_SIZES}


def test_kv_group_size_follows_the_head_size(tiny):
    _, model, processor, _ = tiny
    demo, demo_processor = load("demo", dtype=mx.float32)  # head size 32: mlx-lm's default group of 64 fails
    cache = PromptCache(demo)
    assert generate(demo, demo_processor, "Hello!", max_tokens=3, kv_bits=4, prompt_cache=cache)
    assert {c.group_size for c in cache.layers} == {32} and {c.bits for c in cache.layers} == {4}
    with pytest.raises(ValueError, match=r"kv_group_size 64 does not fit this model's head size 32.*\[32\]"):
        generate(demo, demo_processor, "Hello!", max_tokens=3, kv_bits=4, kv_group_size=64)
    with pytest.raises(ValueError, match="head size 8 is not a multiple of any quantization group size"):
        generate(model, processor, "Hi", max_tokens=3, kv_bits=8)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A real-vocabulary checkpoint with head size 64, which KV quantization fits."""
    folder = tmp_path_factory.mktemp("wide")
    hf = build_checkpoint(folder, dict(hidden_size=64, head_dim=64, num_attention_heads=2, num_key_value_heads=1),
                          seed=1)
    model, processor = load(folder, dtype=mx.float32)
    return hf, model, processor


def _kv_logits(model, ids, bits):
    cache = model.make_cache()
    if bits:
        cache = [c.to_quantized(group_size=64, bits=bits) for c in cache]
    return np.array(model.language_model(mx.array(ids), cache=cache), np.float64)  # (1, L, V)


def test_kv_quantization_against_float_kv_and_transformers(wide):
    """Logits with a b-bit KV cache stay within 8 quantization steps (1 / (2 (2^b - 1)) of a group's range) of
    float KV, relative to the largest logit: 1.6% for 8 bits, 27% for 4 (measured 0.8% and 14%); and 8-bit KV's
    greedy tokens equal transformers', except where transformers' own top two logits are closer than the
    8-bit error bound (measured: all 40 equal)."""
    import torch

    from mlx_llama4.cache import QuantizedChunkCache, QuantizedGlobalCache

    hf, model, processor = wide
    prompt = "Count with me: one two three four five six seven eight nine ten eleven twelve."
    ids = np.asarray(processor(messages=prompt)["input_ids"])
    cache = PromptCache(model)
    quant = _tokens(model, processor, prompt, max_tokens=40, temperature=0.0, kv_bits=8, prompt_cache=cache)
    assert {type(c) for c in cache.layers} == {QuantizedChunkCache, QuantizedGlobalCache}
    assert {(c.bits, c.group_size) for c in cache.layers} == {(8, 64)}
    reference = _hf_greedy(hf, {"input_ids": ids, "pixel_values": None}, 40)
    assert len(reference) == 40

    full = np.concatenate([ids[0], reference])[None]
    with torch.no_grad():
        ref_logits = hf(input_ids=torch.from_numpy(full).long()).logits.double().numpy()
    float_logits = _kv_logits(model, full, None)
    scale = np.abs(float_logits).max()
    errors = {}
    for bits in (8, 4):
        step = 1 / (2 * (2**bits - 1))
        errors[bits] = np.abs(_kv_logits(model, full, bits) - float_logits).max() / scale
        print(f"{bits}-bit KV: logits relative error {errors[bits]:.2e} (bound {8 * step:.2e})")
        assert 0 < errors[bits] <= 8 * step
    assert errors[4] > errors[8]

    top2 = np.sort(ref_logits[0, ids.shape[1] - 1:-1], axis=-1)[:, -2:]  # at each generated position
    margins = top2[:, 1] - top2[:, 0]
    for i, (ours, theirs) in enumerate(zip(quant, reference)):
        if ours != theirs:
            assert margins[i] <= 2 * errors[8] * scale, f"8-bit KV diverged at token {i} with a clear margin"
            break
    print(f"8-bit KV greedy tokens equal to transformers': {sum(a == b for a, b in zip(quant, reference))}/40")


# ---- errors and the Hub -----------------------------------------------------------------------------------------


def test_errors(tiny, tmp_path):
    _, model, processor, folder = tiny
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load(tmp_path / "missing")
    with pytest.raises(ValueError, match="no model given"):
        load("")
    cfg = json.loads((folder / "config.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        load(other)
    saved = model.config.text.max_position_embeddings
    try:
        model.config.text.max_position_embeddings = 16
        with pytest.raises(ValueError, match="context is 16 positions"):
            list(stream_generate(model, processor, "a rather long prompt " * 5))
    finally:
        model.config.text.max_position_embeddings = saved
    with pytest.raises(ValueError, match="0 image parts .* but 1 images"):
        generate(model, processor, [{"role": "user", "content": "no image part"}], images=[random_image()])


def test_load_from_the_hub_then_offline(tiny, tmp_path):
    """load("owner/repo") through the real huggingface_hub client and a local Hub stand-in; then offline from
    the cache; a repo that is not cached is a clear error offline."""
    import os
    import subprocess
    import sys

    from hub_stub import HubStub

    _, model, processor, folder = tiny
    expected = generate(model, processor, "Hi", max_tokens=4)
    script = ("import sys; import mlx.core as mx; from mlx_llama4 import load, generate; "
              "m, p = load(sys.argv[1], dtype=mx.float32); print('REPLY:' + repr(generate(m, p, 'Hi', max_tokens=4)))")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
    env.pop("HF_HUB_OFFLINE", None)
    run = lambda repo, **extra: subprocess.run(  # noqa: E731
        [sys.executable, "-c", script, repo], env=dict(env, **extra), capture_output=True, text=True, timeout=300)
    with HubStub({"org/tiny": folder}) as hub:
        online = run("org/tiny", HF_ENDPOINT=hub.url)
    assert online.returncode == 0, online.stderr[-2000:]
    assert online.stdout.split("REPLY:", 1)[1].strip() == repr(expected)
    offline = run("org/tiny", HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr[-2000:]
    assert offline.stdout.split("REPLY:", 1)[1].strip() == repr(expected)
    missing = run("org/other", HF_HUB_OFFLINE="1")
    assert missing.returncode != 0 and "org/other: not in the local Hugging Face cache" in missing.stderr


def test_a_model_loaded_on_one_thread_runs_on_another(tmp_path):
    """MLX runs a lazy array on the stream of the thread that built it: arrays the model computes at
    construction (the text and vision RoPE tables) must be materialized then, or any other thread (the engine's,
    the app's) fails with "There is no Stream(cpu, 0) in current thread"."""
    import threading

    build_checkpoint(tmp_path, seed=4)
    model, processor = load(tmp_path, dtype=mx.float32)  # nothing has run on this thread
    results = []
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    worker = threading.Thread(target=lambda: results.append(
        generate(model, processor, prompt, images=[random_image()], max_tokens=3, temperature=0.0)))
    worker.start()
    worker.join()
    assert len(results) == 1
