"""Where uploaded files live: the only places the app reads images and documents from."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def upload_dirs() -> list[Path]:
    """Where Gradio keeps uploaded files (and the files its handlers hand out)."""
    from gradio.utils import get_upload_folder

    return [Path(get_upload_folder()).resolve()]


def is_uploaded(path: str, allowed_dirs: Sequence[Path]) -> bool:
    """Whether ``path`` (not a URL) lies in one of ``allowed_dirs`` once symlinks and ``..`` are resolved."""
    if "://" in path:
        return False
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    return any(resolved.is_relative_to(d) for d in allowed_dirs)
