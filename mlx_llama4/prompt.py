"""The layout of a Llama 4 prompt: one row of token ids in which every image is a block of special tokens.

The chat template renders ``<|image|>`` once per image; the tokenized text then has each ``<|image|>`` swapped
for its image's block: ``<|image_start|>``, then per tile ``tokens_per_tile`` ``<|patch|>`` tokens with
``<|tile_x_separator|>`` between the tiles of a row and ``<|tile_y_separator|>`` after every row, then
``<|image|>`` and the global tile's patches, then ``<|image_end|>`` (a one-tile image has only
``<|image_start|> <|image|>`` and its patches). The vision features later replace the ``<|patch|>`` tokens in
order, so the count of ``<|patch|>`` tokens must equal tiles x tokens_per_tile. The rules and their sources are
in docs/architecture.md ("Image tokens" and "Chat template and BOS").

The template already starts with ``<|begin_of_text|>`` while the Hub tokenizer's post-processor would add
another, so text is always tokenized without added special tokens and BOS is prepended only when missing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import numpy as np

from .tokenizer import BOS_TOKEN

IMAGE_PLACEHOLDER = "<|image|>"
HEADER_START = "<|header_start|>"


class ProcessorError(ValueError):
    """Inputs that cannot be turned into a prompt: e.g. a different number of images and placeholders."""


@dataclasses.dataclass(frozen=True)
class ImageTokenIds:
    """Ids of the special tokens that frame an image, looked up by name in the tokenizer's vocabulary."""

    image_start: int
    image_end: int
    image: int
    patch: int
    tile_x_separator: int
    tile_y_separator: int

    NAMES = {
        "image_start": "<|image_start|>",
        "image_end": "<|image_end|>",
        "image": "<|image|>",
        "patch": "<|patch|>",
        "tile_x_separator": "<|tile_x_separator|>",
        "tile_y_separator": "<|tile_y_separator|>",
    }

    @classmethod
    def lookup(cls, token_id: Callable[[str], Optional[int]]) -> "ImageTokenIds":
        """The ids by ``token_id(name)``; an error naming the tokens the vocabulary lacks."""
        found = {field: token_id(name) for field, name in cls.NAMES.items()}
        missing = [cls.NAMES[f] for f, i in found.items() if i is None]
        if missing:
            raise ProcessorError(f"the tokenizer has no image tokens {', '.join(missing)}; it cannot take images")
        return cls(**found)


def tokens_per_tile_for(tile_size: int, patch_size: int, pixel_shuffle_ratio: float) -> int:
    """``<|patch|>`` tokens per tile: (tile / patch)^2 patches, merged 1/ratio^2 at a time by pixel shuffle."""
    if tile_size % patch_size:
        raise ValueError(f"tile size {tile_size} is not a multiple of the patch size {patch_size}")
    merge = int(round(1.0 / (pixel_shuffle_ratio**2)))
    return (tile_size // patch_size) ** 2 // merge


def image_token_count(grid: tuple[int, int], tokens_per_tile: int) -> int:
    """Length of an image's token block: 3 + N for one tile, (N+1)*rows*cols + N + 3 for a grid."""
    rows, cols = grid
    if rows * cols == 1:
        return tokens_per_tile + 3
    return rows * cols * (tokens_per_tile + 1) + tokens_per_tile + 3


def image_token_ids(grid: tuple[int, int], tokens_per_tile: int, ids: ImageTokenIds) -> list[int]:
    """The token block of one image with a (rows, cols) tile grid.

    One tile: ``<|image_start|> <|image|> P*N <|image_end|>``. A grid: row-major tiles of N patches,
    ``<|tile_x_separator|>`` between columns, ``<|tile_y_separator|>`` after every row (the last included),
    then ``<|image|>`` and the global tile's N patches, then ``<|image_end|>``.
    """
    rows, cols = grid
    patches = [ids.patch] * tokens_per_tile
    tokens = [ids.image_start]
    if rows * cols > 1:
        row: list[int] = []
        for col in range(cols):
            row += patches
            if col < cols - 1:
                row.append(ids.tile_x_separator)
        row.append(ids.tile_y_separator)
        tokens += row * rows
    tokens += [ids.image, *patches, ids.image_end]
    return tokens


def is_templated(text: str) -> bool:
    """Whether a prompt string is already chat-template output (it starts with ``<|begin_of_text|>`` or holds a
    ``<|header_start|>``), e.g. from ``processor.apply_chat_template``: it must not be wrapped in a user turn again."""
    return text.startswith(BOS_TOKEN) or HEADER_START in text


def merge_images(inline: list, given: list) -> list:
    """One source per image part: inline ones as they are; parts without one take ``given`` in order."""
    needed = sum(source is None for source in inline)
    if needed != len(given):
        raise ProcessorError(
            f"the messages have {len(inline)} image parts ({len(inline) - needed} with an inline image, {needed} "
            f"without) but {len(given)} images were passed for the {needed} without; the counts must match"
        )
    supplied = iter(given)
    return [next(supplied) if source is None else source for source in inline]


def placeholder_positions(ids: np.ndarray, placeholder: Optional[int], images: int) -> np.ndarray:
    """Positions of the ``<|image|>`` tokens (id ``placeholder``) in tokenized text ``ids`` (L0,); an error unless
    there is one per image."""
    positions = np.flatnonzero(ids == placeholder) if placeholder is not None else np.zeros(0, np.int64)
    if len(positions) != images:
        raise ProcessorError(
            f"the prompt has {len(positions)} {IMAGE_PLACEHOLDER} placeholders but {images} images "
            "were given; there must be one image per placeholder"
        )
    return positions


def layout_ids(ids: np.ndarray, positions: np.ndarray, grids: list[tuple[int, int]], tokens_per_tile: int,
               image_ids: Optional[ImageTokenIds], bos: Optional[int]) -> np.ndarray:
    """The model's ``input_ids`` (1, L) int32 from tokenized text ``ids`` (L0,): BOS first (once), and the
    ``<|image|>`` at each of ``positions`` replaced by the block of the image with the same index in ``grids``."""
    pieces: list[np.ndarray] = []
    if bos is not None and (ids.size == 0 or ids[0] != bos):
        pieces.append(np.asarray([bos]))
    start = 0
    for position, grid in zip(positions, grids):
        pieces.append(ids[start:position])
        pieces.append(np.asarray(image_token_ids(grid, tokens_per_tile, image_ids)))
        start = position + 1
    pieces.append(ids[start:])
    return np.concatenate(pieces).astype(np.int32)[None]  # (1, L)


def image_list(images: Any) -> list:
    """``images`` as a list: None, one image (path, bytes, PIL image or array), or a list/tuple of them."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]
