"""Chat history in, model messages out: the one place that reads history, whatever shape it arrives in.

The browser sends the Chatbot's value in Gradio's normalised form (every ``content`` a list of
``{"type": "text"|"file"|"component", ...}`` parts); handlers and ``gradio_client`` callers produce the
looser ``MessageDict`` form (``content`` a string, a ``{"path": ...}`` file dict, a component, or a list of
these), ``ChatMessage`` objects, or Hugging Face parts (``{"type": "image", "image": ...}``). All of them
become ``Turn``s here. Messages with a ``metadata`` title are the app's own notes (stats lines, errors)
and are never part of the prompt; consecutive messages of one role are one turn (Gradio shows each
attached file as its own message in some paths). A user turn's files are images, or documents by their suffix
(``documents.is_document``); a document's text joins the turn's text for the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from PIL import Image

from .documents import document_block, is_document

CHAT_ROLES = ("user", "assistant")


@dataclass
class Turn:
    """One user or assistant turn: its text and, for the user, its images (file paths or PIL images) and
    documents (file paths)."""

    role: str
    text: str = ""
    images: list[Any] = field(default_factory=list)
    documents: list[str] = field(default_factory=list)


def _fields(message: Any) -> tuple[Optional[str], Any, Any]:
    if isinstance(message, dict):
        return message.get("role"), message.get("content"), message.get("metadata")
    return getattr(message, "role", None), getattr(message, "content", None), getattr(message, "metadata", None)


def is_note(message: Any) -> bool:
    """A message the app added for the reader only (stats line, error): it carries a metadata title."""
    metadata = _fields(message)[2]
    if metadata is None:
        return False
    title = metadata.get("title") if isinstance(metadata, dict) else getattr(metadata, "title", None)
    return bool(title)


def _file_path(value: Any) -> Optional[str]:
    """The path of a file given as a path, a FileData-like dict/object or a Gradio component."""
    if isinstance(value, (str, Path)):
        return str(value)
    if isinstance(value, dict):
        for key in ("path", "url"):
            if isinstance(value.get(key), str) and value[key]:
                return value[key]
        return None
    path = getattr(value, "path", None)
    if isinstance(path, str):
        return path
    inner = getattr(value, "value", None)  # a gradio component such as gr.Image(...)
    return _file_path(inner) if inner is not None and inner is not value else None


def _read(content: Any, texts: list[str], images: list[Any]) -> None:
    if content is None:
        return
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, Image.Image):
        images.append(content)
    elif isinstance(content, tuple) and content and isinstance(content[0], (str, Path)):
        _add_file(content[0], images)  # the legacy "tuples" format: (path,) or (path, alt text)
    elif isinstance(content, (list, tuple)):
        for part in content:
            _read(part, texts, images)
    elif isinstance(content, dict):
        kind = content.get("type")
        if kind == "text" or (kind is None and "text" in content and "path" not in content):
            texts.append(str(content.get("text") or ""))
        elif kind == "file" or (kind is None and "file" in content):
            _add_file(content.get("file"), images)
        elif kind in ("image", "image_url"):
            source = content.get("image", content.get("image_url", content.get("url", content.get("path"))))
            if isinstance(source, Image.Image):
                images.append(source)
            else:
                _add_file(source, images)
        elif kind == "component":
            if content.get("component") == "image":
                _add_file(content.get("value"), images)
        else:
            _add_file(content, images)
    else:
        _add_file(content, images)


def _add_file(value: Any, images: list[Any]) -> None:
    path = _file_path(value)
    if path:
        images.append(path)


def normalize_history(history: Optional[Iterable[Any]]) -> list[Turn]:
    """Turns of a chat history in any of the shapes above; notes and system messages are dropped."""
    turns: list[Turn] = []
    for message in history or []:
        if isinstance(message, (list, tuple)) and len(message) == 2:  # a legacy [user, assistant] pair
            pairs = [{"role": "user", "content": message[0]}, {"role": "assistant", "content": message[1]}]
            turns.extend(t for t in normalize_history(p for p in pairs if p["content"] is not None))
            continue
        role, content, _ = _fields(message)
        if role not in CHAT_ROLES or is_note(message):
            continue
        texts: list[str] = []
        files: list[Any] = []
        _read(content, texts, files)
        if role != "user":
            files = []
        turns.append(Turn(role, "\n".join(t for t in texts if t), [f for f in files if not is_document(f)],
                          [str(f) for f in files if is_document(f)]))
    return _merge(turns)


def _merge(turns: list[Turn]) -> list[Turn]:
    merged: list[Turn] = []
    for turn in turns:
        if merged and merged[-1].role == turn.role:
            merged[-1].text = "\n".join(t for t in (merged[-1].text, turn.text) if t)
            merged[-1].images.extend(turn.images)
            merged[-1].documents.extend(turn.documents)
        else:
            merged.append(turn)
    return merged


def to_model_messages(turns: list[Turn], system: str = "") -> list[dict]:
    """Hugging Face chat messages for the engine: each user turn's images inline, before its text, and its
    documents' text ahead of its own (a turn without images is a string: the chat template writes a tool list
    in front of the first user turn only if it is one). ValueError names a document that cannot be read."""
    messages: list[dict] = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    for turn in turns:
        if turn.role == "user":
            text = "\n\n".join([document_block(d) for d in turn.documents] + ([turn.text] if turn.text else []))
            parts = [{"type": "image", "image": image} for image in turn.images]
            messages.append({"role": "user", "content": parts + [{"type": "text", "text": text}] if parts else text})
        else:
            messages.append({"role": "assistant", "content": turn.text})
    return messages


def last_user_span(history: list[Any]) -> Optional[tuple[int, int]]:
    """``(start, end)`` of the last run of user messages (the last user turn), or None without one."""
    is_user = [_fields(m)[0] == "user" and not is_note(m) for m in history]
    end = next((i + 1 for i in range(len(history) - 1, -1, -1) if is_user[i]), None)
    if end is None:
        return None
    start = end - 1
    while start > 0 and is_user[start - 1]:
        start -= 1
    return start, end


def ends_with_user_turn(history: list[Any]) -> bool:
    """Whether the last message that is not a note is the user's (a reply is due)."""
    for message in reversed(history or []):
        if is_note(message):
            return False
        role = _fields(message)[0]
        if role in CHAT_ROLES:
            return role == "user"
    return False
