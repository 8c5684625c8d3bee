"""load / generate / stream_generate against transformers' greedy generate, prompt cache reuse, KV quantization."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from checkpoints import VISION, build_hf, text_config
from mlx_llama4 import PromptCache, generate, load, load_prompt_cache, save_prompt_cache, stream_generate
from tokenizer_util import real_tokenizer_dir

REAL_VOCAB = dict(vocab_size=202048, bos_token_id=200000, eos_token_id=[200001, 200007, 200008], pad_token_id=200018)
REAL_SPECIAL = dict(image_token_index=200092, boi_token_index=200080, eoi_token_index=200081)


def _checkpoint(folder, text_overrides, seed=0):
    """A tiny checkpoint with the real vocabulary, the real tokenizer and 56-px tiles (4 tokens each)."""
    hf = build_hf(dict(text_config("maverick"), **REAL_VOCAB, **text_overrides), VISION, seed, REAL_SPECIAL)
    hf.save_pretrained(folder)
    for f in real_tokenizer_dir().iterdir():
        shutil.copy(f, folder / f.name)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 56, "width": 56}, "max_patches": 4, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
         "rescale_factor": 1 / 255, "resize_to_max_canvas": False}))
    return hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real-vocab")
    hf = _checkpoint(folder, {})
    model, processor = load(folder)
    return hf, model, processor, folder


def _image(w=110, h=50, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _hf_greedy(hf, inputs, n):
    import torch

    kwargs = dict(input_ids=torch.from_numpy(np.asarray(inputs["input_ids"])).long())
    if inputs["pixel_values"] is not None:
        kwargs["pixel_values"] = torch.from_numpy(np.asarray(inputs["pixel_values"]))
    with torch.no_grad():
        out = hf.generate(**kwargs, max_new_tokens=n, do_sample=False, eos_token_id=[200001, 200007, 200008])
    return out[0, kwargs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("with_image", [False, True])
def test_greedy_tokens_match_transformers(tiny, with_image):
    hf, model, processor, _ = tiny
    images = [_image()] if with_image else None
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
    chunks = list(stream_generate(model, processor, "Hi", max_tokens=3))
    assert len(chunks) <= 3
    if len(chunks) == 3:
        assert chunks[-1].finish_reason == "length"


def test_stops_on_every_end_token(tiny):
    _, model, processor, _ = tiny
    first = next(stream_generate(model, processor, "Hi", max_tokens=1)).token
    processor.eos_token_ids  # noqa: B018  (exists)
    saved = model.config.text.eos_token_id
    try:
        model.config.text.eos_token_id = [first]  # the model's very first token is now an end token
        chunks = list(stream_generate(model, processor, "Hi", max_tokens=10))
        assert [c.finish_reason for c in chunks] == ["stop"] and chunks[0].text == ""
    finally:
        model.config.text.eos_token_id = saved


def test_seeded_sampling_is_reproducible(tiny):
    _, model, processor, _ = tiny
    run = lambda seed: generate(model, processor, "Hi", max_tokens=12, temperature=1.0, top_p=0.9, seed=seed)  # noqa
    assert run(3) == run(3)
    assert len({run(s) for s in range(4)}) > 1


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
    images = {0: [_image(seed=1)], 2: [_image(90, 90, seed=2)]}
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
    _, model, processor, _ = tiny
    doc = [{"role": "user", "content": [{"type": "image", "image": _image(seed=4)},
                                         {"type": "text", "text": "Here is a document. " * 6}]}]
    cache = PromptCache(model)
    list(stream_generate(model, processor, doc, max_tokens=2, prompt_cache=cache))
    save_prompt_cache(tmp_path / "doc.safetensors", cache)
    question = doc + [{"role": "assistant", "content": "Ok."}, {"role": "user", "content": "What is it?"}]
    a = [c.token for c in stream_generate(model, processor, question, max_tokens=10, prompt_cache=cache)]
    loaded = load_prompt_cache(tmp_path / "doc.safetensors", model)
    b_chunks = list(stream_generate(model, processor, question, max_tokens=10, prompt_cache=loaded))
    fresh = [c.token for c in stream_generate(model, processor, question, max_tokens=10)]
    assert a == [c.token for c in b_chunks] == fresh
    assert b_chunks[-1].prompt_tokens < processor(messages=question)["input_ids"].shape[1] - 20


def test_kv_quantization_on_every_layer(tmp_path):
    from mlx_llama4.cache import QuantizedChunkCache
    from mlx_lm.models.cache import QuantizedKVCache

    _checkpoint(tmp_path, dict(hidden_size=64, head_dim=64, num_attention_heads=2, num_key_value_heads=1), seed=1)
    model, processor = load(tmp_path)
    prompt = "Count with me: one two three four five six seven eight nine ten eleven twelve."
    cache = PromptCache(model)
    quant = [c.token for c in stream_generate(model, processor, prompt, max_tokens=30, kv_bits=8, prompt_cache=cache)]
    plain = [c.token for c in stream_generate(model, processor, prompt, max_tokens=30)]
    kinds = {type(c) for c in cache.layers}
    assert kinds == {QuantizedChunkCache, QuantizedKVCache}
    agreement = np.mean([a == b for a, b in zip(quant, plain)])
    print(f"8-bit KV greedy agreement: {agreement:.0%}")
    assert agreement >= 0.8


def test_errors(tiny, tmp_path):
    _, model, processor, folder = tiny
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load(tmp_path / "missing")
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
        generate(model, processor, [{"role": "user", "content": "no image part"}], images=[_image()])


def test_cli_generate_and_chat(tiny, tmp_path, capsys):
    import argparse
    import io

    from mlx_llama4.cli import _chat, main

    _, _, _, folder = tiny
    img = tmp_path / "pic.png"
    _image().save(img)
    assert main(["generate", "--model", str(folder), "--prompt", "Hi", "--image", str(img), "--max-tokens", "5",
                 "--temp", "0"]) == 0
    out = capsys.readouterr().out
    assert "[prompt: " in out and "generation: " in out and "peak memory" in out

    args = argparse.Namespace(
        model=str(folder), revision=None, max_tokens=4, temp=0.0, top_p=None, top_k=None, min_p=0.0,
        repetition_penalty=None, seed=None, kv_bits=None, kv_group_size=64)
    stdin = io.StringIO(f"/image {img}\nWhat is it?\n/image /nope.png\nMore?\n/reset\nHello\n/quit\n")
    out = io.StringIO()
    assert _chat(args, stdin=stdin, out=out) == 0
    text = out.getvalue()
    assert "[attached pic.png]" in text and "[no such file: /nope.png]" in text and "[conversation cleared]" in text

    assert main(["generate", "--model", str(tmp_path / "absent"), "--prompt", "x"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_load_from_the_hub_then_offline(tiny, tmp_path):
    """load("owner/repo") through the real huggingface_hub client and a local Hub stand-in; then offline from
    the cache; a repo that is not cached is a clear error offline."""
    import os
    import subprocess
    import sys

    from hub_stub import HubStub

    _, model, processor, folder = tiny
    expected = generate(model, processor, "Hi", max_tokens=4)
    script = ("import sys; from mlx_llama4 import load, generate; m, p = load(sys.argv[1]); "
              "print('REPLY:' + repr(generate(m, p, 'Hi', max_tokens=4)))")
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
