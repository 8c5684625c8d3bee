"""The multimodal Llama 4 model: the text decoder, with image features scattered at ``<|patch|>`` tokens."""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .text import DecoderLayer, LanguageModel


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.language_model = LanguageModel(config.text)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.language_model.layers

    def make_cache(self) -> list[Any]:
        return self.language_model.make_cache()

    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: Optional[mx.array] = None,
        cache: Optional[list[Any]] = None,
        input_embeddings: Optional[mx.array] = None,
    ) -> mx.array:
        """Logits (B, L, vocab) for ``input_ids`` (B, L)."""
        if pixel_values is not None:
            raise NotImplementedError("image input needs the vision tower")
        return self.language_model(input_ids, cache=cache, input_embeddings=input_embeddings)
