"""One request's token choice, row by row in a batch: mlx-lm's logits processors and sampler built from its
parameters, a random key per step from its seed, and log-probabilities of the model's logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import make_logits_processors, make_sampler

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
        self._sampler = make_sampler(temp=params.temperature, top_p=params.top_p, min_p=params.min_p,
                                     top_k=params.top_k)
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
        if self.params.temperature > 0:  # mlx-lm's sampler draws from MLX's global key
            seed = self.params.seed
            mx.random.seed(int(entropy.integers(2**63)) if seed is None else
                           int(np.random.SeedSequence([seed, self._step]).generate_state(1, np.uint64)[0]))
        choice = Choice(self._sampler(processed - mx.logsumexp(processed, axis=-1, keepdims=True)))
        if self.params.logprobs:
            logits = logits.astype(mx.float32)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # of the model, before processors
            choice.logprob = mx.take_along_axis(logprobs, choice.token[:, None], axis=-1)
            n = self.params.top_logprobs
            if n:
                choice.top_tokens = mx.argpartition(-logprobs, n - 1, axis=-1)[:, :n]
                choice.top_logprobs = mx.take_along_axis(logprobs, choice.top_tokens, axis=-1)
        return choice

    def accept(self, token: int) -> None:
        """Record the token chosen at this step."""
        if self._tokens is not None:
            self._tokens = mx.concatenate([self._tokens, mx.array([token], dtype=mx.int32)])
        self._step += 1
