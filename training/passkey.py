"""Passkey retrieval for the demo model: can its global (NoPE) layers find a number in a haystack many times
longer than any it was trained on?

The task of Mohtashami and Jaggi (2023, "Landmark Attention"): filler sentences, a five-digit pass key stated once
at a random depth, more filler, then the question; the reply is "The pass key is 52817.". The demo's chunked
RoPE layers see 32 tokens at a time, so only its two global layers, which have no position encoding at all, can
carry the key from where it stands to the question.

    # fine-tune a copy of the shipped demo (its training state at step 4000) with a share of passkey chats of at
    # most --passkey-max tokens, the usual chats for the rest; nothing is shipped
    cp -r /tmp/demo_train_work /tmp/passkey_work   # the state train_demo.py left
    OMP_WAIT_POLICY=PASSIVE python training/train_demo.py --work /tmp/passkey_work --out /tmp/passkey_hf \\
        --resume --steps 4400 --lr 5e-4 --tool-share 0.3 --passkey-share 0.3
    # accuracy against the haystack's length, through mlx-llama4 (greedy); past the demo's configured context
    # of 4096 with --context (only the global layers reach past a 32-token chunk, and they encode no position)
    python training/passkey.py --model /tmp/passkey_hf --lengths 128,256,512,1024,2048,4000 --n 20
    python training/passkey.py --model /tmp/passkey_hf --lengths 6000,8000,12000,16000 --n 20 --context 32768
"""

from __future__ import annotations

import argparse
import json
import random
from typing import Any

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
QUESTION = "What is the pass key?"
TRAIN_TOKENS = (64, 256)  # haystack lengths (tokens, about) of the training chats


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def chat(rng: random.Random, tokens: int, tokenizer: Any) -> tuple[list[dict], str]:
    """(messages without the reply, the reply) for a haystack of about ``tokens`` tokens of ``tokenizer`` with the
    key at a random depth."""
    key = f"{rng.randint(10_000, 99_999)}"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    per_filler = count_tokens(tokenizer, FILLER)
    fillers = max(1, (tokens - count_tokens(tokenizer, needle) - count_tokens(tokenizer, QUESTION)) // per_filler)
    depth = rng.randint(0, fillers)
    text = FILLER * depth + needle + FILLER * (fillers - depth) + QUESTION
    return [{"role": "user", "content": text}], f"The pass key is {key}."


def training_chat(rng: random.Random, tokenizer: Any) -> list[dict]:
    """A training chat: a haystack of ``TRAIN_TOKENS`` tokens and its reply."""
    messages, reply = chat(rng, rng.randint(*TRAIN_TOKENS), tokenizer)
    return messages + [{"role": "assistant", "content": reply}]


def accuracy(model: Any, processor: Any, lengths: list[int], n: int, seed: int = 4242) -> dict[int, float]:
    """Exact-match accuracy of greedy replies at each haystack length (tokens, about), ``n`` keys each."""
    from mlx_llama4 import generate

    rng = random.Random(seed)
    out = {}
    for tokens in lengths:
        right = 0
        for _ in range(n):
            messages, reply = chat(rng, tokens, processor.tokenizer)
            right += generate(model, processor, messages, max_tokens=16, temperature=0.0).strip() == reply
        out[tokens] = right / n
        print(f"{tokens:>6} tokens: {out[tokens]:.0%}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="a checkpoint folder (default: the shipped demo)")
    parser.add_argument("--lengths", default="256,512,1024,2048,4000", help="haystack lengths, tokens")
    parser.add_argument("--n", type=int, default=20, help="keys per length")
    parser.add_argument("--context", type=int, default=None,
                        help="positions the model may take (default: its config's max_position_embeddings)")
    args = parser.parse_args()
    import mlx.core as mx

    from mlx_llama4 import load

    model, processor = load(args.model, dtype=mx.float32)
    if args.context:
        model.config.text.max_position_embeddings = args.context
    result = accuracy(model, processor, [int(x) for x in args.lengths.split(",")], args.n)
    print(json.dumps({"model": args.model, "trained_up_to": TRAIN_TOKENS[1], "accuracy": result}))


if __name__ == "__main__":
    main()
