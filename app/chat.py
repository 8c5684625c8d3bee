"""Per-session chat state, image checks and the generation worker behind both the web UI and the API.

``stream_reply`` turns a conversation (``Turn``s from ``history.normalize_history``) into a stream of
``ReplyUpdate``s: prefill progress, the growing reply, and finally the statistics. The MLX work runs on
the device thread (``device.DeviceWorker``); closing the stream stops it after the current step, and a
prefill in progress is abandoned at its next progress report.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from PIL import Image

from mlx_llama4 import PromptCache, stream_generate
from mlx_llama4.images import DEFAULT_MAX_PIXELS as LIBRARY_MAX_PIXELS
from mlx_llama4.images import ImageError, load_image

from .device import LoadedModel, ModelHolder, Stopped
from .history import Turn, to_model_messages

DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # a 40-megapixel photo; Llama 4 sees at most 16 tiles of 336 px anyway
# --max-image-pixels can go up to the processor's own decompression-bomb limit, which stays in force.
MAX_IMAGE_PIXELS_LIMIT = LIBRARY_MAX_PIXELS
PREFILL_STEP = 512  # tokens per prefill step: how soon Stop takes effect while a long prompt is read


@dataclass
class Settings:
    """What the user chose in the sidebar."""

    system: str = ""
    temperature: float = 0.6
    top_p: float = 0.9
    max_tokens: int = 512


@dataclass
class ReplyUpdate:
    """One step of a reply: the text so far, a status while the prompt is read, the final stats or an error."""

    text: str = ""
    status: Optional[str] = None
    stats: Optional[dict] = None
    error: Optional[str] = None


MAX_CACHED_SESSIONS = 4  # prompt caches kept at once (the least recently used session rebuilds its own)
_SESSIONS: "weakref.WeakSet[ChatSession]" = weakref.WeakSet()
_RECENT: "OrderedDict[int, weakref.ref]" = OrderedDict()


class ChatSession:
    """One browser tab's (or API client's) state: its prompt cache, for the API its history, and for the page
    what one event leaves to the next (a message that was not sent, a Clear during a reply).

    Kept in a ``gr.State``; the cache belongs to one loaded model and is rebuilt when the model changes,
    and only the ``MAX_CACHED_SESSIONS`` most recently active sessions keep theirs.
    """

    def __init__(self) -> None:
        self.cache: Optional[PromptCache] = None
        self.cache_generation = -1
        self.api_history: list[dict] = []
        self.unsent: Optional[dict] = None  # a message whose reply failed before it began, for the textbox
        self.cleared = False  # Clear was pressed since the last message was sent
        _SESSIONS.add(self)

    def __deepcopy__(self, memo: dict) -> "ChatSession":  # gr.State copies its initial value per session
        return ChatSession()

    def reset(self) -> None:
        self.cache, self.cache_generation, self.api_history = None, -1, []

    def prompt_cache(self, loaded: LoadedModel) -> PromptCache:
        """This session's cache for ``loaded`` (called on the device thread)."""
        if self.cache is None or self.cache_generation != loaded.generation:
            self.cache, self.cache_generation = PromptCache(loaded.model), loaded.generation
        _RECENT.pop(id(self), None)
        _RECENT[id(self)] = weakref.ref(self)
        while len(_RECENT) > MAX_CACHED_SESSIONS:  # bound the memory that idle conversations hold
            _, ref = _RECENT.popitem(last=False)
            session = ref()
            if session is not None:
                session.cache, session.cache_generation = None, -1
        return self.cache


def release_all_caches() -> None:
    """Drop every session's prompt cache (they refer to the model being unloaded)."""
    for session in list(_SESSIONS):
        session.cache, session.cache_generation = None, -1


def upload_dirs() -> list[Path]:
    """Where Gradio keeps uploaded files: the only places images may be read from."""
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


def check_image(image: Any, allowed_dirs: Sequence[Path], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                decode: bool = True) -> Optional[str]:
    """Why ``image`` cannot be used (not an uploaded file, unreadable, too large), or None if it can.

    The size is read from the header first; ``decode=False`` reads nothing more, for images already checked once.
    """
    if not isinstance(image, (str, Path)):
        return None  # an in-memory image handed over by Python code
    name = os.path.basename(str(image)) or str(image)
    if not is_uploaded(str(image), allowed_dirs):
        return f"{name}: only images uploaded to this app can be used"
    path = Path(image).resolve()
    if not path.is_file():
        return f"{name}: the uploaded file is gone; attach it again"
    try:
        with Image.open(path) as header:
            width, height = header.size
        if width * height > max_pixels:
            return (f"{name}: image is {width}x{height}, above this app's limit of {max_pixels:,} pixels "
                    "(--max-image-pixels)")
        if decode:
            load_image(str(path), max_pixels=max_pixels).close()
    except ImageError as e:
        return str(e).replace(str(path), name)
    except (OSError, ValueError, Image.DecompressionBombError):
        return f"{name}: not a recognised image file"
    return None


