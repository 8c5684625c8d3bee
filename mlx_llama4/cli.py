"""``mlx-llama4``: generate, chat, convert and app from the command line (flags as in ``mlx_lm.generate``).

Exit codes, the same for every subcommand: 0 success, 2 a usage or input error (a bad flag, as argparse
reports it, a missing file, a bad value, a checkpoint that cannot be read), 1 an unexpected failure (with
its traceback), 130 interrupted by Ctrl-C (after cancelling the reply being generated).
"""

from __future__ import annotations

import argparse
import io
import sys
import traceback
from contextlib import closing
from pathlib import Path
from typing import Optional, Sequence, TextIO

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# What a user can fix: a path, a value, a checkpoint, Hub access (ConfigError, CheckpointError, ImageError
# and ProcessorError are ValueErrors).
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)

CHAT_COMMANDS = "/image PATH (attach an image), /reset (start over), /quit (or Ctrl-D: leave)"


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo",
                   help="local checkpoint folder or Hugging Face repo id (default: the bundled demo model)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--system-prompt", "--system", dest="system_prompt", default=None, help="system prompt")
    p.add_argument("--max-tokens", "-m", type=int, default=256)
    p.add_argument("--temp", type=float, default=None, help="sampling temperature (default: the checkpoint's)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--kv-bits", type=int, default=None, help="quantize the KV cache of every layer to these bits")
    p.add_argument("--kv-group-size", type=int, default=None,
                   help="KV quantization group size (default: automatic, 64 or 32, whichever divides the head size)")
    p.add_argument("--parallel", choices=("tensor", "pipeline"), default="tensor",
                   help="under mlx.launch on several processes: split heads and experts (tensor, the default) or "
                        "layers (pipeline, for slow links)")


def _sampling(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)


def _system(args: argparse.Namespace) -> list[dict]:
    return [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []


def _stream(chunks, out: TextIO, stats: bool) -> str:
    """Write a reply as it streams, then a newline or (``stats``) a stats line; the stream is closed (its
    generation cancelled) even when interrupted. Returns the reply's text."""
    last, text = None, []
    with closing(chunks):
        for last in chunks:
            text.append(last.text)
            out.write(last.text)
            out.flush()
    if not stats:
        out.write("\n")
    elif last is not None:
        out.write(
            f"\n[prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | generation: "
            f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | first token "
            f"{last.time_to_first_token:.2f} s | peak memory {last.peak_memory:.2f} GB]\n"
        )
    return "".join(text)


class _Discard(io.TextIOBase):
    """Where every process but process 0 writes, so that a run under mlx.launch prints once."""

    def write(self, text: str) -> int:
        return len(text)


def _load(args: argparse.Namespace, out: TextIO):
    """``(model, processor, out)``: under mlx.launch on several processes (README.md, "Several Macs") each
    loads its share, and only process 0 writes to ``out``."""
    from . import load
    from .sharding import process_group

    group = process_group()
    model, processor = load(args.model, revision=args.revision, group=group, parallel=args.parallel)
    return model, processor, (out if group is None or group.rank() == 0 else _Discard())


def _generate(args: argparse.Namespace, stdin: Optional[TextIO] = None, out: Optional[TextIO] = None) -> int:
    from . import stream_generate
    from .chat_template import user_turn

    stdin, out = stdin or sys.stdin, out or sys.stdout
    prompt = stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip() and not args.image:
        raise ValueError("the prompt is empty" + (" (nothing on standard input)" if args.prompt == "-" else ""))
    model, processor, out = _load(args, out)
    messages = _system(args) + [user_turn(prompt, len(args.image))]
    _stream(stream_generate(model, processor, messages, images=args.image, **_sampling(args)), out, stats=True)
    return EXIT_OK


def _chat(args: argparse.Namespace, stdin: Optional[TextIO] = None, out: Optional[TextIO] = None) -> int:
    from . import PromptCache, stream_generate
    from .generation import resolve_sampling
    from .sharding import everywhere

    stdin, out = stdin or sys.stdin, out or sys.stdout
    model, processor, out = _load(args, out)
    resolve_sampling(model, processor, **_sampling(args))  # bad settings end the session before it starts
    cache, messages, pending = PromptCache(model), _system(args), []
    out.write(f"Chat with Llama 4. Commands: {CHAT_COMMANDS}.\n")
    while True:
        out.write("> ")
        out.flush()
        line = stdin.readline()
        if not line:
            return EXIT_OK
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command == "/quit":
                return EXIT_OK
            if command == "/reset":
                cache, messages, pending = PromptCache(model), _system(args), []
                out.write("[conversation cleared]\n")
            elif command == "/image" and argument.strip():
                path = Path(argument.strip()).expanduser()
                if everywhere(model, path.is_file()):  # under mlx.launch: on every machine
                    pending.append(str(path))
                    out.write(f"[attached {path.name}]\n")
                else:
                    out.write(f"[no such file: {path}]\n")
            elif command == "/image":
                out.write("[usage: /image PATH]\n")
            else:
                out.write(f"[unknown command {command}; commands: {CHAT_COMMANDS}]\n")
            continue
        parts = [{"type": "image", "image": p} for p in pending] + [{"type": "text", "text": line}]
        messages.append({"role": "user", "content": parts})
        pending = []
        try:
            chunks = stream_generate(model, processor, messages, prompt_cache=cache, **_sampling(args))
            reply = _stream(chunks, out, stats=False)
        except ValueError as e:  # a bad image or an over-long conversation: say so and keep the session
            messages.pop()
            out.write(f"[error: {e}]\n")
            continue
        messages.append({"role": "assistant", "content": reply})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-llama4", description="Llama 4 in MLX")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a reply to one prompt")
    _add_sampling(g)
    g.add_argument("--prompt", "-p", required=True, help="the prompt ('-': read it from standard input)")
    g.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    c = sub.add_parser("chat", help="multi-turn chat in the terminal")
    _add_sampling(c)
    sub.add_parser("convert", help="convert a checkpoint to MLX (see mlx-llama4 convert --help)")
    sub.add_parser("app", help="local web chat with images (see mlx-llama4 app --help)")
    sub.add_parser("serve", help="OpenAI-compatible HTTP server (see mlx-llama4 serve --help)")
    return p


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
    args = parser().parse_args(argv)  # a usage error exits with 2
    try:
        return _generate(args) if args.command == "generate" else _chat(args)
    except KeyboardInterrupt:
        print("\nmlx-llama4: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except INPUT_ERRORS as e:
        print(f"mlx-llama4: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:  # a bug or an environment failure: keep the traceback for the report
        traceback.print_exc()
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
