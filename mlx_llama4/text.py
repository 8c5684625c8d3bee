"""The Llama 4 text decoder: embedding, pre-norm decoder layers, final norm and untied lm_head."""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from .attention import Attention
from .cache import make_cache
from .config import TextConfig
from .moe import MoE, SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.feed_forward = MoE(cfg) if cfg.is_moe(layer) else SwiGLU(cfg.hidden_size, cfg.intermediate_size_mlp)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, h: mx.array, cache: Any) -> mx.array:
        h = h + self.self_attn(self.input_layernorm(h), cache)
        return h + self.feed_forward(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        # Set by pipeline.py when layers are split across processes: this process runs (and holds) only the
        # layers [pipeline.start, pipeline.end), the others are None; ``cache`` holds one entry per layer it runs.
        self.pipeline = None

    def __call__(self, h: mx.array, cache: list[Any]) -> mx.array:
        if self.pipeline is not None:
            return self.norm(self.pipeline(self.layers, h, cache))
        for layer, c in zip(self.layers, cache):
            h = layer(h, c)
        return self.norm(h)


class LanguageModel(nn.Module):
    """Text model + lm_head, with mlx-lm's model protocol (``__call__(inputs, cache, input_embeddings)``,
    ``make_cache()``, ``layers``) so mlx-lm's generation helpers can drive it."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.model = TextModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def make_cache(self) -> list[Any]:
        uses_rope, pipeline = self.config.uses_rope, self.model.pipeline
        if pipeline is not None:  # caches for this process's layers only
            uses_rope = uses_rope[pipeline.start : pipeline.end]
        return make_cache(uses_rope, self.config.attention_chunk_size)

    def __call__(
        self,
        inputs: mx.array,
        cache: Optional[list[Any]] = None,
        input_embeddings: Optional[mx.array] = None,
    ) -> mx.array:
        """Logits (B, L, vocab) for token ids ``inputs`` (B, L), or for ``input_embeddings`` (B, L, D) if given.

        The sequence is run in steps that end at multiples of the attention chunk size, so that every layer
        needs only a causal mask and chunk buffers are never overrun. Without ``cache`` a fresh one is used.
        """
        h = self.model.embed_tokens(inputs) if input_embeddings is None else input_embeddings  # (B, L, D)
        if cache is None:
            cache = self.make_cache()
        outs = []
        for a, b in self._steps(cache[0].offset, h.shape[1]):
            if outs and self.model.pipeline is not None:
                # A receive has no inputs to order it by: finish this step's transfers before the next step's.
                mx.eval(outs[-1])
            outs.append(self.model(h[:, a:b], cache))
        logits = [self.lm_head(out) for out in outs]
        return logits[0] if len(logits) == 1 else mx.concatenate(logits, axis=1)

    def _steps(self, offset: int, length: int) -> list[tuple[int, int]]:
        chunk = self.config.attention_chunk_size
        if not chunk or length == 1:  # one token never crosses a boundary (a batch cache's offset is per row)
            return [(0, length)]
        bounds, start = [], 0
        while start < length:
            end = min(length, start + chunk - (offset + start) % chunk)
            bounds.append((start, end))
            start = end
        return bounds
