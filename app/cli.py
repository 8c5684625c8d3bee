"""``mlx-llama4 app``: load a model, then serve the chat on http://127.0.0.1:7860 (local only by default).

Under ``mlx.launch`` (README.md, "Several Macs") process 0 runs the app on its share of the model, and the other
processes load theirs and follow its engine (``mlx_llama4.engine.follow_if_launched``).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Optional, Sequence

from .chat import DEFAULT_MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS_LIMIT, Settings


def _int_between(low: int, high: int, why: str = ""):
    """An argparse type: an integer from ``low`` to ``high``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}{why}, got {value}")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-llama4 app", description="A local web chat with Llama 4, with images.")
    p.add_argument("--model", default="demo",
                   help="model folder, Hugging Face repo id, or 'demo' (the bundled demo model; the default)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_int_between(1, 65535), default=7860, help="port (default: 7860)")
    p.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    p.add_argument("--models-dir", action="append", type=Path, default=[],
                   help="folder to scan for model folders for the picker (repeatable; default: the current folder)")
    p.add_argument("--no-hf-cache", action="store_true", help="do not list models from the Hugging Face cache")
    p.add_argument("--max-file-size", default="20mb", help="largest upload accepted (default: 20mb)")
    p.add_argument("--max-image-pixels", default=DEFAULT_MAX_IMAGE_PIXELS,
                   type=_int_between(1, MAX_IMAGE_PIXELS_LIMIT, " (the image loader's decompression-bomb limit)"),
                   help=f"largest image accepted, in pixels (default: {DEFAULT_MAX_IMAGE_PIXELS:,})")
    p.add_argument("--system", default="", help="initial system prompt")
    p.add_argument("--temp", type=float, default=0.6, help="initial temperature (default: 0.6)")
    p.add_argument("--top-p", type=float, default=0.9, help="initial top-p (default: 0.9)")
    p.add_argument("--max-tokens", "-m", type=int, default=512, help="initial max tokens per reply (default: 512)")
    p.add_argument("--max-batch", type=_int_between(1, 1024), default=8,
                   help="replies generated together in one batch (default: 8); more wait in the engine's queue")
    p.add_argument("--kv-bits", type=int, default=None, choices=(2, 3, 4, 5, 6, 8),
                   help="quantize the KV cache of every layer to these bits (default: no quantization)")
    p.add_argument("--kv-group-size", type=_int_between(1, 1024), default=None,
                   help="group size of the KV quantization (default: one the model's head size allows)")
    return p


def check_address(host: str, port: int) -> Optional[str]:
    """Why the server could not listen on ``host:port`` (taken, not an address of this machine), or None.

    Checked before the model loads, which can take minutes; the socket is closed again at once.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server sets it
            probe.bind(address)
    except (OSError, OverflowError) as e:  # socket.gaierror is an OSError
        return getattr(e, "strerror", None) or str(e)
    return None


def make_app(args: argparse.Namespace, holder=None):
    """The app for parsed ``args`` around ``holder`` (a ModelHolder; a new one if None)."""
    from .device import EngineOptions, ModelHolder
    from .handlers import AppConfig, ChatApp

    holder = holder or ModelHolder(engine=EngineOptions(max_batch=args.max_batch, kv_bits=args.kv_bits,
                                                        kv_group_size=args.kv_group_size))
    config = AppConfig(
        models_dirs=list(args.models_dir) or [Path.cwd()], include_hf_cache=not args.no_hf_cache,
        max_image_pixels=args.max_image_pixels,
        defaults=Settings(args.system, args.temp, args.top_p, args.max_tokens),
        max_tokens_limit=max(4096, args.max_tokens))
    return ChatApp(holder, config)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from mlx_llama4.engine import follow_if_launched

    try:
        if follow_if_launched(args.model):  # under mlx.launch, processes 1, 2, ...: process 0 runs the app
            return 0
    except (OSError, ValueError) as e:  # a model that cannot be loaded, or process 0 gone
        print(f"mlx-llama4 app: error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    problem = check_address(args.host, args.port)
    if problem:
        print(f"mlx-llama4 app: error: cannot listen on {args.host}:{args.port}: {problem}", file=sys.stderr)
        return 2
    from . import ui

    app = make_app(args)
    print(f"Loading {args.model} …", file=sys.stderr, flush=True)
    try:
        app.holder.load(args.model, progress=lambda fraction, text: print(f"  {text}", file=sys.stderr, flush=True))
    except (OSError, ValueError) as e:
        print(f"mlx-llama4 app: error: cannot load {args.model}: {e}", file=sys.stderr)
        return 2
    try:
        ui.launch(ui.build(app), host=args.host, port=args.port, share=args.share, max_file_size=args.max_file_size)
    except OSError as e:  # the address was taken while the model loaded
        print(f"mlx-llama4 app: error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
