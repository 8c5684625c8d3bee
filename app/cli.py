"""``mlx-llama4 app``: load a model, then serve the chat on http://127.0.0.1:7860 (local only by default)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .chat import DEFAULT_MAX_IMAGE_PIXELS, Settings


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-llama4 app", description="A local web chat with Llama 4, with images.")
    p.add_argument("--model", default="demo",
                   help="model folder, Hugging Face repo id, or 'demo' (the bundled demo model; the default)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    p.add_argument("--models-dir", action="append", type=Path, default=[],
                   help="folder to scan for model folders for the picker (repeatable; default: the current folder)")
    p.add_argument("--no-hf-cache", action="store_true", help="do not list models from the Hugging Face cache")
    p.add_argument("--max-file-size", default="20mb", help="largest upload accepted (default: 20mb)")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help=f"largest image accepted, in pixels (default: {DEFAULT_MAX_IMAGE_PIXELS:,})")
    p.add_argument("--system", default="", help="initial system prompt")
    p.add_argument("--temp", type=float, default=0.6, help="initial temperature (default: 0.6)")
    p.add_argument("--top-p", type=float, default=0.9, help="initial top-p (default: 0.9)")
    p.add_argument("--max-tokens", "-m", type=int, default=512, help="initial max tokens per reply (default: 512)")
    return p


def make_app(args: argparse.Namespace, holder=None):
    """The app for parsed ``args`` around ``holder`` (a ModelHolder; a new one if None)."""
    from .device import DeviceWorker, ModelHolder
    from .handlers import AppConfig, ChatApp

    holder = holder or ModelHolder(DeviceWorker())
    config = AppConfig(
        models_dirs=list(args.models_dir) or [Path.cwd()], include_hf_cache=not args.no_hf_cache,
        max_image_pixels=args.max_image_pixels,
        defaults=Settings(args.system, args.temp, args.top_p, args.max_tokens),
        max_tokens_limit=max(4096, args.max_tokens))
    return ChatApp(holder, config)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from . import ui

    app = make_app(args)
    print(f"Loading {args.model} …", file=sys.stderr, flush=True)
    try:
        app.holder.load(args.model, progress=lambda fraction, text: print(f"  {text}", file=sys.stderr, flush=True))
    except (OSError, ValueError) as e:
        print(f"mlx-llama4 app: error: cannot load {args.model}: {e}", file=sys.stderr)
        return 2
    ui.launch(ui.build(app), host=args.host, port=args.port, share=args.share, max_file_size=args.max_file_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
