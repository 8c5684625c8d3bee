"""Structured output: replies that are JSON matching a schema, enforced while sampling.

``JSONConstraint`` is a logits processor in mlx-lm's protocol (``processor(tokens, logits) -> logits``): before
each token is sampled it masks every token that would take the reply off the grammar of the schema, and once
the JSON value is complete it lets through only the end tokens, so generation stops there. The grammar engine
is llguidance (https://github.com/guidance-ai/llguidance): it computes the mask over the tokenizer's whole
vocabulary in a few tens of microseconds per token, even for Llama 4's 202,048 tokens, with no ahead-of-time
index over the vocabulary, and it reports the schema features it does not implement by name.

Completeness follows from the mask: an end token is allowed only when the JSON is complete, so a reply that
ended on an end token (``finish_reason == "stop"``) is complete and valid, and one cut by ``max_tokens``
(``finish_reason == "length"``) carries no such claim.

The JSON is written compactly in ``json.dumps``'s default style (``", "`` between items, ``": "`` after keys,
no other whitespace): free whitespace would let a model pad its reply with blank lines until ``max_tokens``.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable, Mapping, Optional

import llguidance
import llguidance.hf
import llguidance.numpy
import mlx.core as mx
import numpy as np

# The style of the JSON the grammar admits (llguidance's JSON compile options).
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# OpenAI's response_format types; any other dict given as a response format is taken as a bare JSON schema.
_FORMAT_TYPES = ("text", "json_object", "json_schema")


def json_schema_of(response_format: Optional[Mapping[str, Any]]) -> Optional[dict]:
    """The JSON schema a response format asks for, or None for free text.

    Accepts OpenAI's ``{"type": "text"}``, ``{"type": "json_object"}`` (any JSON object) and
    ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``, or a bare JSON
    schema. The schema is always enforced, whatever ``strict`` says.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ValueError(f"response_format must be a JSON object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind not in _FORMAT_TYPES:
        return dict(response_format)
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
        raise ValueError("response_format of type 'json_schema' needs 'json_schema': {'name': ..., 'schema': {...}}; "
                         f"got {dict(response_format)!r}")
    return dict(spec["schema"])


# llguidance's view of a tokenizer takes seconds to build for a 200K vocabulary: one per tokenizer and end tokens.
_LL_TOKENIZERS: "weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], llguidance.LLTokenizer]]" = (
    weakref.WeakKeyDictionary())


def _ll_tokenizer(tokenizer: Any, end_tokens: tuple[int, ...]) -> llguidance.LLTokenizer:
    by_ends = _LL_TOKENIZERS.setdefault(tokenizer, {})
    if end_tokens not in by_ends:
        by_ends[end_tokens] = llguidance.hf.from_tokenizer(tokenizer, eos_token=list(end_tokens))
    return by_ends[end_tokens]


class JSONConstraint:
    """Logits processor that keeps one sequence's reply on the JSON grammar of ``schema``.

    ``tokenizer`` is the model's Hugging Face fast tokenizer (``processor.tokenizer``); ``end_tokens`` are the ids
    that end generation (``<|eot|>``, ``<|eom|>``, ``<|end_of_text|>``), the only tokens allowed once the JSON is
    complete. It holds one grammar matcher: use one constraint per sequence (in a batch, one per row).

    The first call sees the prompt; every later call sees one more token, the one sampled after the previous
    call (mlx-lm's ``generate_step`` and ``BatchGenerator`` both call processors this way), which the matcher
    consumes before computing the next mask.
    """

    def __init__(self, tokenizer: Any, schema: Mapping[str, Any], end_tokens: Iterable[int]):
        ends = tuple(sorted(set(int(t) for t in end_tokens)))
        if not ends:
            raise ValueError("a JSON constraint needs at least one end token to stop on")
        grammar = llguidance.LLMatcher.grammar_from_json_schema(dict(schema), overrides=_JSON_STYLE)
        ll_tokenizer = _ll_tokenizer(tokenizer, ends)
        self._matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise ValueError(f"unsupported JSON schema: {self._matcher.get_error()}")
        self._bitmask = llguidance.numpy.allocate_token_bitmask(1, ll_tokenizer.vocab_size)  # (1, words) int32
        self._started = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        """Mask ``logits`` (1, V) for the next token of this sequence; ``tokens`` is its history so far."""
        if self._started and not self._matcher.consume_token(int(tokens[-1])):
            raise RuntimeError(f"token {int(tokens[-1])} is off the JSON grammar: {self._matcher.get_error()}")
        self._started = True
        mx.async_eval(logits)  # the forward pass runs on the device while the mask is computed on the CPU
        llguidance.numpy.fill_next_token_bitmask(self._matcher, self._bitmask)
        allowed = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")  # (words * 32,), bit i = token i
        vocab = logits.shape[-1]
        if len(allowed) < vocab:  # rows of the output layer the tokenizer has no token for
            allowed = np.pad(allowed, (0, vocab - len(allowed)))
        return mx.where(mx.array(allowed[:vocab].astype(np.bool_)), logits, -mx.inf)
