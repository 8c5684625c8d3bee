"""``mlx-llama4``: generate, chat, cache-prompt, convert and app from the command line (flags as in
``mlx_lm.generate``).

Exit codes, the same for every subcommand: 0 success, 2 a usage or input error (a bad flag, as argparse
reports it, a missing file, a bad value, a checkpoint that cannot be read), 1 an unexpected failure (with
its traceback), 130 interrupted by Ctrl-C (after cancelling the reply being generated).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import traceback
from contextlib import closing
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

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
    _add_kv_bits(p)
    p.add_argument("--kv-group-size", type=int, default=None,
                   help="KV quantization group size (default: automatic, 64 or 32, whichever divides the head size)")
    p.add_argument("--parallel", choices=("tensor", "pipeline"), default="tensor",
                   help="under mlx.launch on several processes: split heads and experts (tensor, the default) or "
                        "layers (pipeline, for slow links)")


def _kv_bits(value: str) -> Optional[int | str]:
    if value in ("auto", "none"):
        return None if value == "none" else value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bits (1-6 or 8), 'auto' or 'none', got {value!r}") from None


def _add_kv_bits(p: argparse.ArgumentParser) -> None:
    from . import long_context  # light: no MLX

    p.add_argument("--kv-bits", type=_kv_bits, default="auto",
                   help="quantize the KV cache of every layer to these bits; 'auto' (default): float, except the "
                        f"global layers at {long_context.LONG_CONTEXT_KV_BITS} bits once the context reaches "
                        f"{long_context.LONG_CONTEXT_TOKENS} tokens; 'none': always float")


def _kv_statement(bits: Optional[int], requested: Optional[int | str]) -> str:
    """What the KV cache of a finished generation held, for the stats line (empty when float)."""
    if bits is None:
        return ""
    if requested == "auto":
        from . import long_context

        return (f"KV of the global layers quantized to {bits} bits past {long_context.LONG_CONTEXT_TOKENS} "
                "tokens (--kv-bits none keeps it float)")
    return f"KV quantized to {bits} bits"


class PrefillProgress:
    """A progress bar over the prompt's tokens (on standard error, for prompts of ``min_tokens`` or more),
    showing the time per 1K tokens of the latest prefill step as the context grows; ``history`` keeps
    (context, seconds per 1K tokens) of every step."""

    def __init__(self, min_tokens: int = 4096, start: int = 0):
        self.min_tokens, self.start = min_tokens, start  # start: positions already cached
        self.bar: Any = None
        self.history: list[tuple[int, float]] = []
        self._last: Optional[tuple[int, float]] = None

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self._last is None and total >= self.min_tokens:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="tok", desc="prefill", file=sys.stderr, dynamic_ncols=True)
        if self._last is not None and done > self._last[0]:
            step = done - self._last[0]
            if done < total:  # not the last token alone, whose step also samples the first reply token
                per_1k = 1000 * (now - self._last[1]) / step
                self.history.append((self.start + done, per_1k))
                if self.bar is not None:
                    self.bar.set_postfix_str(f"{per_1k:.2f} s/1K tokens at {(self.start + done) / 1000:.1f}K",
                                             refresh=False)
            if self.bar is not None:
                self.bar.update(step)
        self._last = (done, now)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self) -> str:
        """Seconds per 1K tokens at each doubling of the context (the step that reached it)."""
        points, mark = [], 1024
        for context, per_1k in self.history:
            if context >= mark or (context, per_1k) == self.history[-1]:
                points.append(f"{per_1k:.2f} s at {context / 1000:.1f}K")
                while mark <= context:
                    mark *= 2
        return "time per 1K prompt tokens: " + ", ".join(points) if points else ""


def _sampling(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)


def _system(args: argparse.Namespace) -> list[dict]:
    return [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []


def _stream(chunks, out: TextIO, stats: bool, kv_bits: Optional[int | str] = None) -> str:
    """Write a reply as it streams, then a newline or (``stats``) a stats line, which says what the KV cache
    held (``kv_bits``: what was asked); the stream is closed (its generation cancelled) even when interrupted.
    Returns the reply's text."""
    last, text = None, []
    with closing(chunks):
        for last in chunks:
            text.append(last.text)
            out.write(last.text)
            out.flush()
    if not stats:
        out.write("\n")
    elif last is not None:
        kv = _kv_statement(last.kv_bits, kv_bits)
        out.write(
            f"\n[prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | generation: "
            f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | first token "
            f"{last.time_to_first_token:.2f} s | peak memory {last.peak_memory:.2f} GB{' | ' + kv if kv else ''}]\n"
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
    if args.prompt_cache:
        return _generate_from_cache(args, prompt, out)
    model, processor, out = _load(args, out)
    messages = _system(args) + [user_turn(prompt, len(args.image))]
    progress = PrefillProgress()
    chunks = stream_generate(model, processor, messages, images=args.image, progress=progress, **_sampling(args))
    try:
        _stream(chunks, out, stats=True, kv_bits=args.kv_bits)
    finally:
        progress.close()
    return EXIT_OK


def _generate_from_cache(args: argparse.Namespace, question: str, out: TextIO) -> int:
    """``generate --prompt-cache FILE``: the question about the document FILE holds, fed after it."""
    from . import load, load_prompt_cache, stream_generate
    from .document_cache import document_messages

    if args.image or args.system_prompt:
        raise ValueError("--prompt-cache asks about the cached document: --image and --system-prompt do not apply "
                         "(give --system-prompt to cache-prompt)")
    model, processor = load(args.model, revision=args.revision)
    cache = load_prompt_cache(args.prompt_cache, model)
    messages = document_messages(cache, question)
    progress = PrefillProgress(start=cache.offset)
    chunks = stream_generate(model, processor, messages, prompt_cache=cache, progress=progress, **_sampling(args))
    try:
        _stream(chunks, out, stats=True, kv_bits=args.kv_bits)
    finally:
        progress.close()
    return EXIT_OK


def _cache_prompt(args: argparse.Namespace, stdin: Optional[TextIO] = None, out: Optional[TextIO] = None) -> int:
    """``cache-prompt``: prefill a document once and save it, to ask ``generate --prompt-cache`` about it."""
    from . import load, save_prompt_cache
    from .cache import global_kv_bits
    from .document_cache import cache_document
    from .generation import resolve_sampling

    stdin, out = stdin or sys.stdin, out or sys.stdout
    if args.file == "-":
        document = stdin.read()
    else:
        try:
            document = Path(args.file).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{args.file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    out_path = Path(args.out)
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"{out_path}: the folder {out_path.parent} does not exist")
    model, processor = load(args.model, revision=args.revision)
    kv = resolve_sampling(model, processor, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)
    progress = PrefillProgress(min_tokens=1)
    tic = time.perf_counter()
    try:
        cache = cache_document(model, processor, document, system_prompt=args.system_prompt,
                               kv_bits=args.kv_bits, kv_group_size=kv["kv_group_size"], progress=progress)
    finally:
        progress.close()
    seconds = time.perf_counter() - tic
    save_prompt_cache(out_path, cache)
    kv_text = _kv_statement(global_kv_bits(cache.layers), args.kv_bits) or "KV float"
    out.write(f"cached {cache.offset} tokens of {args.file} in {seconds:.1f} s ({cache.offset / seconds:.1f} tok/s); "
              f"{kv_text}\n")
    if progress.summary():
        out.write(progress.summary() + "\n")
    out.write(f"wrote {out_path} ({out_path.stat().st_size / 1e9:.2f} GB); ask with: mlx-llama4 generate "
              f"--model {args.model} --prompt-cache {out_path} --prompt QUESTION\n")
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
    g.add_argument("--prompt-cache", default=None, metavar="FILE",
                   help="a document cached by cache-prompt: the prompt is a question about it, and only the "
                        "question's tokens are fed")
    c = sub.add_parser("chat", help="multi-turn chat in the terminal")
    _add_sampling(c)
    d = sub.add_parser("cache-prompt", help="prefill a long document once and save it for generate --prompt-cache")
    d.add_argument("--model", default="demo",
                   help="local checkpoint folder or Hugging Face repo id (default: the bundled demo model)")
    d.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    d.add_argument("--file", "-f", required=True, help="the document, UTF-8 text ('-': read standard input)")
    d.add_argument("--out", "-o", required=True, help="the prompt cache file to write")
    d.add_argument("--system-prompt", "--system", dest="system_prompt", default=None, help="system prompt")
    _add_kv_bits(d)
    d.add_argument("--kv-group-size", type=int, default=None,
                   help="KV quantization group size (default: automatic, 64 or 32, whichever divides the head size)")
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
        return {"generate": _generate, "chat": _chat, "cache-prompt": _cache_prompt}[args.command](args)
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
