"""A long document prefilled once and questioned many times, each question costing only its own tokens.

``cache_document`` prefills the part of the prompt that every question about the document shares: the chat
template up to the document's end (a question goes into the same user turn, after a blank line). Which tokens
those are depends on the template and on how the tokenizer joins the document's end to the question, so it is
measured: the prompt is rendered without a question and with one, and their common token prefix is prefilled.
The cache remembers the messages (``PromptCache.metadata``, saved with it) and is pinned at its end
(``PromptCache.pin``); ``document_messages`` builds a question's messages, whose prompt then reuses it all.

    cache = cache_document(model, processor, Path("report.txt").read_text(), kv_bits=4)
    save_prompt_cache("report.cache", cache)            # later, in any process:
    cache = load_prompt_cache("report.cache", model)
    for question in questions:
        print(generate(model, processor, document_messages(cache, question), prompt_cache=cache))
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

import numpy as np

from .generation import stream_generate
from .model import Model
from .prompt_cache import PromptCache

SEPARATOR = "\n\n"  # between the document and a question, in one user turn
_PROBES = ("", "X")  # no question, and one: their prompts part where a question's begins
_META = "document_messages"


def _with_question(messages: list[dict], question: str) -> list[dict]:
    *before, last = messages
    return [*before, dict(last, content=last["content"] + SEPARATOR + question)]


def shared_prefix(processor: Any, messages: list[dict]) -> np.ndarray:
    """The token ids (P,) that every question's prompt about the document in ``messages`` starts with."""
    a, b = (np.asarray(processor(messages=_with_question(messages, q))["input_ids"])[0] for q in _PROBES)
    n = min(len(a), len(b))
    same = a[:n] == b[:n]
    return a[: n if same.all() else int(np.argmin(same))]


def cache_document(model: Model, processor: Any, document: str, *, system_prompt: Optional[str] = None,
                   kv_bits: Optional[int | str] = "auto", kv_group_size: Optional[int] = None,
                   prefill_step_size: Optional[int] = None,
                   progress: Optional[Callable[[int, int], None]] = None) -> PromptCache:
    """A prompt cache holding ``document`` (and ``system_prompt``) as every question about it begins, pinned
    there. ``kv_bits``, ``kv_group_size``, ``prefill_step_size`` and ``progress(done, total)`` as for
    ``stream_generate`` (by default the global layers' KV goes to 8 bits past ``LONG_CONTEXT_TOKENS``)."""
    if not document.strip():
        raise ValueError("the document is empty")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": document})
    cache = PromptCache(model)
    for _ in stream_generate(model, processor, shared_prefix(processor, messages), max_tokens=0, prompt_cache=cache,
                             kv_bits=kv_bits, kv_group_size=kv_group_size, prefill_step_size=prefill_step_size,
                             progress=progress):
        pass
    cache.metadata[_META] = json.dumps(messages)
    cache.pin()
    return cache


def document_messages(cache: PromptCache, question: str) -> list[dict]:
    """The chat messages that ask ``question`` about the document ``cache`` holds (from ``cache_document``)."""
    if _META not in cache.metadata:
        raise ValueError("this prompt cache holds no document (it was not made by cache_document or "
                         "`mlx-llama4 cache-prompt`)")
    return _with_question(json.loads(cache.metadata[_META]), question)
