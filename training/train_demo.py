"""Train the bundled demo model: a tiny Llama 4 that talks about pictures of simple shapes and calls tools.

    # the shipped model: 2000 steps (30% of the chats offering tools), then 1000 more (half of them with tools;
    # the learning rate warms up again and decays), then 1000 more with draw_shape requests weighted up (their
    # arguments were right 60% of the time at step 3000) at a lower peak rate, then the HF-format folder
    # converted into the package (about 135 minutes on 2 shared CPU cores in all)
    OMP_WAIT_POLICY=PASSIVE python training/train_demo.py --out /tmp/demo_hf
    OMP_WAIT_POLICY=PASSIVE python training/train_demo.py --out /tmp/demo_hf --resume --steps 3000 --tool-share 0.5
    OMP_WAIT_POLICY=PASSIVE python training/train_demo.py --out /tmp/demo_hf --resume --steps 4000 --lr 1e-3 \
        --tool-share 0.5 --first-mix calculator=2,draw_shape=5,random_number=1,chat=1 --ship mlx_llama4/demo
    python training/train_demo.py --steps 60 --out /tmp/smoke  # a smoke run

The model is transformers' ``Llama4ForConditionalGeneration`` in PyTorch (CPU, float32) with every structural
feature of the real one at a tiny size: routed experts plus a shared expert in the MoE layers, dense layers
between them, NoPE layers with attention temperature tuning, chunked attention with a small chunk, qk-norm,
llama3 RoPE scaling, and the vision tower with pixel shuffle fed multi-tile images. Data is generated on the
fly (``training/shapes.py``; chats that offer tools, ``training/tool_chats.py``); the tokenizer is a small BPE with Llama 4's special tokens
(``training/tokenizer.py``). Everything is seeded: the same command gives the same weights on the same torch
build and thread count.

Prompts are built by ``mlx_llama4.processor.Processor``, the code that serves the model, so the training
inputs (chat template with the tools, image tiling, image token layout) are exactly the inference inputs.

Outputs: ``--out`` (a Hugging Face checkpoint folder, weights in bfloat16, plus tokenizer, chat template,
image-processor config and a model card). Progress checkpoints go to ``--work``; ``--resume`` continues one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mlx_llama4.images import tile_count

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import passkey  # noqa: E402
import shapes  # noqa: E402
import tokenizer as demo_tokenizer  # noqa: E402
import tool_chats  # noqa: E402
import tool_eval  # noqa: E402

TILE = 112  # tile side: 8x8 patches of 14 px -> 16 image tokens per tile after pixel shuffle
MAX_PATCHES = 4  # up to 4 tiles (+ the global tile) per image

VISION = dict(
    model_type="llama4_vision_model",
    hidden_size=128,
    num_attention_heads=4,  # head_dim 32 (a multiple of 4 for the 2-D RoPE)
    intermediate_size=512,  # must be hidden_size / pixel_shuffle_ratio**2
    num_hidden_layers=4,
    image_size=TILE,
    patch_size=14,
    num_channels=3,
    hidden_act="gelu",
    norm_eps=1e-5,
    pixel_shuffle_ratio=0.5,
    projector_input_dim=128,  # these three must be equal
    projector_output_dim=128,
    vision_output_dim=128,
    multi_modal_projector_bias=False,
    rope_theta=10000,
)

TEXT = dict(
    model_type="llama4_text",
    hidden_size=128,
    head_dim=32,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA 2:1
    num_hidden_layers=4,
    intermediate_size=128,  # expert width (routed and shared)
    intermediate_size_mlp=256,  # dense layers' width
    num_local_experts=4,
    num_experts_per_tok=1,
    interleave_moe_layer_step=2,  # layers 1, 3 MoE; 0, 2 dense (the Maverick pattern)
    no_rope_layers=[1, 0, 1, 0],  # layers 1, 3 NoPE (global attention): they carry the image past the chunks
    attention_chunk_size=32,  # RoPE layers attend within chunks of 32 tokens
    use_qk_norm=True,
    attn_temperature_tuning=True,
    floor_scale=16,  # small, so temperature tuning acts at these short lengths
    attn_scale=0.1,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256
    ),
    max_position_embeddings=4096,
    attention_bias=False,
    tie_word_embeddings=False,
    vocab_size=demo_tokenizer.VOCAB_SIZE,
)


# ----------------------------------------------------------------------------------------------------
# Model, tokenizer, processor
# ----------------------------------------------------------------------------------------------------


def build_tokenizer(seed: int):
    from mlx_llama4.processor import REFERENCE_CHAT_TEMPLATE

    texts = shapes.corpus(random.Random(seed + 1)) + tool_chats.corpus(random.Random(seed + 2), REFERENCE_CHAT_TEMPLATE)
    return demo_tokenizer.train_tokenizer(texts)


def build_processor(tok):
    from mlx_llama4.images import ImageSettings
    from mlx_llama4.processor import Processor, tokens_per_tile_for

    fast = demo_tokenizer.fast_tokenizer(tok)
    settings = ImageSettings(size=TILE, max_patches=MAX_PATCHES)
    processor = Processor(
        fast,
        image_settings=settings,
        tokens_per_tile=tokens_per_tile_for(TILE, VISION["patch_size"], VISION["pixel_shuffle_ratio"]),
        patch_size=VISION["patch_size"],
        pixel_shuffle_ratio=VISION["pixel_shuffle_ratio"],
        tokenizer_config={"model_max_length": 4096},
    )
    return processor


def build_model(tok, seed: int):
    import transformers
    from transformers import GenerationConfig, Llama4Config, Llama4ForConditionalGeneration

    # transformers 5.24: forward(return_dict=True) reads a field MoeCausalLMOutputWithPast lacks.
    transformers.modeling_outputs.MoeCausalLMOutputWithPast.image_outputs = None
    ids = demo_tokenizer.special_ids(tok)
    text = dict(TEXT, bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    config = Llama4Config(
        text_config=text,
        vision_config=dict(VISION),
        image_token_index=ids["image_token_index"],
        boi_token_index=ids["boi_token_index"],
        eoi_token_index=ids["eoi_token_index"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Llama4ForConditionalGeneration(config).float()
    model.set_attn_implementation("eager")  # faster than sdpa for these tiny CPU shapes; same math
    # With the default init (std 0.02) the image signal reaching the text model is ~1% of the text's, and
    # attention logits start ~20x smaller than with a fan-in init, so attention stays uniform: the text
    # model averages all image tokens (mostly background) and nothing about the image is learned for a long
    # time. Every linear layer (vision and text; not the embedding table) gets std 1/sqrt(fan_in) instead,
    # scaled down by sqrt(2 * layers) on the projections that write into a residual stream.
    gen = torch.Generator().manual_seed(seed + 7)
    residual_outputs = ("o_proj", "down_proj", "fc2")
    text_layers, vision_layers = TEXT["num_hidden_layers"], VISION["num_hidden_layers"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 or "embed_tokens" in name or "lm_head" in name or "embedding_vlm" in name:
                continue
            fan_in = p.shape[-1] if p.dim() == 2 else int(np.prod(p.shape[1:]))
            if p.dim() == 3:  # experts: gate_up_proj [E, in, 2*out], down_proj [E, out, in] (transformers layout)
                fan_in = p.shape[1]
            std = 1.0 / math.sqrt(fan_in)
            if any(r in name for r in residual_outputs) and "vision_adapter" not in name:
                std /= math.sqrt(2 * (text_layers if "language_model" in name else vision_layers))
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"],
        do_sample=False,
    )
    return model


# ----------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------


class Batcher:
    """Encodes dialogs with the serving processor and masks everything but the assistant replies it trains."""

    def __init__(self, processor, tool_share: float = 0.0, first_mix: Optional[dict] = None,
                 passkey_share: float = 0.0):
        self.processor = processor
        self.tool_share = tool_share
        self.first_mix = first_mix
        self.passkey_share = passkey_share
        self.header = processor.encode("<|header_start|>assistant<|header_end|>\n\n")
        self.eot = processor.token_id("<|eot|>")
        self.pad = processor.token_id("<|finetune_right_pad|>")

    def encode(self, messages, images, tools=None):
        """(ids, labels, pixel values, tiles per image) of a chat rendered with ``tools`` offered. Labels hold
        the replies and their ``<|eot|>`` of the assistant messages that are targets (``is_call_target``)."""
        text = self.processor.apply_chat_template(messages, add_generation_prompt=False, tools=tools)
        enc = self.processor(text=text, images=images)
        tiles = [tile_count(grid) for grid in enc["grids"]]
        ids = enc["input_ids"][0].astype(np.int64)
        labels = np.full_like(ids, -100)
        targets = [tool_chats.is_call_target(m) for m in messages if m["role"] == "assistant"]
        h = len(self.header)
        i = turn = 0
        while i <= len(ids) - h:
            if ids[i] == self.header[0] and list(ids[i : i + h]) == self.header:
                j = i + h
                while j < len(ids) and ids[j] != self.eot:
                    j += 1
                if targets[turn]:
                    labels[i + h : j + 1] = ids[i + h : j + 1]  # the reply and its <|eot|>
                turn += 1
                i = j
            i += 1
        assert turn == len(targets), (turn, len(targets), text)
        return ids, labels, enc["pixel_values"], tiles

    def batch(self, rng: random.Random, size: int, micro: int = 1):
        """``micro`` MicroBatches, rows grouped by length to cut padding."""
        rows = []
        for _ in range(size):
            roll = rng.random()
            if roll < self.passkey_share:
                messages, scenes, tools, task = passkey.training_chat(rng, self.processor.tokenizer), [], None, "passkey"
            elif roll < self.passkey_share + self.tool_share:
                messages, scenes, tools, task = tool_chats.random_dialog(rng, self.first_mix)
                task = f"tool:{task}"
            else:
                (messages, scenes), tools = shapes.random_dialog(rng), None
                task = task_of(messages)
            rows.append((*self.encode(messages, [s.image for s in scenes], tools), task, scenes))
        rows.sort(key=lambda r: len(r[0]))
        per = math.ceil(size / micro)
        return [self._collate(rows[k : k + per]) for k in range(0, size, per)]

    def _collate(self, rows) -> MicroBatch:
        length = max(len(r[0]) for r in rows)
        ids = np.full((len(rows), length), self.pad, np.int64)
        labels = np.full((len(rows), length), -100, np.int64)
        pixels, tiles, scenes = [], [], []
        for b, (i, l, p, t, _, row_scenes) in enumerate(rows):
            ids[b, : len(i)] = i
            labels[b, : len(l)] = l
            if p is not None:  # the tiles of the row's images, in prompt order
                pixels.append(p)
                tiles += t
                scenes += row_scenes
        return MicroBatch(
            ids=torch.from_numpy(ids),
            labels=torch.from_numpy(labels),
            pixel_values=torch.from_numpy(np.concatenate(pixels)) if pixels else None,
            tiles=tiles,
            scenes=scenes,
            tasks=[r[4] for r in rows],
        )


@dataclass
class MicroBatch:
    ids: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L), -100 outside the assistant replies
    pixel_values: torch.Tensor | None  # (tiles of all images, 3, TILE, TILE)
    tiles: list[int]  # tiles per image, in pixel_values order
    scenes: list  # shapes.Scene per image
    tasks: list[str]  # kind of each row's first reply


class ImageProbe(torch.nn.Module):
    """Training-only heads that read each picture's contents off its projected image tokens.

    The replies reach the vision tower only through a few attention layers, a weak and slow signal: trained
    on the replies alone, a 3-layer tower learned colour and count (99%) but named the shape of held-out
    pictures right only 66% of the time (triangles taken for stars, circles for squares), and more steps did
    not help. These heads give the tower and projector a direct loss: for each of the three left-to-right
    slots, an attention pooling over the image's tokens (as the text model's attention would read them)
    feeds classifiers of the shape (or none) and the colour (or none) in that slot. With them (and a 4-layer
    tower of width 128) shape reaches 99% in the same 2000 steps. They are dropped at export; the shipped
    model is a plain Llama 4.
    """

    SLOTS = len(shapes.POSITIONS)

    def __init__(self, dim: int):
        super().__init__()
        self.where = torch.nn.Linear(dim, self.SLOTS)  # attention logits of each token, per slot
        self.kind = torch.nn.Linear(dim, len(shapes.SHAPES) + 1)
        self.colour = torch.nn.Linear(dim, len(shapes.COLOUR_NAMES) + 1)

    def loss(self, features: torch.Tensor, tiles: list[int], scenes: list) -> torch.Tensor:
        """``features``: (tiles * tokens per tile, dim), the projector output in pixel_values order."""
        per_image = features.view(sum(tiles), -1, features.shape[-1]).split(tiles)  # [(tiles, tokens, dim)]
        pooled = []
        for tokens in per_image:
            tokens = tokens.reshape(-1, tokens.shape[-1])  # (N, dim)
            weights = self.where(tokens).softmax(dim=0)  # (N, SLOTS)
            pooled.append(weights.T @ tokens)  # (SLOTS, dim)
        pooled = torch.stack(pooled)  # (images, SLOTS, dim)
        kinds = torch.full((len(scenes), self.SLOTS), len(shapes.SHAPES))
        colours = torch.full((len(scenes), self.SLOTS), len(shapes.COLOUR_NAMES))
        for i, scene in enumerate(scenes):
            for s in scene.shapes:
                slot = shapes.POSITIONS.index(s.position)
                kinds[i, slot] = shapes.SHAPES.index(s.kind)
                colours[i, slot] = shapes.COLOUR_NAMES.index(s.colour)
        ce = torch.nn.functional.cross_entropy
        return (ce(self.kind(pooled).flatten(0, 1), kinds.view(-1))
                + ce(self.colour(pooled).flatten(0, 1), colours.view(-1)))


def task_of(messages) -> str:
    """The kind of the first reply, for per-task accuracy logs."""
    for i, m in enumerate(messages):
        if m["role"] == "user" and not isinstance(m["content"], str):
            question = next(p["text"] for p in m["content"] if p["type"] == "text")
            for name, (questions, _) in shapes.QUESTIONS.items():
                if question in questions:
                    return name
    return "text"


# ----------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------

MODEL_CARD = """# mlx-llama4 demo model

