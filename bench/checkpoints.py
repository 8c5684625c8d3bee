"""Scaled-down random Llama 4 checkpoints for the benchmarks, built with transformers (the reference).

Every checkpoint is a Hugging Face ``Llama4ForConditionalGeneration`` folder in float32, written once and reused
(keyed by a hash of its config). Our loader reads it as is. mlx-lm and mlx-vlm do not read the config spelling
that transformers 5 writes (``rope_parameters`` instead of ``rope_theta`` + ``rope_scaling``, no
``vision_feature_layer``), so each checkpoint also gets a ``compat/`` folder: the same ``model.safetensors``
(a symbolic link, so the weights are the very same bytes) with a config.json in the transformers-4 spelling.

Shapes: the published models divided down so the whole benchmark runs in minutes on two CPU cores, keeping the
proportions that decide speed and memory:

- per MoE layer, routed expert width = shared expert width, and Maverick's dense width = 2 x that, so one token
  reads the same number of weights in Scout-like and Maverick-like layers (as in the published models);
- attention chunk ``C`` = 128 (published 8192), with ``floor_scale`` and llama3's
  ``original_max_position_embeddings`` scaled with it, so "past 4 chunks" is ~600 tokens; except in
  ``scout-chunk8k``, which keeps the published 8192 for decoding at 64K tokens, where the chunked layers' share
  of a step depends on chunk / context (1/8 for Scout at 64K, 1/512 with a chunk of 128);
- NoPE (global) attention every 4th layer, GQA 2:1, qk-norm and llama3 RoPE scaling in Scout only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

CHUNK = 128
VOCAB = dict(vocab_size=2048, bos_token_id=1000, eos_token_id=[1001], pad_token_id=1002)
SPECIAL = dict(image_token_index=1020, boi_token_index=1010, eoi_token_index=1011)
PROMPT_ID_RANGE = 1000  # prompts use ids below the special ones

# Checkpoints that a server loads need a tokenizer: those carry the demo model's (mlx_llama4/demo: byte-level BPE,
# 1152 tokens, Llama 4's special tokens by name, the real chat template), with its vocabulary and special ids.
DEMO = Path(__file__).resolve().parent.parent / "mlx_llama4" / "demo"
_DEMO_VOCAB = dict(vocab_size=1152, bos_token_id=562, eos_token_id=[563, 569, 570], pad_token_id=580)
_DEMO_SPECIAL = dict(image_token_index=654, boi_token_index=642, eoi_token_index=643)
_DEMO_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
WORD = re.compile(r"^\u0120[A-Za-z]+$")  # a byte-level BPE token " word": ASCII letters after a space (\u0120 = Ġ)

_TEXT_BASE = dict(
    model_type="llama4_text", hidden_size=256, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
    num_hidden_layers=8, intermediate_size=512, intermediate_size_mlp=1024, num_experts_per_tok=1,
    no_rope_layers=[], no_rope_layer_interval=4, attention_chunk_size=CHUNK, attn_temperature_tuning=True,
    floor_scale=CHUNK, attn_scale=0.1, rms_norm_eps=1e-5, hidden_act="silu", rope_theta=500000.0,
    max_position_embeddings=65536, attention_bias=False, tie_word_embeddings=False, **VOCAB,
)
_LLAMA3 = dict(rope_type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
               original_max_position_embeddings=CHUNK)

# A vision tower small enough to be noise in the text benchmarks.
_TINY_VISION = dict(
    model_type="llama4_vision_model", hidden_size=16, num_attention_heads=2, intermediate_size=64,
    num_hidden_layers=1, image_size=56, patch_size=14, num_channels=3, hidden_act="gelu", norm_eps=1e-5,
    pixel_shuffle_ratio=0.5, projector_input_dim=32, projector_output_dim=32, vision_output_dim=32,
    multi_modal_projector_bias=False, rope_theta=10000,
)
# The published tile geometry (336 px tiles, 14 px patches: 577 tokens per tile, 144 after pixel shuffle)
# with a narrow, shallow tower (published: hidden 1408, 34 layers, 16 heads of 88).
_BENCH_VISION = dict(
    _TINY_VISION, hidden_size=128, num_attention_heads=2, intermediate_size=512, num_hidden_layers=2,
    image_size=336, projector_input_dim=256, projector_output_dim=256, vision_output_dim=256,
)

# name -> (text config overrides, vision config, description)
SPECS: dict[str, tuple[dict, dict, str]] = {
    "scout": (
        dict(num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True, rope_scaling=_LLAMA3),
        _TINY_VISION,
        "Scout-shaped: 8 layers all MoE (16 experts + shared), qk-norm, llama3 RoPE scaling",
    ),
    "scout-wide": (
        dict(hidden_size=1024, head_dim=128, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4,
             intermediate_size=2048, intermediate_size_mlp=4096, num_local_experts=16, interleave_moe_layer_step=1,
             use_qk_norm=True, rope_scaling=_LLAMA3),
        _TINY_VISION,
        "Scout-shaped, 4x wider (hidden 1024, head_dim 128, 4 layers): for the decode-overhead item",
    ),
    "scout-chunk8k": (
        dict(num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True, attention_chunk_size=8192,
             floor_scale=8192, rope_scaling=dict(_LLAMA3, original_max_position_embeddings=8192),
             max_position_embeddings=262144),
        _TINY_VISION,
        "Scout-shaped with the published attention chunk (8192) and Scout's 256K training context: for decoding "
        "at 64K tokens in item 9",
    ),
    "scout-tp": (
        dict(num_attention_heads=8, num_key_value_heads=4, num_local_experts=16, interleave_moe_layer_step=1,
             use_qk_norm=True, rope_scaling=_LLAMA3),
        _TINY_VISION,
        "Scout-shaped with 8 query heads on 4 KV heads (2 and 4 processes share them evenly): for item 8",
    ),
    "maverick": (
        dict(num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None),
        _TINY_VISION,
        "Maverick-shaped: 8 layers, dense even / MoE odd (128 experts + shared), no qk-norm, plain RoPE",
    ),
    "maverick16": (
        dict(num_local_experts=16, interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None),
        _TINY_VISION,
        "the Maverick shape with 16 experts (same active size)",
    ),
    "scout-serve": (
        dict(num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True, rope_scaling=_LLAMA3,
             **_DEMO_VOCAB),
        _TINY_VISION,
        "Scout-shaped with the demo model's tokenizer (1152 tokens), lm_head rows zero but for ' word' tokens: "
        "for the serving item",
    ),
    "vision": (
        dict(hidden_size=64, head_dim=32, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
             intermediate_size=128, intermediate_size_mlp=256, num_local_experts=4, interleave_moe_layer_step=1,
             use_qk_norm=True, rope_scaling=None),
        _BENCH_VISION,
        "vision tower: 336 px tiles, patch 14, hidden 128, 2 layers (tiny text model)",
    ),
}


def text_config(name: str) -> dict:
    cfg = copy.deepcopy(_TEXT_BASE)
    cfg.update(copy.deepcopy(SPECS[name][0]))
    return cfg


def vision_config(name: str) -> dict:
    return copy.deepcopy(SPECS[name][1])


def served(name: str) -> bool:
    """Whether checkpoint ``name`` carries the demo tokenizer (for the servers)."""
    return text_config(name)["vocab_size"] == _DEMO_VOCAB["vocab_size"]


def special(name: str) -> dict:
    return dict(_DEMO_SPECIAL if served(name) else SPECIAL)


def word_token_ids() -> list[int]:
    """Ids of the demo tokenizer's " word" tokens (a space, then ASCII letters): each decodes to text of its
    own, so a streaming server sends one chunk per token, whatever its detokenizer."""
    vocab = json.loads((DEMO / "tokenizer.json").read_text())["model"]["vocab"]
    return sorted(i for t, i in vocab.items() if WORD.match(t))


def cache_root() -> Path:
    root = os.environ.get("MLX_LLAMA4_BENCH_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx-llama4-bench"


def _key(name: str, seed: int) -> str:
    parts = [text_config(name), vision_config(name), special(name), seed]
    if served(name):
        parts.append(["demo tokenizer", "lm_head: word tokens only"])
    blob = json.dumps(parts, sort_keys=True).encode()
    return f"{name}-{hashlib.sha256(blob).hexdigest()[:10]}"


def checkpoint(name: str, seed: int = 0, root: Path | None = None) -> Path:
    """The folder of checkpoint ``name`` (built on first use): HF format, float32, plus ``compat/``."""
    path = (root or cache_root()) / _key(name, seed)
    if not (path / "DONE").exists():
        _build(name, seed, path)
    return path


def _build(name: str, seed: int, path: Path) -> None:
    import torch
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Llama4Config(text_config=text_config(name), vision_config=vision_config(name),
                       tie_word_embeddings=False, **special(name))
    with torch.no_grad():
        model = Llama4ForConditionalGeneration(cfg).float().eval()
        if served(name):
            # Greedy decoding of random weights then only ever picks " word" tokens (their logits are random,
            # the others exactly 0): never an end token (like ignore_eos), never a special token, so every
            # request generates exactly max_tokens tokens, one streamed chunk each, in every server.
            keep = torch.zeros(cfg.text_config.vocab_size, dtype=torch.bool)
            keep[word_token_ids()] = True
            model.language_model.lm_head.weight[~keep] = 0.0
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if served(name):
        for f in _DEMO_FILES:
            shutil.copy(DEMO / f, path / f)
    write_compat(path)
    (path / "DONE").write_text(json.dumps({"name": name, "seed": seed}))


def _legacy_text(tc: dict) -> dict:
    tc = dict(tc)
    params = tc.pop("rope_parameters", None) or {}
    tc.setdefault("rope_theta", params.get("rope_theta", 500000.0))
    if "rope_scaling" not in tc:
        kind = params.get("rope_type", "default")
        tc["rope_scaling"] = None if kind == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
    return tc


def _legacy_vision(vc: dict) -> dict:
    vc = dict(vc)
    params = vc.pop("rope_parameters", None) or {}
    vc.setdefault("rope_theta", params.get("rope_theta", 10000))
    vc.setdefault("vision_feature_layer", -1)
    return vc


def write_compat(path: Path) -> Path:
    """``path/compat``: the same weights (symlinked) with config.json in the transformers-4 spelling."""
    compat = path / "compat"
    compat.mkdir(exist_ok=True)
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"] = _legacy_text(cfg["text_config"])
    if cfg.get("vision_config"):
        cfg["vision_config"] = _legacy_vision(cfg["vision_config"])
    (compat / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in [*path.glob("*.safetensors*"), *(path / f for f in _DEMO_FILES if (path / f).exists())]:
        link = compat / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    return compat


def describe(name: str) -> dict[str, Any]:
    t, v = text_config(name), vision_config(name)
    return {"name": name, "description": SPECS[name][2], "text": t, "vision": v}