def check_images(images: Sequence[Any], allowed_dirs: Sequence[Path], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 decode: bool = True) -> list[str]:
    """The problems of ``images`` (see ``check_image``), one message each."""
    return [e for e in (check_image(i, allowed_dirs, max_pixels, decode) for i in images) if e]


def format_stats(stats: dict) -> str:
    """The line shown under a reply: which model wrote it, and how fast."""
    model = stats.get("model")
    line = f"{Path(model).name or model} · " if model else ""
    line += (f"first token {stats['time_to_first_token']:.2f} s · prompt {stats['prompt_tokens']} tok at "
             f"{stats['prompt_tps']:.1f} tok/s · reply {stats['generation_tokens']} tok at "
             f"{stats['generation_tps']:.1f} tok/s · peak memory {stats['peak_memory']:.2f} GB")
    if stats.get("finish_reason") == "length":
        line += " · stopped at the token limit"
    return line


@dataclass
class _Prefill:
    done: int = 0
    total: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def __call__(self, done: int, total: int) -> None:  # runs on the device thread, inside the prefill
        if self.stop.is_set():
            raise Stopped
        self.done, self.total = done, total


def stream_reply(holder: ModelHolder, session: ChatSession, turns: list[Turn], settings: Settings,
                 allowed_dirs: Optional[Sequence[Path]] = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 kv_bits: Optional[int] = None, kv_group_size: Optional[int] = None) -> Iterator[ReplyUpdate]:
    """The assistant's reply to ``turns`` (which end with a user turn), streamed.

    Problems the user can fix (a bad, oversized or foreign image, a conversation longer than the context,
    no model loaded) end the stream with ``error`` set; nothing is raised for them. ``kv_bits`` quantizes
    the KV cache (``kv_group_size`` None: the library picks one the head size allows).
    """
    loaded = holder.current
    if loaded is None:
        yield ReplyUpdate(error="No model is loaded; pick one in the model list.")
        return
    images = [image for turn in turns for image in turn.images]
    # Where the images come from and how large they are; decoding problems surface from the processor.
    problems = check_images(images, upload_dirs() if allowed_dirs is None else allowed_dirs, max_pixels,
                            decode=False)
    if problems:
        yield ReplyUpdate(error="\n".join(problems))
        return
    messages = to_model_messages(turns, settings.system)
    prefill = _Prefill()

    def generate():
        return stream_generate(
            loaded.model, loaded.processor, messages, max_tokens=int(settings.max_tokens),
            temperature=float(settings.temperature), top_p=float(settings.top_p),
            kv_bits=kv_bits, kv_group_size=kv_group_size, prompt_cache=session.prompt_cache(loaded),
            prefill_step_size=PREFILL_STEP, progress=prefill)

    text, last = "", None
    yield ReplyUpdate(status="Reading the prompt…")
    batches = holder.worker.stream(generate, prefill.stop)
    try:
        for batch in batches:
            if not batch:  # a heartbeat: yield anyway, so that a Stop can close this generator now
                if last is None and prefill.total:
                    yield ReplyUpdate(status=f"Reading the prompt… {100 * prefill.done // prefill.total}%")
                else:
                    yield ReplyUpdate(text=text, status=None if last else "Reading the prompt…")
                continue
            last = batch[-1]
            text += "".join(chunk.text for chunk in batch)
            yield ReplyUpdate(text=text)
    except ValueError as e:  # ImageError, ProcessorError, a prompt longer than the context
        message = str(e)
        for image in images:  # name uploads by their file names, not by where the server keeps them
            if isinstance(image, (str, Path)):
                message = message.replace(str(image), os.path.basename(str(image)))
        yield ReplyUpdate(text=text, error=message)
        return
    finally:
        batches.close()  # on Stop: the device side stops after its current step
    if last is not None:
        stats = {k: getattr(last, k) for k in ("prompt_tokens", "prompt_tps", "generation_tokens", "generation_tps",
                                                "time_to_first_token", "peak_memory", "finish_reason")}
        stats["model"] = loaded.name
        yield ReplyUpdate(text=text, stats=stats)

