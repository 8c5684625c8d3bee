"""What the app's routes accept from a caller: text, settings and files uploaded to this app, nothing else.

Gradio copies every file that an event's payload names into its cache and serves what its cache holds
(``/gradio_api/file=...``). On input it refuses paths outside its upload folder only for file dicts tagged
``"meta": {"_type": "gradio.FileData"}``; a chat message that embeds a component
(``{"type": "component", "component": "image", "value": {"path": ...}}``) reaches the Chatbot's preprocessing,
and the handler, with any path the server can read. On output it copies paths from the working and temp
folders, so a handler that hands such a path back (Undo puts a turn's files back into the textbox) would
publish the file. ``GuardedBlocks`` therefore checks each route's raw payload before Gradio processes any of
it: a file outside the upload folder, a URL to fetch, or an embedded component refuses the call. Every
refused call (a payload of the wrong shape too) logs one line instead of a traceback.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import gradio as gr

from .uploads import is_uploaded, upload_dirs

log = logging.getLogger("mlx_llama4.app")


def refusal(value: Any, allowed_dirs: Sequence[Path]) -> Optional[str]:
    """Why a route's raw input ``value`` is refused (the first file or component found at any depth), or None."""
    if isinstance(value, dict):
        if value.get("type") == "component":
            return "a chat message can hold only text and uploaded files"
        path = value.get("path")
        if isinstance(path, str) and not is_uploaded(path, allowed_dirs):
            return f"{os.path.basename(path) or path}: only files uploaded to this app can be used"
        parts = list(value.values())
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        return None
    return next((reason for reason in (refusal(part, allowed_dirs) for part in parts) if reason), None)


class GuardedBlocks(gr.Blocks):
    """``gr.Blocks`` whose routes refuse what ``refusal`` finds before Gradio moves any file into its cache.

    A plain string given for a message box (``gr.MultimodalTextbox``) is a message of text alone.
    """

    async def preprocess_data(self, block_fn, inputs, state, explicit_call=False):
        inputs = [_text_alone(block, value) for block, value in zip(block_fn.inputs, inputs)] + list(
            inputs[len(block_fn.inputs):])
        reason = refusal(inputs, upload_dirs())
        if reason is None:
            try:
                return await super().preprocess_data(block_fn, inputs, state, explicit_call)
            except gr.Error as e:
                reason = e.message
            except (ValueError, TypeError) as e:  # a value of the wrong shape (pydantic's errors are ValueErrors)
                reason = " ".join(str(e).split())
        log.warning("refused a call to /%s: %s", block_fn.api_name or block_fn.name, reason[:300])
        raise gr.Error(reason, print_exception=False)


def _text_alone(block: Any, value: Any) -> Any:
    """A plain string given for a message box, as the message box's value."""
    return {"text": value, "files": []} if isinstance(value, str) and isinstance(block, gr.MultimodalTextbox) else value
