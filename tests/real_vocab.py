"""A tiny Llama 4 checkpoint with the real vocabulary and tokenizer, for tests of generation and the app."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from checkpoints import VISION, build_hf, text_config
from tokenizer_util import real_tokenizer_dir

REAL_VOCAB = dict(vocab_size=202048, bos_token_id=200000, eos_token_id=[200001, 200007, 200008], pad_token_id=200018)
REAL_SPECIAL = dict(image_token_index=200092, boi_token_index=200080, eoi_token_index=200081)


def build_checkpoint(folder: Path, text_overrides: dict | None = None, seed: int = 0):
    """Write to ``folder`` a Maverick-shaped float32 checkpoint (transformers' ``save_pretrained``) with the real
    vocabulary, the real tokenizer and 56-px tiles (4 tokens each); returns the transformers model."""
    hf = build_hf(dict(text_config("maverick"), **REAL_VOCAB, **(text_overrides or {})), VISION, seed, REAL_SPECIAL)
    hf.save_pretrained(folder)
    for f in real_tokenizer_dir().iterdir():
        shutil.copy(f, Path(folder) / f.name)
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 56, "width": 56}, "max_patches": 4, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
         "rescale_factor": 1 / 255, "resize_to_max_canvas": False}))
    return hf


def random_image(w: int = 110, h: int = 50, seed: int = 0):
    """A picture of random pixels (w x h: 2 x 1 tiles of 56 px for these checkpoints)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
