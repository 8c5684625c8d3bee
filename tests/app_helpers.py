"""Helpers shared by the app's tests (test_app.py, test_app_browser.py); their fixtures are in conftest.py."""

from __future__ import annotations

from pathlib import Path

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


def picture(path: Path, w: int = 110, h: int = 50, seed: int = 0) -> Path:
    """A random-noise RGB picture saved at ``path``."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path