**A demonstration model, not Llama 4.** This is a {params:.1f} M-parameter model with Llama 4's architecture,
trained from scratch for {minutes:.0f} minutes on 2 CPU cores on synthetic pictures of simple shapes. It has
none of Llama 4's knowledge or languages. It exists so that the mlx-llama4 API, CLI and chat app work
offline out of the box, and so that tests have a model whose answers can be checked.

```python
from mlx_llama4 import load, generate
model, processor = load("demo")
print(generate(model, processor, "Describe the picture.", images=["shapes.png"]))  # e.g. "A red circle and a blue star."
```

What it can do (greedy decoding):
- pictures of 1 to 3 shapes ({shapes}) in {colours} on a light background:
  name the shape(s) and colour(s), count them, say where they are (left / middle / right) and describe
  the picture in one line ("A red circle and a blue star.");
- follow-up questions about the same picture ("And the colour?"), and a second picture later in the chat
  (questions are about the newest one);
- greetings, saying what it is, and single-digit additions ("What is 3 plus 4?");
- tools, offered the OpenAI / Hugging Face way (`tools=[{{"type": "function", "function": {{...}}}}]`, which the
  chat template writes into the first user message): `calculator(expression)`, `draw_shape(shape, colour)` and
  `random_number(low, high)` with the specs in `mlx_llama4/demo_tools.py`, in any order and subset. It calls the
  one a request needs ("What is 17 times 23?" -> `{{"name": "calculator", "parameters": {{"expression":
  "17 * 23"}}}}`, the JSON form the template renders for `tool_calls`, ending with `<|eot|>`), with the arguments
  taken from the request, answers from the tool's result in the next turn ("17 times 23 is 391."), says
  "{no_tool}" when the needed tool is not offered, and calls nothing for greetings, questions about
  itself or pictures (a picture must come after the first user message, which the template fills with the
  tools). `mlx_llama4.tool_calls.parse_tool_calls` reads its calls.

