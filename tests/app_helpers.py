"""Helpers shared by the app's tests (test_app.py, test_app_browser.py); their fixtures are in conftest.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

import numpy as np
from PIL import Image

from mlx_llama4.app.device import ModelHolder
from mlx_llama4.app.handlers import AppConfig, ChatApp
from mlx_llama4.app.ui import build, launch


def start_app(holder: ModelHolder, folder: Path, **config) -> tuple[ChatApp, object]:
    """Launch the app in-process on 127.0.0.1 (a free port) around ``holder``; returns the ChatApp and the
    Blocks (``.local_url``, ``.close()``). ``folder``'s parent is scanned for the model picker."""
    app = ChatApp(holder, AppConfig(models_dirs=[folder.parent], include_hf_cache=False, **config))
    demo = launch(build(app), host="127.0.0.1", port=None, block=False)
    return app, demo


class EngineSpy:
    """What the ``engine_spy`` fixture records: each request's prompt and handle, and each final event."""

    def __init__(self, delay: float):
        self.delay = delay
        self.requests: list[tuple[Any, Any]] = []
        self.finals: dict[Any, Any] = {}

    def final(self, handle: Any) -> Optional[Any]:
        """The request's last event (``finish_reason``, ``completion_tokens``...), None while it runs."""
        return self.finals.get(handle)


def uploads_in(folder: Path, monkeypatch) -> None:
    """Make ``folder`` the app's upload folder: the only place its file checks let images and documents in."""
    from mlx_llama4.app import chat, handlers

    monkeypatch.setattr(chat, "upload_dirs", lambda: [folder])
    monkeypatch.setattr(handlers, "upload_dirs", lambda: [folder])


def chat_app(app_model, folder: Path, monkeypatch) -> ChatApp:
    """The app's handlers around ``app_model`` (holder, model folder), with ``folder`` as the upload folder."""
    holder, model_folder = app_model
    uploads_in(folder, monkeypatch)
    return ChatApp(holder, AppConfig(models_dirs=[model_folder.parent], include_hf_cache=False))


def collect(stream: AsyncIterator, into: Optional[list] = None) -> list:
    """Every item of an async handler's stream (``ChatApp.respond``, ``api_chat``), run to its end; each
    item is appended to ``into`` as it comes, if given."""
    items = [] if into is None else into

    async def run() -> None:
        async for item in stream:
            items.append(item)

    asyncio.run(run())
    return items


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def picture(path: Path, w: int = 110, h: int = 50, seed: int = 0) -> Path:
    """A random-noise RGB picture saved at ``path``."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path
