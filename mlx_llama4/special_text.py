"""Special-token text inside chat messages stays text, as in Meta's reference.

Meta's ``ChatFormat`` (llama_models/llama4/chat_format.py) encodes every message's content with
``tokenizer.encode(...)``, whose default ``allowed_special=set()`` makes a string such as ``<|eot|>`` typed
into a message ordinary text: no message can end its turn early or forge another turn (role injection). The
chat template renders messages into one string, where a special token and its text are the same characters, so:

1. ``escape``: before rendering, every added-token string (``<|eot|>``, ``<|header_start|>``, ``<|image|>``, ...)
   in the messages' strings and the caller's template options (tool specs) becomes a sentinel of private-use
   characters, which the template passes through unchanged (transformers' ``tojson`` keeps non-ASCII as it is);
2. ``encode``: the rendered text is tokenized as before, so every special token in it is the template's own;
   each stretch of text between two of them that holds a sentinel is then re-encoded as plain text with the
   strings put back, in one piece, as Meta encodes a message's content in one piece. A prompt without any
   sentinel tokenizes exactly as it did before.

transformers' ``apply_chat_template(sanitize_control_tokens=True)`` marks such tokens too, but encodes each marked
token apart from the text around it, which gives other ids than Meta's where the pre-tokenizer would have joined
them (``|><|`` in ``<|eot|><|header_start|>``); hence this module.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

# A private-use character that opens and closes a sentinel ``MARKER index MARKER``. The marker itself, where the
# caller's strings hold it, is escaped like a special-token string, so every marker in the rendered text is ours.
MARKER = "\ue000"
_SENTINEL = re.compile(f"{MARKER}(\\d+){MARKER}")


class SpecialTokenText:
    """A tokenizer's added-token strings, and the encoding of rendered prompts in which the caller's spelling
    of them is ordinary text."""

    def __init__(self, tokenizer):
        """``tokenizer``: a Hugging Face fast tokenizer (its ``backend_tokenizer`` holds the added tokens)."""
        self._tokenizer = tokenizer
        self._backend = tokenizer.backend_tokenizer
        added = self._backend.get_added_tokens_decoder()  # {id: AddedToken}
        self._added_ids = frozenset(added)
        # Longest first, so that a token wins over a shorter one it starts with (leftmost-longest, as tokenizers).
        self._escaped = [MARKER, *sorted({token.content for token in added.values()}, key=len, reverse=True)]
        self._index = {text: i for i, text in enumerate(self._escaped)}
        self._pattern = re.compile("|".join(map(re.escape, self._escaped)))

    def escape(self, value: Any) -> Any:
        """``value`` (a string, or messages / template options: dicts and lists of them, keys included) with each
        added-token string and each marker in its strings replaced by a sentinel; other values as they are."""
        if isinstance(value, str):
            return self._pattern.sub(self._sentinel, value)
        if isinstance(value, Mapping):
            return {self.escape(key): self.escape(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.escape(item) for item in value]
        return value

    def _sentinel(self, match: re.Match) -> str:
        return f"{MARKER}{self._index[match[0]]}{MARKER}"

    def encode(self, rendered: str) -> list[int]:
        """Token ids of a prompt rendered from escaped messages (no BOS added): the template's special tokens as
        tokens, the text of each sentinel as plain text."""
        if MARKER not in rendered:
            return self._tokenizer(rendered, add_special_tokens=False)["input_ids"]
        encoding = self._tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = []
        run: list[int] = []  # ids of the text since the last special token
        cut = 0  # where that text starts in ``rendered``
        for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
            if token not in self._added_ids:
                run.append(token)
                continue
            ids += self._text_ids(rendered[cut:start], run)
            ids.append(token)
            run, cut = [], end
        return ids + self._text_ids(rendered[cut:], run)

    def _text_ids(self, text: str, ids: list[int]) -> list[int]:
        """``ids`` (the tokenizer's for ``text``) unless ``text`` holds a sentinel: then the plain-text ids of
        ``text`` with the escaped strings put back."""
        if MARKER not in text:
            return ids
        return self._plain_ids(_SENTINEL.sub(self._unescape, text))

    def _unescape(self, match: re.Match) -> str:
        return self._escaped[int(match[1])]

    def _plain_ids(self, text: str) -> list[int]:
        """Ids of ``text`` with added tokens not looked for: the tokenizer's normalizer, pre-tokenizer and model
        without its added-token pass. (Its ``encode_special_tokens`` switch would do it too, but it is shared
        state, and prompts are tokenized in several threads at once.)"""
        backend = self._backend
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        pieces: list[str] = [text]
        if backend.pre_tokenizer is not None:
            pieces = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
        return [token.id for piece in pieces for token in backend.model.tokenize(piece)]
