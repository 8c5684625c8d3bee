"""One request's token choice, row by row in a batch: mlx-lm's logits processors and sampling filters built
from its parameters, a random key per step from its seed, and log-probabilities of the model's logits.

The draw takes an explicit key instead of going through mlx-lm's ``make_sampler``, whose samplers draw from
MLX's one global random state: rows need keys of their own (a seeded request must not depend on what else is
in the batch), and with MLX's thread-local streams (0.31.2 on) a global random state last set on the engine's
thread aborts the process at exit. The filters and their order are make_sampler's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from .requests import SamplingParams


@dataclass
class Choice:
    """Lazy results of one row's step; evaluate them together with the other rows'."""

    token: mx.array  # (1,)
    logprob: Optional[mx.array] = None  # (1, 1)
    top_tokens: Optional[mx.array] = None  # (1, n)
    top_logprobs: Optional[mx.array] = None  # (1, n)

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.token, self.logprob, self.top_tokens, self.top_logprobs) if a is not None]


class RowSampler:
    def __init__(self, params: SamplingParams, prompt_ids: np.ndarray):
        self.params = params
        self._processors = make_logits_processors(
            logit_bias=params.logit_bias or None, repetition_penalty=params.repetition_penalty,
            presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        ) + list(params.logits_processors)
        # The processors see every token of the sequence so far, prompt included.
        self._tokens = mx.array(prompt_ids, dtype=mx.int32) if self._processors else None
        self._step = 0

    def choose(self, logits: mx.array, entropy: np.random.Generator) -> Choice:
        """The next token from the model's ``logits`` (1, V) for this row. A seeded request's key depends on
        (seed, step) alone, so its tokens do not depend on the other rows; others draw from ``entropy``."""
        processed = logits
        for processor in self._processors:
            processed = processor(self._tokens, processed)
        choice = Choice(self._draw(processed - mx.logsumexp(processed, axis=-1, keepdims=True), entropy))
        if self.params.logprobs:
            logits = logits.astype(mx.float32)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # of the model, before processors
            choice.logprob = mx.take_along_axis(logprobs, choice.token[:, None], axis=-1)
            n = self.params.top_logprobs
            if n:
                choice.top_tokens = mx.argpartition(-logprobs, n - 1, axis=-1)[:, :n]
                choice.top_logprobs = mx.take_along_axis(logprobs, choice.top_tokens, axis=-1)
        return choice

    def _draw(self, logprobs: mx.array, entropy: np.random.Generator) -> mx.array:
        p = self.params
        if p.temperature == 0:
            return mx.argmax(logprobs, axis=-1)
        if 0 < p.top_p < 1.0:
            logprobs = apply_top_p(logprobs, p.top_p)
        if p.min_p != 0.0:
            logprobs = apply_min_p(logprobs, p.min_p)
        if p.top_k > 0:
            logprobs = apply_top_k(logprobs, p.top_k)
        seed = entropy.integers(2**63) if p.seed is None else \
            np.random.SeedSequence([p.seed, self._step]).generate_state(1, np.uint64)[0]
        return mx.random.categorical(logprobs * (1 / p.temperature), key=mx.random.key(int(seed)))

    def accept(self, token: int) -> None:
        """Record the token chosen at this step."""
        if self._tokens is not None:
            self._tokens = mx.concatenate([self._tokens, mx.array([token], dtype=mx.int32)])
        self._step += 1
