"""A reply's text as it streams: detokenized by mlx-lm, special tokens left out, stop strings cut off.

Text that could be the start of a stop string is held back until the next tokens show whether the stop
string follows; when one does, the reply ends just before it.
"""

from __future__ import annotations

from typing import Any, Sequence

from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the tokenizer's special tokens (headers, image tokens, end tokens ...): never part of the text."""
    return frozenset(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)


class TextStream:
    def __init__(self, tokenizer: Any, special_ids: frozenset[int], stop: Sequence[str] = ()):
        self._detokenizer = NaiveStreamingDetokenizer(tokenizer)
        self._special = special_ids
        self._stop = list(stop)
        self._sent = 0  # characters of the text handed out so far
        self.stopped = False  # a stop string was found: the reply ends

    def add(self, token: int) -> str:
        """The new text that ``token`` makes safe to show."""
        if token not in self._special:
            self._detokenizer.add_token(token)
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back, at the end of the reply."""
        self._detokenizer.finalize()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        text = self._detokenizer.text
        # A stop string cannot start in text already sent: whatever might have started one was held back.
        hits = [i for i in (text.find(s, self._sent) for s in self._stop) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        elif final:
            end = len(text)
        else:
            end = len(text) - self._partial_stop(text)
        out = text[self._sent : end]
        self._sent = max(self._sent, end)
        return out

    def _partial_stop(self, text: str) -> int:
        """Length of the longest unsent end of ``text`` that begins some stop string."""
        longest = min(max((len(s) - 1 for s in self._stop), default=0), len(text) - self._sent)
        for n in range(longest, 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0
