"""What the page's events run: sending, streaming the reply, retry, undo, clear, the API, the model picker.

The chat's value (what the browser sends back) is the conversation; ``history.normalize_history`` reads it.
Notes (stats lines, errors, progress) are assistant messages with a metadata title, shown but never
part of the prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import gradio as gr

from .chat import (DEFAULT_MAX_IMAGE_PIXELS, ChatSession, ReplyUpdate, Settings, check_images, format_stats,
                   release_all_caches, stream_reply, upload_dirs)
from .device import ModelHolder
from .history import ends_with_user_turn, is_note, last_user_span, normalize_history
from .models import discover_models

log = logging.getLogger(__name__)
PENDING = "pending"


@dataclass
class AppConfig:
    """Settings of one app instance (from the command line)."""

    models_dirs: list[Path] = field(default_factory=lambda: [Path.cwd()])
    include_hf_cache: bool = True
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    defaults: Settings = field(default_factory=Settings)
    max_tokens_limit: int = 4096
    title: str = "Llama 4 · MLX"


def note(title: str, text: str = "", status: Optional[str] = None) -> dict:
    """An assistant message for the reader only (never part of the prompt): it has a metadata title."""
    metadata: dict[str, Any] = {"title": title}
    if status:
        metadata["status"] = status
    return {"role": "assistant", "content": text, "metadata": metadata}


def _textbox(generating: bool, **kwargs: Any) -> Any:
    """The textbox while a reply streams (Stop shown, input locked) or while idle (Send shown)."""
    return gr.MultimodalTextbox(interactive=not generating, submit_btn=not generating, stop_btn=generating,
                                **kwargs)


def _user_text(message: Any) -> str:
    turns = normalize_history([message])
    return turns[0].text if turns else ""


class ChatApp:
    """The handlers of one app instance; ``ui.build`` lays out the page and wires them."""

    def __init__(self, holder: ModelHolder, config: Optional[AppConfig] = None):
        self.holder = holder
        self.config = config or AppConfig()
        if release_all_caches not in holder.on_release:
            holder.on_release.append(release_all_caches)

    # ---- sending, retrying, undoing -------------------------------------------------------------------

    def add_message(self, message: Optional[dict], history: Optional[list]) -> tuple[Any, list]:
        """Append the user's message (text and images) to the chat, or a note if an image is unusable."""
        history = list(history or [])
        message = message or {}
        text = (message.get("text") or "").strip()
        files = list(message.get("files") or [])
        if not text and not files:
            return gr.update(), history
        problems = check_images(files, upload_dirs(), self.config.max_image_pixels)
        if problems:
            history.append(note("⚠️ Image not accepted", "\n\n".join(problems) + "\n\nRemove it and send again."))
            return gr.update(), history  # the draft stays in the textbox
        content: list[Any] = [{"path": f} for f in files] + ([text] if text else [])
        history.append({"role": "user", "content": content})
        return _textbox(True, value=None), history

    def prepare_retry(self, history: Optional[list]) -> tuple[Any, list]:
        """Drop the last reply (and its notes) so that the last user turn is answered again."""
        history = list(history or [])
        span = last_user_span(history)
        if span is None:
            return gr.update(), history
        return _textbox(True), history[: span[1]]

    def undo(self, history: Optional[list]) -> tuple[Any, list]:
        """Remove the last user turn and its reply, and put the turn back into the textbox."""
        history = list(history or [])
        span = last_user_span(history)
        if span is None:
            return gr.update(), history
        turn = normalize_history(history[span[0]: span[1]])
        draft = {"text": turn[0].text if turn else "",
                 "files": [i for t in turn for i in t.images if isinstance(i, str)]}
        return gr.MultimodalTextbox(value=draft), history[: span[0]]

    def finish(self, history: Optional[list]) -> tuple[Any, list]:
        """After a reply ends or is stopped: unlock the textbox and close a progress note left open."""
        history = list(history or [])
        for i, message in enumerate(history):
            metadata = message.get("metadata") if isinstance(message, dict) else None
            if is_note(message) and isinstance(metadata, dict) and metadata.get("status") == PENDING:
                history[i] = note("⏹ Stopped before the reply began", status="done")
        return _textbox(False), history

    def respond(self, history: Optional[list], session: ChatSession, system: str, temperature: float,
                top_p: float, max_tokens: float) -> Iterator[list]:
        """Stream the assistant's reply into the chat; errors become a note in the chat."""
        history = list(history or [])
        if not ends_with_user_turn(history):
            yield history
            return
        settings = Settings(system or "", temperature, top_p, int(max_tokens))
        updates = stream_reply(self.holder, session, normalize_history(history), settings, upload_dirs(),
                               self.config.max_image_pixels)
        try:
            for update in updates:
                yield self._render(history, update)
        except Exception as e:  # never leave the user with a dead chat
            log.exception("generation failed")
            yield history + [note("⚠️ Generation failed", f"{type(e).__name__}: {e}")]
        finally:
            updates.close()

    @staticmethod
    def _render(history: list, update: ReplyUpdate) -> list:
        if update.error:
            if update.text:
                return history + [{"role": "assistant", "content": update.text}, note("⚠️ Error", update.error)]
            start, end = last_user_span(history) or (len(history), len(history))
            left_out = "\n".join(_user_text(m) for m in history[start:end]).strip()
            quoted = "\n\nThis message was left out of the conversation" + (f":\n\n> {left_out}" if left_out else ".")
            return history[:start] + [note("⚠️ Not sent", update.error + quoted)]
        if not update.text and update.status:
            return history + [note(update.status, status=PENDING)]
        out = history + [{"role": "assistant", "content": update.text}]
        if update.stats:
            out.append(note(format_stats(update.stats), status="done"))
        return out

    def clear(self, session: ChatSession) -> ChatSession:
        session.reset()
        return session

    # ---- the API ----------------------------------------------------------------------------------------

    def api_chat(self, message: Any, system: str, temperature: float, top_p: float, max_tokens: float,
                 session: ChatSession) -> Iterator[tuple[str, Optional[dict]]]:
        """``/chat``: one user turn (text and image files); the session remembers the conversation.

        Streams ``(reply so far, None)`` and ends with ``(reply, stats)``; a problem ends it with
        ``("⚠️ message", {"error": message})`` and the turn is not remembered.
        """
        if isinstance(message, str):
            message = {"text": message, "files": []}
        message = message or {}
        files = list(message.get("files") or [])
        content: list[Any] = [{"path": f} for f in files] + [message.get("text") or ""]
        history = session.api_history + [{"role": "user", "content": content}]
        settings = Settings(system or "", temperature, top_p, int(max_tokens))
        text, keep = "", False
        updates = stream_reply(self.holder, session, normalize_history(history), settings, upload_dirs(),
                               self.config.max_image_pixels)
        try:
            for update in updates:
                if update.error:
                    yield f"⚠️ {update.error}", {"error": update.error}
                    return
                text, keep = update.text, keep or bool(update.text)
                yield text, update.stats
        finally:
            updates.close()
            if keep:  # finished or stopped: what was said stays in the conversation
                session.api_history = history + [{"role": "assistant", "content": text}]

    def api_clear(self, session: ChatSession) -> ChatSession:
        """``/clear``: forget this session's conversation and prompt cache."""
        return self.clear(session)

    # ---- the model picker -------------------------------------------------------------------------------

    def choices(self) -> list[tuple[str, str]]:
        current = self.holder.current
        return discover_models(self.config.models_dirs, current.name if current else None,
                               self.config.include_hf_cache)

    def status(self) -> str:
        current = self.holder.current
        if self.holder.loading:
            return f"**Loading** `{self.holder.loading}` …"
        if current is None:
            return "**No model loaded** — pick one above."
        vision = getattr(current.model.config, "vision", None)
        kind = "text and images" if vision else "text only"
        return f"**Loaded:** `{current.name}` ({kind})"

    def on_load(self) -> tuple[Any, str]:
        current = self.holder.current
        return gr.Dropdown(choices=self.choices(), value=current.name if current else None), self.status()

    def refresh(self) -> Any:
        return gr.Dropdown(choices=self.choices())

    def switch_model(self, name: Optional[str], progress: gr.Progress = gr.Progress(track_tqdm=True)) -> str:
        """Load the picked model (queued behind any reply in progress), showing progress."""
        if not name:
            return self.status()
        try:
            self.holder.load(name, progress=lambda fraction, text: progress(fraction, desc=text))
        except (OSError, ValueError) as e:
            return f"❌ Could not load `{name}`: {e}\n\n" + self.status()
        return self.status()
