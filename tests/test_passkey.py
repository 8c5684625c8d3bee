"""The passkey-retrieval chats of ``training/passkey.py`` (the long-context stretch experiment): a haystack of
about the asked length in the demo tokenizer, the key stated at the drawn depth, the question last, and the reply
naming the key."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import passkey  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    from mlx_llama4 import load

    return load("demo")[1].tokenizer


@pytest.mark.parametrize("tokens", [128, 1000, 4000])
def test_haystack_holds_one_key_at_about_the_length(tokenizer, tokens):
    def count(text: str) -> int:  # counted here, not with passkey's own helper
        return len(tokenizer.encode(text, add_special_tokens=False))

    rng = random.Random(tokens)
    depths = set()
    for _ in range(8):
        messages, reply = passkey.chat(rng, tokens, tokenizer)
        text = messages[0]["content"]
        key = re.fullmatch(r"The pass key is (\d{5})\.", reply).group(1)
        assert text.count(key) == 2 and text.endswith(passkey.QUESTION)  # "is KEY. ... KEY is the pass key."
        assert tokens - count(passkey.FILLER) <= count(text) <= tokens + 2, count(text)
        depths.add(text.index(key) * 10 // len(text))
    assert len(depths) >= 2  # the key stands at different depths
