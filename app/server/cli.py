"""``mlx-llama4 serve``: an OpenAI-compatible HTTP server on the batching engine (127.0.0.1:8080 by default).

Order matters for the user: flags and the bind-address rule are checked first, then the port is bound (a busy
port is reported before minutes of model loading), then the model loads and the server runs until Ctrl-C,
which closes the engine. Under ``mlx.launch`` (README.md, "Several Macs") process 0 does all this with its share
of the model, and the other processes only load theirs and follow its engine (``engine_client.follow``). Exit
codes: 0 after a normal stop, 2 for usage or input errors (bad flags, a busy port, a model that cannot be
loaded), 1 for anything unexpected, 130 after Ctrl-C and 143 after SIGTERM (both stop the server gracefully and
close the engine).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Optional, Sequence

from .media import MediaPolicy
from .security import bind_refusal

API_KEY_ENV = "MLX_LLAMA4_API_KEY"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-llama4 serve",
                                description="An OpenAI-compatible HTTP server for Llama 4, with images and "
                                            "continuous batching.")
    p.add_argument("--model", default="demo",
                   help="model folder, Hugging Face repo id, or 'demo' (the bundled demo model; the default)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--model-id", default=None,
                   help="the model id /v1/models reports and requests name (default: the folder name, the repo "
                        "id, or 'demo')")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV}; "
                        "the variable keeps the key out of the process list)")
    p.add_argument("--insecure-no-api-key", action="store_true",
                   help="allow a --host other machines can reach without an API key (an open server)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (e.g. http://localhost:3000) to call the API (repeatable; "
                        "default: no cross-origin access)")
    p.add_argument("--max-batch", type=int, default=8, help="most sequences generated together (default: 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for a row; more get 429 (default: 64)")
    p.add_argument("--prompt-cache-gb", type=float, default=2.0,
                   help="memory for reusable prompt prefixes, in GB (default: 2)")
    p.add_argument("--kv-bits", type=int, default=None, choices=(2, 3, 4, 5, 6, 8),
                   help="quantize the KV cache to these bits")
    p.add_argument("--kv-group-size", type=int, default=None, help="group size of KV quantization")
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="reply length for requests that set none (default: 4096; always capped by the context)")
    p.add_argument("--max-body-mb", type=float, default=50.0, help="largest request body, in MB (default: 50)")
    p.add_argument("--allowed-local-media", action="append", default=[], metavar="DIR",
                   help="let image_url name local files below DIR (repeatable; default: no local files)")
    p.add_argument("--allow-media-network", action="append", default=[], metavar="CIDR",
                   help="let image URLs reach this private or loopback network, e.g. 10.0.0.0/8 (repeatable; "
                        "default: public addresses only)")
    p.add_argument("--media-max-mb", type=float, default=20.0, help="largest image accepted, in MB (default: 20)")
    p.add_argument("--media-timeout", type=float, default=10.0,
                   help="seconds allowed to fetch one image URL (default: 10)")
    return p


def _usage_problem(args: argparse.Namespace) -> Optional[str]:
    checks = [(0 <= args.port <= 65535, f"--port {args.port}: not a port number"),
              (args.max_batch >= 1, "--max-batch must be at least 1"),
              (args.max_queue >= 0, "--max-queue must not be negative"),
              (args.prompt_cache_gb >= 0, "--prompt-cache-gb must not be negative"),
              (args.max_tokens >= 1, "--max-tokens must be at least 1"),
              (args.max_body_mb > 0, "--max-body-mb must be positive"),
              (args.media_max_mb > 0, "--media-max-mb must be positive"),
              (args.media_timeout > 0, "--media-timeout must be positive")]
    return next((message for ok, message in checks if not ok), None) or bind_refusal(
        args.host, args.api_key, args.insecure_no_api_key)


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, handed to uvicorn later: the port is known to be ours before loading."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for TIME_WAIT
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def default_model_id(model: str) -> str:
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    problem = _usage_problem(args)
    try:
        media = MediaPolicy.build(int(args.media_max_mb * 2**20), args.media_timeout, args.allowed_local_media,
                                  args.allow_media_network)
    except ValueError as e:
        problem = problem or str(e)
    if problem:
        print(f"mlx-llama4 serve: error: {problem}", file=sys.stderr)
        return 2
    from .engine_client import follow

    try:
        if follow(args.model, args.revision):  # under mlx.launch, processes 1, 2, ...: process 0 serves
            return 0
    except (OSError, ValueError) as e:  # a model that cannot be loaded, or process 0 gone
        print(f"mlx-llama4 serve: error: {e}", file=sys.stderr)
        return 2
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        print(f"mlx-llama4 serve: error: cannot listen on {args.host}:{args.port}: {e.strerror or e}",
              file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a service manager's stop: shut down cleanly too
    engine = None
    try:
        import uvicorn

        from .app import ServerSettings, create_app
        from .engine_client import EngineClient

        print(f"Loading {args.model} …", file=sys.stderr, flush=True)
        try:
            engine = EngineClient.start(
                args.model, revision=args.revision, max_batch=args.max_batch, max_queue=args.max_queue,
                prefix_cache_bytes=int(args.prompt_cache_gb * 2**30), kv_bits=args.kv_bits,
                kv_group_size=args.kv_group_size)
        except (OSError, ValueError) as e:
            print(f"mlx-llama4 serve: error: cannot load {args.model}: {e}", file=sys.stderr)
            return 2
        settings = ServerSettings(
            model_id=args.model_id or default_model_id(args.model), api_key=args.api_key,
            cors_origins=tuple(args.cors_origin), max_body_bytes=int(args.max_body_mb * 2**20),
            max_tokens=args.max_tokens, media=media)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"Serving {settings.model_id} on http://{shown}:{port}/v1 (OpenAI API; Ctrl-C stops)",
              file=sys.stderr, flush=True)
        server = uvicorn.Server(uvicorn.Config(create_app(engine, settings), timeout_graceful_shutdown=5,
                                               log_level="info"))
        server.run(sockets=[sock])
        return 0 if server.started else 1
    except KeyboardInterrupt:
        return 130
    finally:
        if engine is not None:
            engine.close()
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
