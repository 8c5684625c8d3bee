"""Tokenizer + chat template + images -> model inputs for Llama 4.

A prompt reaches the model as one row of token ids in which every image is a block of special tokens
(reference section 4.1): ``<|image_start|>``, then per tile ``tokens_per_tile`` ``<|patch|>`` tokens with
``<|tile_x_separator|>`` between the tiles of a row and ``<|tile_y_separator|>`` after every row, then
``<|image|>`` and the global tile's patches, then ``<|image_end|>``. The vision features later replace the
``<|patch|>`` tokens in order, so the count of ``<|patch|>`` tokens must equal tiles x tokens_per_tile.

The chat template renders ``<|image|>`` once per image; ``Processor.__call__`` tokenizes the rendered text
and swaps each ``<|image|>`` token for its image's block. The template already starts with
``<|begin_of_text|>`` while the Hub tokenizer's post-processor would add another, so text is always
tokenized without added special tokens and BOS is prepended only when missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .chat_template import (
    REFERENCE_CHAT_TEMPLATE,
    ProcessorError,
    _read_json,
    load_chat_template,
    render_chat_template,
    split_messages,
    user_turn,
)
from .images import DEFAULT_MAX_PIXELS, ImageInput, ImageSettings, preprocess_images


IMAGE_PLACEHOLDER = "<|image|>"
BOS_TOKEN = "<|begin_of_text|>"
STOP_TOKENS = ("<|eot|>", "<|eom|>", "<|end_of_text|>")

DEFAULT_PATCH_SIZE = 14
DEFAULT_PIXEL_SHUFFLE_RATIO = 0.5




# --------------------------------------------------------------------------------------------------
# Image token layout (reference section 4.1)
# --------------------------------------------------------------------------------------------------


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


def tokens_per_tile_for(tile_size: int, patch_size: int, pixel_shuffle_ratio: float) -> int:
    """``<|patch|>`` tokens per tile: (tile / patch)^2 patches, merged 1/ratio^2 at a time by pixel shuffle."""
    if tile_size % patch_size:
        raise ValueError(f"tile size {tile_size} is not a multiple of the patch size {patch_size}")
    merge = int(round(1.0 / (pixel_shuffle_ratio**2)))
    return (tile_size // patch_size) ** 2 // merge


# --------------------------------------------------------------------------------------------------
# Loading the pieces of a checkpoint folder
# --------------------------------------------------------------------------------------------------


def _size_from(value: Any) -> int | None:
    """Tile size from ``{"height": h, "width": w}`` (square only) or a plain number."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        height, width = value.get("height"), value.get("width")
        if height is None and width is None:
            return None
        if height is not None and width is not None and height != width:
            raise ProcessorError(f"Llama 4 tiles are square, got size {dict(value)}")
        return int(height if height is not None else width)
    return int(value)


