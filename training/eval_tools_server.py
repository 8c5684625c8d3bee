"""Measure the demo model's tool use through a running OpenAI-compatible server, with the ``openai`` client.

    mlx-llama4 serve &                                   # the demo model on http://127.0.0.1:8080/v1
    python training/eval_tools_server.py --base-url http://127.0.0.1:8080/v1

The cases and scores are ``training/tool_eval.py``'s, the ones ``tests/test_demo_tools.py`` measures through
``generate``: held-out requests sent with ``tools`` (OpenAI function specs), the reply's ``tool_calls`` read as
the server returns them, then the call sent back the way OpenAI clients do (an assistant message with
``tool_calls``, ``function.arguments`` a JSON string) with a ``tool`` message holding the result, and the
answer read from the next reply. Greedy (``temperature`` 0). Prints the scores and the misses; exits with 1 when
a score is under ``--target``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tool_eval  # noqa: E402


def server_ask(client, model: str, max_tokens: int) -> tool_eval.Ask:
    def ask(messages, tools):
        extra = {"tools": tools} if tools else {}
        response = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                  temperature=0.0, **extra)
        message = response.choices[0].message
        calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        return (message.content or "").strip(), calls

    return ask


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--n", type=int, default=40, help="held-out requests per tool (and per other score)")
    parser.add_argument("--seed", type=int, default=tool_eval.SEED)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--target", type=float, default=0.9)
    args = parser.parse_args(argv)

    from openai import OpenAI

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    scores, misses = tool_eval.measure(server_ask(client, args.model, args.max_tokens), n=args.n, seed=args.seed)
    for kind, asked, expected, reply in misses:
        print(f"miss {kind}: {asked!r} expected {expected!r}, got {reply!r}")
    print(json.dumps({k: round(v, 3) for k, v in scores.items()}))
    return 0 if all(v >= args.target for v in scores.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
