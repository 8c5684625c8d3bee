"""Turning a prompt into token ids, per-position keys and pixels, without MLX: for ``stream_generate`` and for
the engine, which calls it in the caller's thread so that bad input raises there, never on its device thread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .images import ImageInput
from .model import Model
from .prompt_cache import image_keys


@dataclass(frozen=True)
class Prompt:
    ids: np.ndarray  # (L,) int32 token ids
    keys: np.ndarray  # (L,) int64: the token id, or for an image's <|patch|> rows a key of its pixels
    image_spans: list[tuple[int, int]]  # each image's [start, end) of <|patch|> positions
    first_tiles: list[int]  # each image's first tile in pixel_values
    pixel_values: Optional[np.ndarray]  # (tiles, 3, S, S) float32, or None

    def __len__(self) -> int:
        return len(self.ids)


def _is_token_ids(prompt: Any) -> bool:
    if isinstance(prompt, np.ndarray):
        return prompt.ndim == 1 and np.issubdtype(prompt.dtype, np.integer)
    return (
        isinstance(prompt, (list, tuple))
        and len(prompt) > 0
        and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt)
    )


def prepare_prompt(model: Model, processor: Any, prompt: str | Sequence[dict] | Sequence[int],
                   images: Optional[ImageInput | Sequence[ImageInput]] = None,
                   tools: Optional[Sequence[dict]] = None) -> Prompt:
    """``prompt``: a string (one user turn, after ``images``), chat messages in the Hugging Face format (image
    parts inline or taking ``images`` in order), or token ids (a raw completion: fed as given, no template).
    ``images`` is one image or a list of them; ``tools`` (function specs) go to the chat template.
    ValueError names what is wrong; a prompt that does not fit the context is refused, never truncated."""
    cfg = model.config
    if _is_token_ids(prompt):
        if images or tools:
            raise ValueError("images= and tools= need a string or chat-message prompt, not token ids")
        ids = np.asarray(prompt, np.int64)
        vocab = cfg.text.vocab_size
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {vocab})")
        if (ids == cfg.image_token_index).any():
            raise ValueError(f"token ids hold the image token {cfg.image_token_index} (<|patch|>); "
                             "pass images in a chat-message prompt instead")
        pixels, grids = None, []
    else:
        template = {"tools": list(tools)} if tools else {}
        inputs = processor(messages=prompt, images=images, **template)  # a ProcessorError names a malformed one
        ids, pixels, grids = np.asarray(inputs["input_ids"])[0], inputs["pixel_values"], inputs["grids"]
        if grids and cfg.vision is None:
            raise ValueError("the prompt has images, but this checkpoint is text-only (no vision_config)")
    limit = cfg.text.max_position_embeddings
    if len(ids) >= limit:
        raise ValueError(f"the prompt has {len(ids)} tokens; this model's context is {limit} positions "
                         "(max_position_embeddings)")
    per_tile = cfg.vision.tokens_per_tile if cfg.vision else 0
    keys, spans, first_tiles = image_keys(ids, pixels, grids, cfg.image_token_index, per_tile)
    return Prompt(ids.astype(np.int32), keys, spans, first_tiles, pixels)