Anything else gets an answer in the same style that is probably wrong.

Architecture (every structural feature of Llama 4 at a tiny size): {layers} text layers, hidden size {hidden},
{heads} query / {kv} key-value heads; MoE layers {moe} with {experts} routed experts (top-1) plus a shared
expert, dense layers in between; NoPE layers {nope} with attention temperature tuning; chunked attention
(chunk {chunk}) with qk-norm on the RoPE layers; llama3 RoPE scaling; a {vlayers}-layer vision encoder on
{tile}-px tiles (up to {max_patches} tiles plus a global tile per image) with pixel shuffle, adapter and projector.
Tokenizer: byte-level BPE with {vocab} tokens, carrying Llama 4's special tokens by their real names and the
real chat template; the ids differ from the real 202048-token vocabulary and are in config.json.

Trained with `training/train_demo.py` in the mlx-llama4 repository (seed {seed}, {steps} steps of {batch}
freshly generated chats: 2000 with 30% of them offering tools, then, resumed, 1000 with 50%, then 1000 with 50%
and more of them asking for drawings; the commands are in the script's docstring; a training-only probe on the
image tokens, not shipped, gave the vision encoder a direct loss). `tests/test_demo.py` and
`tests/test_demo_tools.py` check its held-out accuracy; `training/eval_tools_server.py` measures its tool use through `mlx-llama4 serve`.
"""


def export(model, processor, tok, out: Path, info: dict) -> Path:
    """Write the HF-format checkpoint folder: weights in bfloat16 safetensors, tokenizer, template, configs."""
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*.safetensors"):
        f.unlink()
    state = {k: (v.detach().to(torch.bfloat16) if v.is_floating_point() else v.detach()) for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=state)
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = "bfloat16"  # what the safetensors hold (save_pretrained records the live model's float32)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    processor.save_pretrained(out)
    # the processor saves the tokenizer through the fast tokenizer's backend: make sure roles are there
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.update(bos_token="<|begin_of_text|>", eos_token="<|eot|>", pad_token="<|finetune_right_pad|>")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_card(out, info)
    return out


def write_card(folder: Path, info: dict) -> None:
    """The model card (README.md) of a checkpoint folder, from its config.json and the training facts."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    t, v = config["text_config"], config["vision_config"]
    params = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            params += sum(int(np.prod(st.get_slice(k).get_shape())) for k in st.keys())
    card = MODEL_CARD.format(
        params=params / 1e6, minutes=info.get("minutes", 0), shapes=", ".join(shapes.SHAPES),
        colours=", ".join(shapes.COLOUR_NAMES), layers=t["num_hidden_layers"], hidden=t["hidden_size"],
        heads=t["num_attention_heads"], kv=t["num_key_value_heads"], moe=t["moe_layers"],
        experts=t["num_local_experts"], nope=[i for i, r in enumerate(t["no_rope_layers"]) if not r],
        chunk=t["attention_chunk_size"], vlayers=v["num_hidden_layers"], tile=v["image_size"],
        max_patches=MAX_PATCHES, vocab=t["vocab_size"], seed=info.get("seed"), steps=info.get("steps"),
        batch=info.get("batch"), no_tool=tool_chats.NO_TOOL,
    )
    (folder / "README.md").write_text(card)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def measure_accuracy(folder: Path, n: int = 60, seed: int = 99_991) -> dict:
    """Exact-match accuracy of greedy replies through the MLX pipeline on fresh single-shape (colour, shape)
    and 1-3-shape (count) images, and the held-out tool scores of ``tool_eval.measure`` (prefixed ``tool_``)."""
    import mlx.core as mx

    from mlx_llama4 import generate, load

    model, processor = load(folder, dtype=mx.float32)
    rng = random.Random(seed)
    out = {"n": n}
    for task in ("colour", "shape", "count"):
        questions, answer = shapes.QUESTIONS[task]
        right = 0
        for i in range(n):
            scene = shapes.random_scene(rng, count=None if task == "count" else 1)
            reply = generate(model, processor, questions[i % len(questions)], images=[scene.image], max_tokens=24,
                             temperature=0.0)
            right += reply.strip() == answer(scene)
        out[task] = right / n
    tools, _ = tool_eval.measure(tool_eval.generate_ask(model, processor), n=n // 2)
    out.update({f"tool_{k}": v for k, v in tools.items()})
    return out


def ship(hf_folder: Path, package_folder: Path) -> Path:
    """Put the trained model into the package: ``package_folder`` (``mlx_llama4/demo``) gets the checkpoint
    converted with our converter (bfloat16, not quantized) and the model card; ``package_folder/hf`` keeps the
    Hugging Face-format original, for transformers (the parity test loads it)."""
    import shutil

    from mlx_llama4.convert import convert

    package_folder = Path(package_folder)
    staging = package_folder.with_name(f".{package_folder.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    convert(hf_folder, staging, dtype="bfloat16", force=True, verbose=False)
    card = (Path(hf_folder) / "README.md").read_text()  # our card, not the converter's generic one
    card += "\nWeights: bfloat16, converted with `mlx_llama4.convert`; `hf/` holds the Hugging Face-format original.\n"
    accuracy = measure_accuracy(staging)
    card += "\nHeld-out accuracy through mlx-llama4, greedy, {n} fresh images per question: " \
            "colour {colour:.0%}, shape {shape:.0%}, count {count:.0%}; tools ({tool_n} held-out requests per " \
            "tool): right tool called {tool_select:.0%}, right call with the right arguments {tool_call:.0%} (calculator {tool_call_calculator:.0%}, draw_shape " \
            "{tool_call_draw_shape:.0%}, random_number {tool_call_random_number:.0%}), answer from the result " \
            "{tool_answer:.0%}, no call when none is " \
            "needed {tool_no_call:.0%}, no call when the tool is not offered {tool_not_offered:.0%}.\n".format(
                **accuracy, tool_n=accuracy["n"] // 2)
    print(card.splitlines()[-1], flush=True)
    (staging / "README.md").write_text(card)
    hf_copy = staging / "hf"
    hf_copy.mkdir()
    for f in Path(hf_folder).iterdir():
        if f.is_file():
            shutil.copy(f, hf_copy / f.name)
    shutil.rmtree(package_folder, ignore_errors=True)
    staging.rename(package_folder)
    for f in package_folder.rglob("*"):
        if f.is_file():
            f.chmod(0o644)
    return package_folder


def lr_at(step: int, total: int, peak: float, warmup: int, decay_fraction: float = 0.3) -> float:
    """Warmup, constant, then a linear decay to 10% over the last ``decay_fraction`` of the steps.

    Until the decay starts the rate does not depend on ``total``, so a run can be resumed with more steps.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_start = int(total * (1 - decay_fraction))
    if step < decay_start:
        return peak
    return peak * (1.0 - 0.9 * (step - decay_start) / max(1, total - decay_start))


def _mix(text: str) -> dict:
    """``calculator=2,draw_shape=4`` -> {"calculator": 2.0, "draw_shape": 4.0}, kinds checked."""
    mix = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind not in tool_chats.FIRST_MIX:
            raise argparse.ArgumentTypeError(f"unknown kind {kind!r} (one of {', '.join(tool_chats.FIRST_MIX)})")
        try:
            mix[kind] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: write KIND=WEIGHT, e.g. draw_shape=4") from None
    return mix


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="HF-format checkpoint folder to write")
    parser.add_argument("--work", type=Path, default=Path("/tmp/demo_train_work"), help="progress checkpoints")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--micro", type=int, default=16, help="micro-batches per step (grouped by length)")
    parser.add_argument("--tool-share", type=float, default=0.3,
                        help="share of the chats that offer tools (training/tool_chats.py)")
    parser.add_argument("--first-mix", type=_mix, default=None, metavar="KIND=W,...",
                        help="weights of a tool chat's first request, e.g. calculator=2,draw_shape=4,random_number=1,"
                             "chat=1 (default: tool_chats.FIRST_MIX)")
    parser.add_argument("--passkey-share", type=float, default=0.0,
                        help="share of the chats that are passkey retrieval (training/passkey.py; not in the shipped "
                             "model)")
    parser.add_argument("--probe-weight", type=float, default=1.0,
                        help="weight of the training-only image probe loss (see ImageProbe; 0 turns it off)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine, 2 threads spin-wait and run 4x slower)")
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--resume", action="store_true", help="continue from --work/state.pt")
    parser.add_argument("--ship", type=Path, default=None,
                        help="after training, convert --out into this package folder (e.g. mlx_llama4/demo)")
    parser.add_argument("--ship-only", action="store_true", help="only convert an existing --out into --ship")
    args = parser.parse_args(argv)
    if args.ship_only:
        state = args.work / "state.pt"
        minutes = torch.load(state, weights_only=False)["elapsed"] / 60 if state.exists() else 0
        write_card(args.out, dict(minutes=minutes, seed=args.seed, steps=args.steps, batch=args.batch,
                                  tool_share=args.tool_share))
        print(f"shipped {ship(args.out, args.ship)}")
        return

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    tok = build_tokenizer(args.seed)
    processor = build_processor(tok)
    model = build_model(tok, args.seed)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f} M; vocab {tok.get_vocab_size()}; ids {demo_tokenizer.special_ids(tok)}",
          flush=True)

    probe = ImageProbe(VISION["projector_output_dim"])
    projected = []  # the projector's output of the current forward pass, for the probe
    model.multi_modal_projector.register_forward_hook(lambda module, inputs, output: projected.append(output))
    params = list(model.named_parameters()) + [(f"probe.{n}", p) for n, p in probe.named_parameters()]
    decay = [p for n, p in params if p.dim() >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in params if not (p.dim() >= 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    batcher = Batcher(processor, args.tool_share, args.first_mix, args.passkey_share)
    args.work.mkdir(parents=True, exist_ok=True)
    start = 0
    elapsed_before = 0.0
    if args.resume and (args.work / "state.pt").exists():
        state = torch.load(args.work / "state.pt", weights_only=False)
        model.load_state_dict(state["model"])
        probe.load_state_dict(state["probe"])
        opt.load_state_dict(state["opt"])
        start, elapsed_before = state["step"], state.get("elapsed", 0.0)
        print(f"resumed at step {start}", flush=True)

    t0 = time.time()
    window = {"loss": [], "probe": [], "correct": {}, "count": {}}
    for step in range(start, args.steps):
        rng = random.Random(args.seed * 1_000_003 + step)  # the data of a step depends only on (seed, step)
        micro_batches = batcher.batch(rng, args.batch, args.micro)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        n_targets = sum(int((mb.labels[:, 1:] != -100).sum()) for mb in micro_batches)
        n_images = sum(len(mb.scenes) for mb in micro_batches)
        opt.zero_grad(set_to_none=True)
        total = probe_total = 0.0
        for mb in micro_batches:
            projected.clear()
            out = model(input_ids=mb.ids, pixel_values=mb.pixel_values, use_cache=False, return_dict=True)
            logits = out.logits[:, :-1].float()
            target = mb.labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum") / n_targets
            total += loss.item()
            if mb.scenes and args.probe_weight:
                probe_loss = probe.loss(projected[0], mb.tiles, mb.scenes) * len(mb.scenes) / n_images
                probe_total += probe_loss.item()
                loss = loss + args.probe_weight * probe_loss
            loss.backward()
            with torch.no_grad():  # teacher-forced exact match of whole replies, per task of the first reply
                mask = target != -100
                wrong = ((logits.argmax(-1) != target) & mask).any(-1)
                for task, w in zip(mb.tasks, wrong.tolist()):
                    window["correct"][task] = window["correct"].get(task, 0) + (not w)
                    window["count"][task] = window["count"].get(task, 0) + 1
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()

        window["loss"].append(total)
        window["probe"].append(probe_total)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            elapsed = elapsed_before + time.time() - t0
            acc = " ".join(f"{k}={window['correct'][k] / window['count'][k]:.2f}" for k in sorted(window["count"]))
            print(f"step {done}/{args.steps} loss {np.mean(window['loss']):.4f} probe {np.mean(window['probe']):.3f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} {elapsed / 60:.1f} min ({(time.time() - t0) / (done - start):.2f} s/step) exact: {acc}", flush=True)
            window = {"loss": [], "probe": [], "correct": {}, "count": {}}
        if done % args.save_every == 0 or done == args.steps:
            elapsed = elapsed_before + time.time() - t0
            torch.save({"model": model.state_dict(), "probe": probe.state_dict(), "opt": opt.state_dict(),
                        "step": done, "elapsed": elapsed},
                       args.work / "state.pt.tmp")
            os.replace(args.work / "state.pt.tmp", args.work / "state.pt")
            info = dict(minutes=elapsed / 60, seed=args.seed, steps=done, batch=args.batch, tool_share=args.tool_share)
            export(model.eval(), processor, tok, args.work / "latest", info)
            model.train()
            if done == args.steps:
                export(model.eval(), processor, tok, args.out, info)
                print(f"wrote {args.out}", flush=True)
                if args.ship:
                    print(f"shipped {ship(args.out, args.ship)}", flush=True)


if __name__ == "__main__":
    main()
