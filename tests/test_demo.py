"""The bundled demo model: it loads as "demo", answers about held-out pictures of shapes through the MLX
pipeline, and its greedy tokens equal those of the transformers model it was trained as.

``mlx_llama4/demo`` holds the checkpoint converted by ``mlx_llama4.convert`` (what ``load("demo")`` reads) and
``mlx_llama4/demo/hf`` the Hugging Face-format original written by ``training/train_demo.py``."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import Llama4ForConditionalGeneration

from mlx_llama4 import generate, load, stream_generate
from mlx_llama4.hub import DEMO_PATH, resolve_model_path
from mlx_llama4.processor import REFERENCE_CHAT_TEMPLATE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))
import shapes  # noqa: E402  (the generator the model was trained on; fresh seeds give held-out data)

HELD_OUT_SEED = 20_250_607  # training draws step data from seeds 0..steps and the tokenizer corpus from 1
N_IMAGES = 120
# Held-out accuracy the shipped model must reach (greedy, exact reply match) through the MLX pipeline, as
# issue 6 asks. The shipped model measures colour 100%, shape 99%, count 99% on these images.
TARGETS = {"colour": 0.95, "shape": 0.90, "count": 0.90}


@pytest.fixture(scope="module")
def demo():
    return load("demo", dtype=mx.float32)  # as transformers runs it below, on any backend


def _ask(model, processor, question, image=None, max_tokens=24):
    images = [image] if image is not None else None
    return generate(model, processor, question, images=images, max_tokens=max_tokens, temperature=0.0).strip()


def _scenes(seed, n, count=None):
    rng = random.Random(seed)
    return [shapes.random_scene(rng, count=count) for _ in range(n)], rng


def test_demo_folder_is_shipped_and_consistent():
    assert resolve_model_path("demo") == DEMO_PATH
    files = {f.name for f in DEMO_PATH.iterdir()}
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "preprocessor_config.json", "generation_config.json", "README.md"):
        assert name in files, name
    assert sum(f.stat().st_size for f in DEMO_PATH.rglob("*") if f.is_file()) <= 20 * 1024 * 1024
    assert (DEMO_PATH / "chat_template.jinja").read_text() == REFERENCE_CHAT_TEMPLATE
    assert "not Llama 4" in (DEMO_PATH / "README.md").read_text()
    hf_files = {f.name for f in (DEMO_PATH / "hf").iterdir()}  # the Hugging Face-format original
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= hf_files

    config = json.loads((DEMO_PATH / "config.json").read_text())
    vocab = json.loads((DEMO_PATH / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    text = config["text_config"]
    assert text["vocab_size"] != 202048 and text["vocab_size"] >= max(ids.values()) + 1
    assert text["bos_token_id"] == ids["<|begin_of_text|>"]
    assert text["pad_token_id"] == ids["<|finetune_right_pad|>"]
    assert set(text["eos_token_id"]) == {ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]}
    assert config["image_token_index"] == ids["<|patch|>"]
    assert config["boi_token_index"] == ids["<|image_start|>"]
    assert config["eoi_token_index"] == ids["<|image_end|>"]
    # every structural feature of Llama 4 is present
    assert text["num_local_experts"] > 1 and text["interleave_moe_layer_step"] > 1  # dense and MoE layers
    assert 0 in text["no_rope_layers"] and 1 in text["no_rope_layers"]  # NoPE and chunked RoPE layers
    assert text["attention_chunk_size"] and text["use_qk_norm"] and text["attn_temperature_tuning"]


def test_prompt_uses_multi_tile_layout(demo):
    _, processor = demo
    scene = shapes.random_scene(random.Random(3), count=2)
    image = scene.image.resize((300, 140))
    inputs = processor(messages=[shapes.image_message("Hi")], images=[image])
    assert inputs["grids"][0] != (1, 1) and inputs["pixel_values"].shape[0] > 1


@pytest.fixture(scope="module")
def held_out(demo):
    """(accuracy per task, misses): greedy replies through the MLX pipeline on held-out images, exact match."""
    model, processor = demo
    singles, _ = _scenes(HELD_OUT_SEED, N_IMAGES, count=1)
    mixed, _ = _scenes(HELD_OUT_SEED + 1, N_IMAGES)
    scores = {"colour": 0, "shape": 0, "count": 0}
    misses = []
    for task, scenes in (("colour", singles), ("shape", singles), ("count", mixed)):
        questions, answer = shapes.QUESTIONS[task]
        for i, scene in enumerate(scenes):
            reply = _ask(model, processor, questions[i % len(questions)], scene.image)
            if reply == answer(scene):
                scores[task] += 1
            else:
                misses.append((task, answer(scene), reply))
    accuracy = {k: v / N_IMAGES for k, v in scores.items()}
    print("held-out accuracy:", accuracy)
    return accuracy, misses


def test_held_out_accuracy(held_out):
    accuracy, misses = held_out
    for task, target in TARGETS.items():
        assert accuracy[task] >= target, (task, accuracy, [m for m in misses if m[0] == task][:10])


def test_text_skills(demo):
    model, processor = demo
    assert _ask(model, processor, "Hello!") == shapes.GREETING
    assert _ask(model, processor, "Who are you?", max_tokens=40) == shapes.IDENTITY
    rng = random.Random(HELD_OUT_SEED)
    pairs = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(10)]
    right = sum(_ask(model, processor, f"What is {a} plus {b}?") == shapes.addition_answer(a, b) for a, b in pairs)
    assert right >= 8, right


def test_follow_up_about_the_same_image(demo):
    model, processor = demo
    rng = random.Random(HELD_OUT_SEED + 2)
    right = 0
    for _ in range(5):
        scene = shapes.random_scene(rng, count=1)
        messages = [shapes.image_message("What shape is this?"),
                    {"role": "assistant", "content": shapes.shape_answer(scene)},
                    {"role": "user", "content": "And the colour?"}]
        reply = generate(model, processor, messages, images=[scene.image], max_tokens=16, temperature=0.0)
        right += reply.strip() == shapes.colour_answer(scene)
    assert right >= 4, right


def test_answers_about_the_newest_of_two_pictures(demo):
    """A second picture later in the chat is the one the next question is about."""
    model, processor = demo
    rng = random.Random(HELD_OUT_SEED + 4)
    right = 0
    for i in range(10):
        first, second = shapes.random_scene(rng, count=1), shapes.random_scene(rng, count=1)
        questions, answer = shapes.QUESTIONS[("shape", "colour")[i % 2]]
        messages = [shapes.image_message(questions[0]),
                    {"role": "assistant", "content": answer(first)},
                    shapes.image_message(questions[1])]
        reply = generate(model, processor, messages, images=[first.image, second.image], max_tokens=16,
                         temperature=0.0)
        right += reply.strip() == answer(second)
    assert right >= 9, right


def test_greedy_tokens_match_transformers(demo):
    """The shipped weights in transformers (float32) and in MLX give the same greedy tokens on 20 image prompts."""
    torch.manual_seed(0)
    hf = Llama4ForConditionalGeneration.from_pretrained(DEMO_PATH / "hf", dtype=torch.float32).eval()
    model, processor = demo
    eos = list(processor.eos_token_ids)
    rng = random.Random(HELD_OUT_SEED + 3)
    tasks = list(shapes.QUESTIONS)
    for i in range(20):
        scene = shapes.random_scene(rng)
        questions, _ = shapes.QUESTIONS[tasks[i % len(tasks)]]
        messages = [shapes.image_message(rng.choice(questions))]
        inputs = processor(messages=messages, images=[scene.image])
        ids = torch.from_numpy(np.asarray(inputs["input_ids"])).long()
        with torch.no_grad():
            out = hf.generate(input_ids=ids, pixel_values=torch.from_numpy(np.asarray(inputs["pixel_values"])),
                              max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
        expected = out[0, ids.shape[1]:].tolist()
        got = [c.token for c in stream_generate(model, processor, messages, images=[scene.image], max_tokens=20,
                                                temperature=0.0)]
        if expected and expected[-1] in eos:  # transformers keeps the end token, stream_generate does not yield it
            expected = expected[:-1]
        got = [t for t in got if t not in eos]
        assert got == expected, (i, processor.decode(got), processor.decode(expected))