def image_settings_from_config(config: Mapping, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageSettings:
    """ImageSettings from an image-processor config dict (Hub ``preprocessor_config.json`` spelling)."""
    defaults = ImageSettings()
    size = _size_from(config.get("size")) or defaults.size
    mean = tuple(config.get("image_mean") or defaults.image_mean)
    std = tuple(config.get("image_std") or defaults.image_std)
    rescale = config.get("rescale_factor", defaults.rescale_factor)
    if config.get("do_rescale") is False:
        rescale = 1.0
    if config.get("do_normalize") is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if len(mean) == 1:
        mean = mean * 3
    if len(std) == 1:
        std = std * 3
    return ImageSettings(
        size=size,
        max_patches=int(config.get("max_patches", defaults.max_patches)),
        resize_to_max_canvas=bool(config.get("resize_to_max_canvas", defaults.resize_to_max_canvas)),
        image_mean=tuple(float(m) for m in mean),
        image_std=tuple(float(s) for s in std),
        rescale_factor=float(rescale),
        max_pixels=max_pixels,
    )


def load_processor_configs(folder: Path) -> tuple[dict, dict]:
    """(image-processor settings, processor settings) from preprocessor_config.json / processor_config.json.

    Hub checkpoints keep the image settings in ``preprocessor_config.json`` and a few prompt settings
    (patch_size) at the top level of ``processor_config.json``; transformers 5 writes one
    ``processor_config.json`` with the image settings nested under ``image_processor``. Nested values win.
    """
    image_config: dict = {}
    processor_config: dict = {}
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        image_config.update(_read_json(pre))
    proc = folder / "processor_config.json"
    if proc.is_file():
        processor_config = _read_json(proc)
        nested = processor_config.get("image_processor")
        if isinstance(nested, Mapping):
            image_config.update(nested)
    return image_config, processor_config


def _load_tokenizer(folder: Path, config: Mapping):
    """A fast tokenizer from tokenizer.json, with its special-token roles from tokenizer_config.json.

    Built directly from the file instead of ``AutoTokenizer`` so that a checkpoint's ``tokenizer_class``
    or auto-map cannot pull in other code, and roles whose token is not in the vocabulary (the Hub
    Llama 4 config names a pad token ``<|finetune_right_pad_id|>`` that does not exist) are skipped
    instead of being added as new tokens.
    """
    from transformers import PreTrainedTokenizerFast

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer.json (a Hugging Face fast tokenizer file is required)")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(file), clean_up_tokenization_spaces=False)
    backend = tokenizer.backend_tokenizer
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(role)
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str) and backend.token_to_id(value) is not None:
            setattr(tokenizer, role, value)
    if tokenizer.bos_token is None and backend.token_to_id(BOS_TOKEN) is not None:
        tokenizer.bos_token = BOS_TOKEN
    max_length = config.get("model_max_length")
    if isinstance(max_length, int):
        tokenizer.model_max_length = max_length
    return tokenizer


# --------------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------------


