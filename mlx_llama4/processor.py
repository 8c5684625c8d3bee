"""Tokenizer + chat template + images -> model inputs for Llama 4, and the processor files of a checkpoint.

``Processor`` puts together the pieces, each in its own module: the tokenizer and its special tokens
(``tokenizer.py``), the chat template and chat messages (``chat_template.py``), images (``images.py`` for pixels,
``image_config.py`` for their settings) and the prompt's token layout (``prompt.py``). ``load_processor`` reads a
checkpoint folder's files and ``Processor.save_pretrained`` writes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from . import tokenizer as tok
from .chat_template import REFERENCE_CHAT_TEMPLATE, render_chat_template, split_messages, user_turn
from .image_config import image_processor_config, image_settings_from_config
from .images import DEFAULT_MAX_PIXELS, ImageInput, ImageSettings, preprocess_images
from .prompt import (
    IMAGE_PLACEHOLDER,
    ImageTokenIds,
    ProcessorError,
    image_list,
    image_token_count,
    is_templated,
    layout_ids,
    merge_images,
    placeholder_positions,
    tokens_per_tile_for,
)
from .special_text import SpecialTokenText

__all__ = ["Processor", "ProcessorError", "REFERENCE_CHAT_TEMPLATE", "image_token_count", "load_processor",
           "tokens_per_tile_for"]

DEFAULT_PATCH_SIZE = 14
DEFAULT_PIXEL_SHUFFLE_RATIO = 0.5


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
        self._special_text: SpecialTokenText | None = None

    # ---- tokenizer -------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The underlying Hugging Face fast tokenizer."""
        return self._tokenizer

    def token_id(self, token: str) -> int | None:
        """Id of a token by name, or None when it is not in the vocabulary."""
        return tok.token_id(self._tokenizer, token)

    @property
    def bos_token_id(self) -> int | None:
        return self._tokenizer.bos_token_id

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: ``<|eot|>``, ``<|eom|>``, ``<|end_of_text|>`` and the tokenizer's eos."""
        return tok.stop_token_ids(self._tokenizer)

    @property
    def image_token_ids(self) -> ImageTokenIds:
        """Ids of the image framing tokens; an error naming the missing ones if the vocabulary lacks them."""
        if self._image_ids is None:
            self._image_ids = ImageTokenIds.lookup(self.token_id)
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

    def _render(self, messages: list[dict], add_generation_prompt: bool, **kwargs) -> str:
        variables = {**tok.special_tokens(self._tokenizer, self._tokenizer_config), **kwargs}
        return render_chat_template(self._tokenizer, self.chat_template, messages, add_generation_prompt, **variables)

    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = True, **kwargs) -> str:
        """Render chat messages (Hugging Face format) to the prompt text, one ``<|image|>`` per image part.

        Extra keyword arguments (``tools``, ``date_string``, ...) are passed to the template. In the text,
        special-token strings typed into the messages read like the template's own tokens, so tokenizing it
        (``processor(text=...)``) trusts the messages; ``processor(messages=...)`` keeps them text.
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
        is one user turn with the ``images`` before its text, unless it is already chat-template output, i.e.
        starts with ``<|begin_of_text|>`` or holds ``<|header_start|>``: that is used as it is, its
        ``<|image|>`` placeholders taking the ``images``). Special-token strings inside messages are text, as in
        Meta's ChatFormat: only the template writes special tokens (``special_text.py``); a ``text`` prompt, or a
        string that is already chat-template output, is the caller's own and its special-token strings are tokens.
        Images come from ``images`` in order and/or inline in message parts
        (``{"type": "image", "image": ...}``, ``"image_url"``, ``"url"``, ``"path"``).
        """
        if text is not None and not isinstance(text, str):
            if messages is not None:
                raise ProcessorError("give either text or messages, not both")
            text, messages = None, text
        if text is not None and messages is not None:
            raise ProcessorError("give either text or messages, not both")
        given = image_list(images)
        if isinstance(messages, str) and is_templated(messages):  # e.g. apply_chat_template's output: as it is
            if template_kwargs:
                raise ProcessorError(f"the prompt is already chat-template output; template options "
                                     f"({', '.join(template_kwargs)}) cannot apply to it")
            text, messages = messages, None
        elif isinstance(messages, str):  # one user turn, after the images
            messages = [user_turn(messages, len(given))]
        if messages is not None:
            plain, inline = split_messages(messages)
            ids = self._encode_messages(plain, add_generation_prompt, template_kwargs)
            sources = merge_images(inline, given)
        elif text is not None:
            ids = self.encode(text)
            sources = given
        else:
            raise ProcessorError("nothing to process: give text or messages")
        return self._encode_prompt(np.asarray(ids, dtype=np.int64), sources)

    def _encode_messages(self, messages: list[dict], add_generation_prompt: bool, template_kwargs: dict) -> list[int]:
        """Token ids of rendered messages in which special-token strings from the caller (message content of every
        role, tool calls and results, tool specs) are plain text, as in Meta's ChatFormat (``special_text.py``)."""
        if self._special_text is None:
            self._special_text = SpecialTokenText(self._tokenizer)
        escape = self._special_text.escape
        rendered = self._render(escape(messages), add_generation_prompt, **escape(template_kwargs))
        return self._special_text.encode(rendered)

    def _encode_prompt(self, ids: np.ndarray, sources: list) -> dict:
        """Model inputs from tokenized prompt text ``ids`` (L0,) int64 and the images for its placeholders."""
        positions = placeholder_positions(ids, self.token_id(IMAGE_PLACEHOLDER), len(sources))
        pixel_values, grids = preprocess_images(sources, self.image_settings)
        image_ids = self.image_token_ids if grids else None
        input_ids = layout_ids(ids, positions, grids, self.tokens_per_tile, image_ids, self.bos_token_id)
        return {"input_ids": input_ids, "pixel_values": pixel_values, "grids": grids}

    # ---- saving ----------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json, chat_template.jinja, preprocessor_config.json and
        processor_config.json (Hub spelling) so that ``load_processor`` and transformers can read them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
        _write_json(folder / "tokenizer_config.json", tok.tokenizer_config(self._tokenizer, self._tokenizer_config))
        (folder / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        _write_json(folder / "preprocessor_config.json", image_processor_config(self.image_settings))
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
        size = self.image_settings.size
        if self.tokens_per_tile != tokens_per_tile_for(size, self.patch_size, self.pixel_shuffle_ratio):
            processor_config["tokens_per_tile"] = self.tokens_per_tile
        _write_json(folder / "processor_config.json", processor_config)
        return folder


# --------------------------------------------------------------------------------------------------
# The files of a checkpoint folder
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ProcessorError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ProcessorError(f"{path}: expected a JSON object")
    return data


def _write_json(path: Path, data: Mapping) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _template_from_value(value: Any, where: Path) -> str | None:
    """A chat template from a config value: a string, or a list of named templates (take 'default')."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if "default" in named:
            return named["default"]
        if named:
            return next(iter(named.values()))
    raise ProcessorError(f"{where}: chat_template must be a string or a list of named templates")


def load_chat_template(folder: Path, tokenizer_config: Mapping | None = None) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, chat_template.json, then tokenizer_config.json."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = folder / "chat_template.json"
    if as_json.is_file():
        template = _template_from_value(_read_json(as_json).get("chat_template"), as_json)
        if template:
            return template
    if tokenizer_config:
        return _template_from_value(tokenizer_config.get("chat_template"), folder / "tokenizer_config.json")
    return None


def load_processor_configs(folder: Path) -> tuple[dict, dict]:
    """(image-processor settings, processor settings) from preprocessor_config.json / processor_config.json;
    the image settings nested under ``image_processor`` in processor_config.json (transformers 5) win."""
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


def load_processor(
    path: str | os.PathLike,
    tokens_per_tile: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Processor:
    """The processor of a local checkpoint folder.

    Reads tokenizer.json (+ tokenizer_config.json), the chat template (chat_template.jinja,
    chat_template.json, tokenizer_config.json's chat_template, else the published Llama 4 template) and the
    image settings (preprocessor_config.json and/or processor_config.json; defaults 336 px tiles, 16 tiles).
    ``tokens_per_tile`` overrides the count derived from patch size and pixel-shuffle ratio (the model's
    vision config knows it); ``max_pixels`` bounds decoded image size (None: no bound).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a checkpoint folder")
    tokenizer_config_path = folder / "tokenizer_config.json"
    tokenizer_config = _read_json(tokenizer_config_path) if tokenizer_config_path.is_file() else {}
    tokenizer = tok.load_tokenizer(folder, tokenizer_config)
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
