"""The multimodal Llama 4 model: the text decoder, with image features scattered at ``<|patch|>`` tokens."""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .text import DecoderLayer, LanguageModel
from .vision import MultiModalProjector, VisionModel

# Tiles encoded per vision-tower call; bounds activation memory for images with many tiles
# (about 35 MB per 336-pixel tile in float32 for the published tower).
TILE_BATCH = 16


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.sharding = None  # sharding.Sharding when the model is split across processes (load(group=...))
        self.language_model = LanguageModel(config.text)
        if config.vision is not None:
            self.vision_model = VisionModel(config.vision)
            self.multi_modal_projector = MultiModalProjector(config.vision.vision_output_dim, config.text.hidden_size)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.language_model.layers

    @property
    def has_vision(self) -> bool:
        return self.config.vision is not None

    def make_cache(self) -> list[Any]:
        return self.language_model.make_cache()

    def encode_images(self, pixel_values: mx.array, tile_batch: int = TILE_BATCH) -> mx.array:
        """Projected image features (tiles * tokens_per_tile, text hidden) for ``pixel_values`` (tiles, 3, S, S),
        flattened in tile order. Tiles go through the tower ``tile_batch`` at a time."""
        if not self.has_vision:
            raise ValueError("pixel_values given, but this checkpoint is text-only (its config has no vision_config)")
        T = pixel_values.shape[0]
        parts = []
        for a in range(0, T, tile_batch):
            feats = self.multi_modal_projector(self.vision_model(pixel_values[a : a + tile_batch]))  # (t, K, D_text)
            if T > tile_batch:
                mx.eval(feats)  # free this batch's activations before the next one
            parts.append(feats)
        feats = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)  # (T, K, D_text)
        return feats.reshape(-1, feats.shape[-1])  # (T*K, D_text)

    def embed(self, input_ids: mx.array, pixel_values: Optional[mx.array] = None) -> mx.array:
        """Input embeddings (B, L, D) for ``input_ids`` (B, L), with the rows at ``<|patch|>`` tokens
        (``config.image_token_index``) replaced, in order, by the projected features of ``pixel_values``
        (tiles, 3, S, S). The number of ``<|patch|>`` tokens must equal tiles * tokens_per_tile."""
        h = self.language_model.model.embed_tokens(input_ids)  # (B, L, D)
        if pixel_values is None:
            return h
        if not self.has_vision:
            raise ValueError("pixel_values given, but this checkpoint is text-only (its config has no vision_config)")
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (tiles, channels, height, width), got {tuple(pixel_values.shape)}")
        mask = input_ids == self.config.image_token_index  # (B, L)
        n_tokens = int(mask.sum().item())
        per_tile = self.config.vision.tokens_per_tile
        n_features = pixel_values.shape[0] * per_tile
        if n_tokens != n_features:
            raise ValueError(
                f"input_ids hold {n_tokens} image tokens (<|patch|>, id {self.config.image_token_index}) but "
                f"pixel_values give {n_features} image features ({pixel_values.shape[0]} tiles x {per_tile}); "
                "the two counts must be equal"
            )
        if n_features == 0:
            return h
        feats = self.encode_images(pixel_values).astype(h.dtype)  # (n, D)
        # The k-th <|patch|> token (row-major over batch, then position) takes feature k.
        flat = mask.reshape(-1)
        idx = mx.maximum(mx.cumsum(flat.astype(mx.int32)) - 1, 0)  # (B*L,)
        scattered = feats[idx].reshape(h.shape)  # (B, L, D)
        return mx.where(mask[..., None], scattered, h)

    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: Optional[mx.array] = None,
        cache: Optional[list[Any]] = None,
        input_embeddings: Optional[mx.array] = None,
    ) -> mx.array:
        """Logits (B, L, vocab) for ``input_ids`` (B, L).

        ``pixel_values`` (tiles, 3, S, S) go with the prompt only (the step whose ``input_ids`` hold the
        ``<|patch|>`` tokens); later decode steps pass none, so the vision tower runs once. To prefill in
        several pieces, compute ``embed(input_ids, pixel_values)`` once and pass slices as ``input_embeddings``.
        """
        if pixel_values is not None:
            if input_embeddings is not None:
                raise ValueError("pass either pixel_values or input_embeddings, not both")
            input_embeddings = self.embed(input_ids, pixel_values)
        return self.language_model(input_ids, cache=cache, input_embeddings=input_embeddings)