class Processor:
    """Turns text or chat messages plus images into ``input_ids`` and ``pixel_values`` for Llama 4.

    ``processor(messages, images=[...])`` or ``processor(text="...<|image|>...", images=[...])`` returns
    ``{"input_ids": int32 (1, L), "pixel_values": float32 (tiles, 3, S, S) or None, "grids": [(rows, cols)]}``.
    """

    def __init__(
        self,
        tokenizer,
        chat_template: str | None = None,
        image_settings: ImageSettings | None = None,
        tokens_per_tile: int | None = None,
        patch_size: int = DEFAULT_PATCH_SIZE,
        pixel_shuffle_ratio: float = DEFAULT_PIXEL_SHUFFLE_RATIO,
        tokenizer_config: Mapping | None = None,
        processor_config: Mapping | None = None,
    ):
        self._tokenizer = tokenizer
        self.chat_template = chat_template or REFERENCE_CHAT_TEMPLATE
        self.image_settings = image_settings or ImageSettings()
        self.patch_size = int(patch_size)
        self.pixel_shuffle_ratio = float(pixel_shuffle_ratio)
        if tokens_per_tile is None:
            tokens_per_tile = tokens_per_tile_for(self.image_settings.size, self.patch_size, self.pixel_shuffle_ratio)
        if tokens_per_tile <= 0:
            raise ValueError(f"tokens_per_tile must be positive, got {tokens_per_tile}")
        self.tokens_per_tile = int(tokens_per_tile)
        self._tokenizer_config = dict(tokenizer_config or {})
        self._processor_config = dict(processor_config or {})
        self._image_ids: ImageTokenIds | None = None

    # ---- tokenizer facts -------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The underlying Hugging Face fast tokenizer."""
        return self._tokenizer

    def token_id(self, token: str) -> int | None:
        """Id of a token by name, or None when it is not in the vocabulary."""
        return self._tokenizer.backend_tokenizer.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._tokenizer.bos_token_id

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: ``<|eot|>``, ``<|eom|>``, ``<|end_of_text|>`` and the tokenizer's eos."""
        ids = [self.token_id(name) for name in STOP_TOKENS]
        ids.append(self._tokenizer.eos_token_id)
        out: list[int] = []
        for i in ids:
            if i is not None and i not in out:
                out.append(i)
        return out

    @property
    def image_token_ids(self) -> ImageTokenIds:
        """Ids of the image framing tokens; an error naming the missing ones if the vocabulary lacks them."""
        if self._image_ids is None:
            found = {field: self.token_id(name) for field, name in ImageTokenIds.NAMES.items()}
            missing = [ImageTokenIds.NAMES[f] for f, i in found.items() if i is None]
            if missing:
                raise ProcessorError(f"the tokenizer has no image tokens {', '.join(missing)}; it cannot take images")
            self._image_ids = ImageTokenIds(**found)
        return self._image_ids

    @property
    def image_token_id(self) -> int:
        """Id of ``<|patch|>``, the token whose embeddings the vision features replace."""
        return self.image_token_ids.patch

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of token ids (a 1-D sequence)."""
        ids = np.asarray(ids).reshape(-1).tolist() if not isinstance(ids, list) else ids
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special-token strings are parsed, no BOS is added."""
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    def image_token_count(self, grid: tuple[int, int]) -> int:
        """Prompt tokens one image with this tile grid takes."""
        return image_token_count(grid, self.tokens_per_tile)

    # ---- chat template ---------------------------------------------------------------------------

    def _template_variables(self) -> dict:
        special = {}
        for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = getattr(self._tokenizer, role, None)
            if isinstance(value, str):
                special[role] = value
        special.setdefault("bos_token", self._tokenizer_config.get("bos_token") or BOS_TOKEN)
        return special

    def _render(self, messages: list[dict], add_generation_prompt: bool, **kwargs) -> str:
        return render_chat_template(self._tokenizer, self.chat_template, messages, add_generation_prompt,
                                    **{**self._template_variables(), **kwargs})

    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = True, **kwargs) -> str:
        """Render chat messages (Hugging Face format) to the prompt text, one ``<|image|>`` per image part.

        Extra keyword arguments (``tools``, ``date_string``, ...) are passed to the template.
        """
        plain, _ = split_messages(messages)
        return self._render(plain, add_generation_prompt, **kwargs)

    # ---- prompt -> ids ---------------------------------------------------------------------------

    def __call__(
        self,
        text: str | Sequence[Mapping] | None = None,
        images: ImageInput | Sequence[ImageInput] | None = None,
        messages: Sequence[Mapping] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs,
    ) -> dict:
        """Token ids (and pixel values) for a prompt.

        Give either ``text`` (already-formatted prompt text with one ``<|image|>`` per image) or
        ``messages`` (rendered with the chat template; a list passed as ``text`` counts as messages; a string
        is one user turn with the ``images`` before its text).
        Images come from ``images`` in order and/or inline in message parts
        (``{"type": "image", "image": ...}``, ``"image_url"``, ``"url"``, ``"path"``).
        """
        if text is not None and not isinstance(text, str):
            if messages is not None:
                raise ProcessorError("give either text or messages, not both")
            text, messages = None, text
        if text is not None and messages is not None:
            raise ProcessorError("give either text or messages, not both")
        given = self._image_list(images)
        if isinstance(messages, str):  # one user turn, after the images
            messages = [user_turn(messages, len(given))]
        if messages is not None:
            plain, inline = split_messages(messages)
            text = self._render(plain, add_generation_prompt, **template_kwargs)
            sources = self._merge_images(inline, given)
        elif text is not None:
            sources = given
        else:
            raise ProcessorError("nothing to process: give text or messages")
        return self._encode_prompt(text, sources)

    @staticmethod
    def _image_list(images: Any) -> list:
        if images is None:
            return []
        if isinstance(images, (list, tuple)):
            return list(images)
        return [images]  # one image (path, bytes, PIL image or array)

    @staticmethod
    def _merge_images(inline: list, given: list) -> list:
        """Image parts without an inline image take the ``images`` argument in order."""
        needed = sum(source is None for source in inline)
        if needed != len(given):
            inline_count = len(inline) - needed
            raise ProcessorError(
                f"the messages have {len(inline)} image parts ({inline_count} with an inline image, {needed} "
                f"without) but {len(given)} images were passed for the {needed} without; the counts must match"
            )
        supplied = iter(given)
        return [next(supplied) if source is None else source for source in inline]

    def _encode_prompt(self, text: str, sources: list) -> dict:
        ids = np.asarray(self.encode(text), dtype=np.int64)  # (L0,)
        placeholder = self.token_id(IMAGE_PLACEHOLDER)
        positions = np.flatnonzero(ids == placeholder) if placeholder is not None else np.zeros(0, np.int64)
        if len(positions) != len(sources):
            raise ProcessorError(
                f"the prompt has {len(positions)} {IMAGE_PLACEHOLDER} placeholders but {len(sources)} images "
                "were given; there must be one image per placeholder"
            )
        pixel_values, grids = preprocess_images(sources, self.image_settings)
        pieces: list[np.ndarray] = []
        bos = self.bos_token_id
        if bos is not None and (ids.size == 0 or ids[0] != bos):
            pieces.append(np.asarray([bos]))
        start = 0
        for position, grid in zip(positions, grids):
            pieces.append(ids[start:position])
            pieces.append(np.asarray(image_token_ids(grid, self.tokens_per_tile, self.image_token_ids)))
            start = position + 1
        pieces.append(ids[start:])
        input_ids = np.concatenate(pieces).astype(np.int32)[None]  # (1, L)
        return {"input_ids": input_ids, "pixel_values": pixel_values, "grids": grids}

    # ---- saving ----------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json, chat_template.jinja, preprocessor_config.json and
        processor_config.json (Hub spelling) so that ``load_processor`` and transformers can read them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
        config = {k: v for k, v in self._tokenizer_config.items() if k not in ("chat_template", "added_tokens_decoder")}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        for role, value in self._template_variables().items():
            config[role] = value
        config.setdefault("clean_up_tokenization_spaces", False)
        _write_json(folder / "tokenizer_config.json", config)
        (folder / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        s = self.image_settings
        _write_json(
            folder / "preprocessor_config.json",
            {
                "image_processor_type": "Llama4ImageProcessorFast",
                "processor_class": "Llama4Processor",
                "do_convert_rgb": True,
                "do_resize": True,
                "do_rescale": True,
                "do_normalize": True,
                "resample": 2,  # bilinear
                "size": {"height": s.size, "width": s.size},
                "max_patches": s.max_patches,
                "resize_to_max_canvas": s.resize_to_max_canvas,
                "image_mean": list(s.image_mean),
                "image_std": list(s.image_std),
                "rescale_factor": s.rescale_factor,
            },
        )
        processor_config = {
            k: v for k, v in self._processor_config.items() if k not in ("image_processor", "chat_template")
        }
        processor_config.update(
            {
                "processor_class": "Llama4Processor",
                "patch_size": self.patch_size,
                "pixel_shuffle_ratio": self.pixel_shuffle_ratio,
                "fake_image_token": IMAGE_PLACEHOLDER,
                "image_token": IMAGE_PLACEHOLDER,
            }
        )
        if self.tokens_per_tile != tokens_per_tile_for(s.size, self.patch_size, self.pixel_shuffle_ratio):
            processor_config["tokens_per_tile"] = self.tokens_per_tile
        _write_json(folder / "processor_config.json", processor_config)
        return folder


def _write_json(path: Path, data: Mapping) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_processor(
    path: str | os.PathLike,
    tokens_per_tile: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Processor:
    """The processor of a local checkpoint folder.

    Reads tokenizer.json (+ tokenizer_config.json), the chat template (chat_template.jinja,
    chat_template.json, tokenizer_config.json's chat_template, else the reference Llama 4 template) and the
    image settings (preprocessor_config.json and/or processor_config.json; defaults 336 px tiles, 16 tiles).
    ``tokens_per_tile`` overrides the count derived from patch size and pixel-shuffle ratio (the model's
    vision config knows it); ``max_pixels`` bounds decoded image size (None: no bound).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a checkpoint folder")
    tokenizer_config_path = folder / "tokenizer_config.json"
    tokenizer_config = _read_json(tokenizer_config_path) if tokenizer_config_path.is_file() else {}
    tokenizer = _load_tokenizer(folder, tokenizer_config)
    image_config, processor_config = load_processor_configs(folder)
    if tokens_per_tile is None and isinstance(processor_config.get("tokens_per_tile"), int):
        tokens_per_tile = processor_config["tokens_per_tile"]
    return Processor(
        tokenizer,
        chat_template=load_chat_template(folder, tokenizer_config),
        image_settings=image_settings_from_config(image_config, max_pixels=max_pixels),
        tokens_per_tile=tokens_per_tile,
        patch_size=int(processor_config.get("patch_size") or DEFAULT_PATCH_SIZE),
        pixel_shuffle_ratio=float(processor_config.get("pixel_shuffle_ratio") or DEFAULT_PIXEL_SHUFFLE_RATIO),
        tokenizer_config=tokenizer_config,
        processor_config=processor_config,
    )
