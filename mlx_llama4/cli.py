"""``mlx-llama4``: generate, chat, convert and app from the command line (flags as in ``mlx_lm.generate``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo",
                   help="local checkpoint folder or Hugging Face repo id (default: the bundled demo model)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--max-tokens", "-m", type=int, default=256)
    p.add_argument("--temp", type=float, default=None, help="sampling temperature (default: the checkpoint's)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--kv-bits", type=int, default=None, help="quantize the KV cache of every layer to these bits")
    p.add_argument("--kv-group-size", type=int, default=64)


def _sampling(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)


def _stream(chunks, out) -> None:
    last = None
    for last in chunks:
        out.write(last.text)
        out.flush()
    if last is not None:
        out.write(
            f"\n[prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | generation: "
            f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | first token "
            f"{last.time_to_first_token:.2f} s | peak memory {last.peak_memory:.2f} GB]\n"
        )


def _generate(args: argparse.Namespace) -> int:
    from . import load, stream_generate
    from .chat_template import user_turn

    model, processor = load(args.model, revision=args.revision)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        user_turn(args.prompt, len(args.image))
    ]
    _stream(stream_generate(model, processor, messages, images=args.image, **_sampling(args)), sys.stdout)
    return 0


def _chat(args: argparse.Namespace, stdin=sys.stdin, out=sys.stdout) -> int:
    from . import PromptCache, load, stream_generate

    model, processor = load(args.model, revision=args.revision)
    cache, messages, pending = PromptCache(model), [], []
    out.write("Chat with Llama 4. /image PATH attaches an image, /reset starts over, /quit (or Ctrl-D) leaves.\n")
    while True:
        out.write("> ")
        out.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            return 0
        line = line.strip()
        if line.startswith("/image "):
            path = Path(line[len("/image ") :].strip()).expanduser()
            if path.is_file():
                pending.append(str(path))
                out.write(f"[attached {path.name}]\n")
            else:
                out.write(f"[no such file: {path}]\n")
            continue
        if line == "/reset":
            cache, messages, pending = PromptCache(model), [], []
            out.write("[conversation cleared]\n")
            continue
        if not line:
            continue
        parts = [{"type": "image", "image": p} for p in pending] + [{"type": "text", "text": line}]
        messages.append({"role": "user", "content": parts})
        reply = []
        try:
            for chunk in stream_generate(model, processor, messages, prompt_cache=cache, **_sampling(args)):
                reply.append(chunk.text)
                out.write(chunk.text)
                out.flush()
        except ValueError as e:  # a bad image or an over-long conversation: say so and keep the session
            messages.pop()
            out.write(f"[error: {e}]\n")
            continue
        finally:
            pending = []
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":  # the converter owns its flags
        from .convert.cli import main as convert_main

        return convert_main(argv[1:])
    if argv and argv[0] == "app":  # the web app owns its flags
        from .app.cli import main as app_main

        return app_main(argv[1:])
    if argv and argv[0] == "serve":  # the HTTP server owns its flags
        from .app.server.cli import main as serve_main

        return serve_main(argv[1:])
    parser = argparse.ArgumentParser(prog="mlx-llama4", description="Llama 4 in MLX")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a reply to one prompt")
    _add_sampling(g)
    g.add_argument("--prompt", "-p", required=True)
    g.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    g.add_argument("--system", default=None, help="system prompt")
    c = sub.add_parser("chat", help="multi-turn chat in the terminal")
    _add_sampling(c)
    sub.add_parser("convert", help="convert a checkpoint to MLX (see mlx-llama4 convert --help)")
    sub.add_parser("app", help="local web chat with images (see mlx-llama4 app --help)")
    sub.add_parser("serve", help="OpenAI-compatible HTTP server (see mlx-llama4 serve --help)")
    args = parser.parse_args(argv)
    try:
        return _generate(args) if args.command == "generate" else _chat(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"mlx-llama4: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
