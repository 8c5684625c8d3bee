"""What the page's events run: sending, streaming the reply, retry, undo, clear, the API, the model picker.

Replies (``respond``, ``api_chat``) are async generators: a reply waiting for the engine holds no server
thread, and Stop cancels it at once. The chat's value (what the browser sends back) is the conversation;
``history.normalize_history`` reads it. Notes (stats lines, errors, progress) are assistant messages with a
metadata title, shown but never part of the prompt. Every event that ends a reply (finished, stopped,
failed, cleared) is followed by ``finish``, which settles what the chat and the textbox show.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import gradio as gr

from .chat import (DEFAULT_MAX_IMAGE_PIXELS, ChatSession, ReplyUpdate, Settings, check_images, format_stats,
                   stream_reply, upload_dirs)
from .device import ModelHolder
from .documents import check_document, is_document
from .history import ends_with_user_turn, is_note, last_user_span, normalize_history
from .models import discover_models, with_current
from .tools import ToolUse

log = logging.getLogger("mlx_llama4.app")
PENDING = "pending"
# Note titles. Their symbols are in the fonts every system has (DejaVu Sans on Linux), not emoji-only ones.
NOT_ACCEPTED = "⚠️ File not accepted"
NOT_SENT = "⚠️ Not sent"
STOPPED = "■ Stopped"
STOPPED_EARLY = "■ Stopped before the reply began"
LEFT_OUT = (NOT_ACCEPTED, NOT_SENT)  # notes that stand for a message the user still has in the textbox


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


def tool_messages(use: ToolUse) -> list[dict]:
    """How a tool call shows in the chat: a note with its arguments and result, and the picture it drew."""
    arguments = ", ".join(f"{k}={json.dumps(v)}" for k, v in use.arguments.items())
    title = f"⚙ Used {use.name}" + (" (it failed)" if use.failed else "")
    shown = [note(title, f"`{use.name}({arguments})`\n\n→ {use.result}", status="done")]
    return shown + ([{"role": "assistant", "content": {"path": use.image}}] if use.image else [])


def _title(message: Any) -> Optional[str]:
    metadata = message.get("metadata") if isinstance(message, dict) else getattr(message, "metadata", None)
    return metadata.get("title") if isinstance(metadata, dict) else getattr(metadata, "title", None)


def _status(message: Any) -> Optional[str]:
    metadata = message.get("metadata") if isinstance(message, dict) else None
    return metadata.get("status") if isinstance(metadata, dict) else None


def _left_out(history: list) -> bool:
    """Whether the chat ends with a note that a message was not sent (the message is back in the textbox)."""
    return bool(history) and _title(history[-1]) in LEFT_OUT


def _ends_with_reply(history: list) -> bool:
    """Whether the chat ends with reply text that no stats line or note follows (a reply cut short)."""
    if not history or is_note(history[-1]):
        return False
    last = history[-1]
    return (last.get("role") if isinstance(last, dict) else getattr(last, "role", None)) == "assistant"


def _textbox(generating: bool, **kwargs: Any) -> Any:
    """The textbox while a reply streams (Stop shown, input locked) or while idle (Send shown)."""
    return gr.MultimodalTextbox(interactive=not generating, submit_btn=not generating, stop_btn=generating,
                                **kwargs)


def _draft(messages: list) -> dict:
    """The textbox value that holds a user turn again: its text and its uploaded files."""
    turns = normalize_history(messages)
    return {"text": "\n".join(t.text for t in turns if t.text),
            "files": [f for t in turns for f in t.images + t.documents if isinstance(f, str)]}


class ChatApp:
    """The handlers of one app instance; ``ui.build`` lays out the page and wires them."""

    def __init__(self, holder: ModelHolder, config: Optional[AppConfig] = None):
        self.holder = holder
        self.config = config or AppConfig()
        self._found: Optional[list[tuple[str, str]]] = None  # the picker's models, from the last scan

    # ---- sending, retrying, undoing -------------------------------------------------------------------

    def add_message(self, message: Optional[dict], history: Optional[list],
                    session: ChatSession) -> tuple[Any, list]:
        """Append the user's message (text, images, documents) to the chat, or a note if a file is unusable."""
        history = list(history or [])
        message = message or {}
        text = (message.get("text") or "").strip()
        files = list(message.get("files") or [])
        if not text and not files:
            return gr.update(), history
        documents = [f for f in files if is_document(f)]
        problems = check_images([f for f in files if f not in documents], upload_dirs(), self.config.max_image_pixels)
        problems += [p for p in (check_document(d, upload_dirs()) for d in documents) if p]
        if problems:
            history.append(note(NOT_ACCEPTED, "\n\n".join(problems) + "\n\nRemove it and send again."))
            return gr.update(), history  # the draft stays in the textbox
        content: list[Any] = [{"path": f} for f in files] + ([text] if text else [])
        history.append({"role": "user", "content": content})
        session.cleared = False
        return _textbox(True, value=None), history

    def prepare_retry(self, history: Optional[list], session: ChatSession) -> tuple[Any, list]:
        """Drop the last reply (and its notes) so that the last user turn is answered again.

        After a message that was not sent there is nothing to retry: that message is back in the textbox,
        and the turn before it keeps its answer.
        """
        history = list(history or [])
        span = last_user_span(history)
        if span is None or _left_out(history):
            return gr.update(), history
        session.cleared = False
        return _textbox(True), history[: span[1]]

    def undo(self, history: Optional[list]) -> tuple[Any, list]:
        """Remove the last user turn and its reply, and put the turn back into the textbox.

        After a message that was not sent, only its note goes: the message is already in the textbox.
        """
        history = list(history or [])
        if _left_out(history):
            while _left_out(history):
                history.pop()
            return gr.update(), history
        span = last_user_span(history)
        if span is None:
            return gr.update(), history
        return gr.MultimodalTextbox(value=_draft(history[span[0]: span[1]])), history[: span[0]]

    def finish(self, history: Optional[list], session: ChatSession) -> tuple[Any, list]:
        """After a reply ends, is stopped or fails: unlock the textbox and say how the reply ended.

        A reply cut by Stop gets a "Stopped" note, a message stopped before its reply began (its prompt
        still being read, or waiting for a place in the batch) gets one too, so Retry can answer it; a
        message that was not sent goes back into the textbox; after Clear the chat stays empty, whatever
        the stopped reply streamed meanwhile.
        """
        draft, session.unsent = session.unsent, None
        if session.cleared:
            return _textbox(False, value=None), []
        history = [note(STOPPED_EARLY, status="done") if _status(m) == PENDING else m for m in history or []]
        if ends_with_user_turn(history):
            history.append(note(STOPPED_EARLY, status="done"))
        elif _ends_with_reply(history):
            history.append(note(STOPPED, status="done"))
        return (_textbox(False, value=draft) if draft else _textbox(False)), history

    async def respond(self, history: Optional[list], session: ChatSession, system: str, temperature: float,
                      top_p: float, max_tokens: float, tools: Optional[list[str]] = None) -> AsyncIterator[list]:
        """Stream the assistant's reply into the chat, offering the demo ``tools`` checked in the Tools panel;
        errors become a note in the chat."""
        history = list(history or [])
        if not ends_with_user_turn(history):
            yield history
            return
        settings = Settings(system or "", temperature, top_p, int(max_tokens), tuple(tools or ()))
        updates = self._stream(normalize_history(history), settings)
        try:
            async for update in updates:
                if update.error and not update.text:  # nothing was said: the message goes back to the textbox
                    start, end = last_user_span(history) or (len(history), len(history))
                    session.unsent = _draft(history[start:end])
                    yield history[:start] + [note(NOT_SENT, update.error + "\n\nThe message is back in the "
                                                  "message box: change it and send it again.")]
                else:
                    yield self._render(history, update)
        except Exception as e:  # never leave the user with a dead chat
            log.exception("generation failed")
            yield history + [note("⚠️ Generation failed", f"{type(e).__name__}: {e}")]
        finally:
            await updates.aclose()  # on Stop: the engine request is cancelled

    def _stream(self, turns: list, settings: Settings) -> AsyncIterator[ReplyUpdate]:
        return stream_reply(self.holder, turns, settings, upload_dirs(), self.config.max_image_pixels)

    @staticmethod
    def _render(history: list, update: ReplyUpdate) -> list:
        history = history + [m for use in update.tools for m in tool_messages(use)]
        if update.error:
            return history + [{"role": "assistant", "content": update.text}, note("⚠️ Error", update.error)]
        if not update.text and update.status:
            return history + [note(update.status, status=PENDING)]
        out = history + [{"role": "assistant", "content": update.text}]
        if update.stopped:
            out.append(note(STOPPED, update.stopped, status="done"))
        if update.stats:
            out.append(note(format_stats(update.stats), status="done"))
        return out

    def clear(self, session: ChatSession) -> ChatSession:
        """Clear (the page has emptied the chat): a new conversation. The same click cancels a reply in
        progress, whose last updates may still reach the page; ``finish`` then empties the chat again."""
        session.reset()
        session.cleared = True
        return session

    # ---- the API ----------------------------------------------------------------------------------------

    async def api_chat(self, message: Any, system: str, temperature: float, top_p: float, max_tokens: float,
                       session: ChatSession) -> AsyncIterator[tuple[str, Optional[dict]]]:
        """``/chat``: one user turn (a string, or text and files: images, documents); the session remembers the
        conversation.

        Streams ``(reply so far, None)`` and ends with ``(reply, stats)``; a problem ends it with
        ``("⚠️ message", {"error": message})`` and the turn is not remembered; a reply cut short by a model
        switch ends with ``(reply so far, {"stopped": why})``.
        """
        if isinstance(message, str):
            message = {"text": message, "files": []}
        message = message or {}
        files = list(message.get("files") or [])
        content: list[Any] = [{"path": f} for f in files] + [message.get("text") or ""]
        history = session.api_history + [{"role": "user", "content": content}]
        settings = Settings(system or "", temperature, top_p, int(max_tokens))
        text, keep = "", False
        updates = self._stream(normalize_history(history), settings)
        try:
            async for update in updates:
                if update.error:
                    yield f"⚠️ {update.error}", {"error": update.error}
                    return
                text, keep = update.text, keep or bool(update.text)
                yield text, {"stopped": update.stopped} if update.stopped else update.stats
        finally:
            await updates.aclose()
            if keep:  # finished or stopped: what was said stays in the conversation
                session.api_history = history + [{"role": "assistant", "content": text}]

    def api_clear(self, session: ChatSession) -> ChatSession:
        """``/clear``: forget this session's conversation."""
        session.reset()
        return session

    # ---- the model picker: one model for the whole process, shown the same in every session -------------

    def choices(self, rescan: bool = False) -> list[tuple[str, str]]:
        """The picker's models (scanned again if ``rescan``), with the one loaded or loading listed."""
        if rescan or self._found is None:
            self._found = discover_models(self.config.models_dirs, None, self.config.include_hf_cache)
        return with_current(self._found, self._shown())

    def _shown(self) -> Optional[str]:
        current = self.holder.current
        return self.holder.loading or (current.name if current else None)

    def status(self) -> str:
        current = self.holder.current
        if self.holder.loading:
            meanwhile = (f"; `{current.name}` answers until it is ready" if current else
                         "; the previous model was unloaded first, as both do not fit in memory")
            return f"**Loading** `{self.holder.loading}` …{meanwhile}"
        if current is None:
            return "**No model loaded** — pick one above."
        vision = getattr(current.model.config, "vision", None)
        kind = "text and images" if vision else "text only"
        return f"**Loaded:** `{current.name}` ({kind})"

    def model_view(self) -> tuple[Any, str]:
        """The picker and the status line as they are for the whole process."""
        return gr.Dropdown(choices=self.choices(), value=self._shown()), self.status()

    def on_load(self) -> tuple[Any, str]:
        self.choices(rescan=True)
        return self.model_view()

    def follow_model(self, shown_status: Optional[str]) -> tuple[Any, Any]:
        """On the page's timer: show a model change made from another session (nothing sent if none)."""
        if shown_status == self.status():
            return gr.skip(), gr.skip()
        return self.model_view()

    def refresh(self) -> Any:
        return gr.Dropdown(choices=self.choices(rescan=True))

    def switch_model(self, name: Optional[str],
                     progress: gr.Progress = gr.Progress(track_tqdm=True)) -> tuple[Any, str]:
        """Load the picked model for every session, showing progress; the old model's replies still running
        end with a note once it is let go.

        A failure is shown as a warning, and the picker and status line go back to the model that is loaded.
        """
        if name:
            try:
                self.holder.load(name, progress=lambda fraction, text: progress(fraction, desc=text))
            except (OSError, ValueError) as e:
                log.warning("could not load %s: %s", name, e)
                gr.Warning(f"Could not load {name}: {e}", duration=None, title="✗ Model not loaded")
        return self.model_view()
