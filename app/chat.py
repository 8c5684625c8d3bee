"""Per-session chat state, image checks, and a reply streamed from the batching engine.

``stream_reply`` turns a conversation (``Turn``s from ``history.normalize_history``) into an async stream of
``ReplyUpdate``s: "Reading the prompt…" (with the positions read so far) until the first token, the growing
reply, and finally the statistics. Before anything is submitted, the conversation's files are checked and its
size is checked against the context and the memory (``documents.check_fits``). With tools offered, a reply
that calls them runs them (``tools.run_tool``) and the model answers again.
A reply is one request to the loaded model's engine (``mlx_llama4.engine``), generated in one batch with the
other sessions' replies; closing the stream (Stop, Clear, a closed tab) cancels the request, and the engine
frees its row at its next step. The engine's prefix cache, shared by all sessions, lets a follow-up turn
reuse what the conversation's previous turns computed.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Sequence

import anyio
from PIL import Image

from mlx_llama4.demo_tools import TOOLS
from mlx_llama4.engine import EngineFull, Event, Handle
from mlx_llama4.images import DEFAULT_MAX_PIXELS as LIBRARY_MAX_PIXELS
from mlx_llama4.images import ImageError, load_image
from mlx_llama4.tool_calls import ToolCallParser

from .device import LoadedModel, ModelHolder, free_memory
from .documents import DOCUMENT_KINDS, check_document, check_fits, count_tokens, document_tokens
from .history import Turn, to_model_messages
from .tools import ToolUse, run_tool
from .uploads import is_uploaded, upload_dirs

DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # a 40-megapixel photo; Llama 4 sees at most 16 tiles of 336 px anyway
# --max-image-pixels can go up to the processor's own decompression-bomb limit, which stays in force.
MAX_IMAGE_PIXELS_LIMIT = LIBRARY_MAX_PIXELS
READING = "Reading the prompt…"
BUSY = "The model is busy: every place in its batch and its queue is taken. Try again in a moment."
HEARTBEAT = 0.5  # seconds: how often a waiting reply checks in, so that a closed tab is noticed
MAX_TOOL_ROUNDS = 3  # tool calls answered in one turn; a reply that calls again is cut short
TOOLS_NEED_TEXT_FIRST = ("With tools on, the conversation's first message must be text alone: the chat template "
                         "writes the tools in front of it. Send the image in a later message, or turn the tools off.")


@dataclass
class Settings:
    """What the user chose in the sidebar."""

    system: str = ""
    temperature: float = 0.6
    top_p: float = 0.9
    max_tokens: int = 512
    tools: tuple[str, ...] = ()  # names of the demo tools offered (mlx_llama4.demo_tools)


@dataclass
class ReplyUpdate:
    """One step of a reply: the text so far, a status while the prompt is read, the final stats, an error
    (a reply that failed; with no text, one that never began), or why a reply was cut short; and the tools
    the model called so far in this turn."""

    text: str = ""
    status: Optional[str] = None
    stats: Optional[dict] = None
    error: Optional[str] = None
    stopped: Optional[str] = None
    tools: list[ToolUse] = field(default_factory=list)


class ChatSession:
    """One browser tab's (or API client's) state: for the API its history, and for the page what one event
    leaves to the next (a message that was not sent, a Clear during a reply). Kept in a ``gr.State``."""

    def __init__(self) -> None:
        self.api_history: list[dict] = []
        self.unsent: Optional[dict] = None  # a message whose reply failed before it began, for the textbox
        self.cleared = False  # Clear was pressed since the last message was sent

    def __deepcopy__(self, memo: dict) -> "ChatSession":  # gr.State copies its initial value per session
        return ChatSession()

    def reset(self) -> None:
        self.api_history = []


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
        return f"{name}: not a recognised image file, nor a document this app reads ({DOCUMENT_KINDS})"
    return None


def check_images(images: Sequence[Any], allowed_dirs: Sequence[Path], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 decode: bool = True) -> list[str]:
    """The problems of ``images`` (see ``check_image``), one message each."""
    return [e for e in (check_image(i, allowed_dirs, max_pixels, decode) for i in images) if e]


def format_stats(stats: dict) -> str:
    """The line shown under a reply: which model wrote it, and how fast."""
    model = stats.get("model")
    line = f"{Path(model).name or model} · " if model else ""
    line += "".join(f"{name} {tokens:,} tok · " for name, tokens in stats.get("documents") or ())
    cached = f" ({stats['cached_tokens']} cached)" if stats.get("cached_tokens") else ""
    line += (f"first token {stats['time_to_first_token']:.2f} s · prompt {stats['prompt_tokens']} tok{cached} · "
             f"reply {stats['generation_tokens']} tok at {stats['generation_tps']:.1f} tok/s · "
             f"peak memory {stats['peak_memory']:.2f} GB")
    if stats.get("finish_reason") == "length":
        line += " · stopped at the token limit"
    return line


def _stats(last: Event, model: str, submitted_at: float, documents: Sequence[tuple[str, int]] = ()) -> dict:
    """The final event's counts, with the reply's speed after its first token and the process's peak memory."""
    import mlx.core as mx

    elapsed = time.perf_counter() - submitted_at - (last.time_to_first_token or 0.0)
    return dict(prompt_tokens=last.prompt_tokens, cached_tokens=last.cached_tokens,
                generation_tokens=last.completion_tokens,
                generation_tps=(last.completion_tokens - 1) / elapsed if elapsed > 0 else 0.0,
                time_to_first_token=last.time_to_first_token, peak_memory=mx.get_peak_memory() / 1e9,
                finish_reason=last.finish_reason, model=model, documents=list(documents))


async def _events(handle: Handle) -> AsyncIterator[list[Event]]:
    """``handle``'s events in batches (all that arrived since the last batch, so that a slow browser gets
    fewer, larger updates), and an empty batch whenever ``HEARTBEAT`` seconds pass without one.

    A thread of its own waits on the handle, so a waiting reply holds none of Gradio's worker threads.
    """
    loop = asyncio.get_running_loop()
    arrived: asyncio.Queue[Event] = asyncio.Queue()

    def pump() -> None:
        for event in handle:
            try:
                loop.call_soon_threadsafe(arrived.put_nowait, event)
            except RuntimeError:  # the event loop has closed (the server stopped): nobody is listening
                handle.cancel()

    threading.Thread(target=pump, name="reply-events", daemon=True).start()
    while True:
        try:
            batch = [await asyncio.wait_for(arrived.get(), HEARTBEAT)]
        except asyncio.TimeoutError:
            yield []
            continue
        while not arrived.empty():
            batch.append(arrived.get_nowait())
        yield batch
        if batch[-1].finish_reason is not None:
            return


def _prepare(loaded: LoadedModel, turns: list[Turn], settings: Settings, allowed_dirs: Sequence[Path],
             max_pixels: int) -> tuple[list[dict], list[tuple[str, int]]]:
    """The conversation's messages for the model, once its images and documents are checked and it is known to
    fit (``documents.check_fits``), and the token count of each document of its last turn (blocking: the
    documents are read and counted here). ValueError says what the user can fix."""
    images = [image for turn in turns for image in turn.images]
    documents = [d for turn in turns for d in turn.documents]
    # Where the files come from and how large the images are; decoding problems surface from the processor.
    problems = check_images(images, allowed_dirs, max_pixels, decode=False)
    problems += [p for p in (check_document(d, allowed_dirs) for d in documents) if p]
    if problems:
        raise ValueError("\n".join(problems))
    if settings.tools and turns and turns[0].images:
        raise ValueError(TOOLS_NEED_TEXT_FIRST)
    messages = to_model_messages(turns, settings.system)
    tokenizer = loaded.processor.tokenizer
    counts = {d: document_tokens(tokenizer, d) for d in documents}
    texts = [settings.system] + [turn.text for turn in turns]  # the messages' text but for their documents
    prompt_tokens = sum(counts[d] for d in documents) + count_tokens(tokenizer, "\n".join(t for t in texts if t))
    embed = loaded.model.language_model.model.embed_tokens
    problem = check_fits(prompt_tokens, int(settings.max_tokens), loaded.model.config.text,
                         loaded.engine.kv_bits, loaded.engine.kv_group_size,
                         getattr(embed, "scales", embed.weight).dtype.size, free_memory())
    if problem:
        raise ValueError(problem)
    last = turns[-1].documents if turns else []
    return messages, [(os.path.basename(d), counts[d]) for d in last]


def _submit(loaded: LoadedModel, messages: list[dict], settings: Settings) -> tuple[Handle, float]:
    """Hand the conversation to the engine (blocking: the prompt is tokenized and its images read here); the
    handle and when the engine took it. ValueError says what the user can fix, EngineFull that the engine has
    no room, RuntimeError that it is closed."""
    tools = [TOOLS[name] for name in settings.tools] or None
    try:
        handle = loaded.engine.submit(messages, tools=tools, max_tokens=int(settings.max_tokens),
                                      temperature=float(settings.temperature), top_p=float(settings.top_p))
        return handle, time.perf_counter()
    except ValueError as e:  # ImageError, ProcessorError, a prompt longer than the context
        message = str(e)
        images = [part["image"] for m in messages if isinstance(m.get("content"), list) for part in m["content"]
                  if isinstance(part.get("image"), (str, Path))]
        for image in images:  # name uploads by their file names, not by where the server keeps them
            message = message.replace(str(image), os.path.basename(str(image)))
        raise ValueError(message) from None


def reading_status(progress: tuple[int, int], documents: Sequence[tuple[str, int]] = ()) -> str:
    """The note while the prompt is read: its documents' sizes, and how far the engine has read it."""
    sizes = ", ".join(f"{name}: {tokens:,} tokens" for name, tokens in documents)
    done, total = progress
    status = f"{READING[:-1]} ({sizes})…" if sizes else READING
    return f"{status} {done:,} / {total:,} tokens" if total else status


async def stream_reply(holder: ModelHolder, turns: list[Turn], settings: Settings,
                       allowed_dirs: Optional[Sequence[Path]] = None,
                       max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> AsyncIterator[ReplyUpdate]:
    """The assistant's reply to ``turns`` (which end with a user turn), streamed.

    With ``settings.tools``, a reply that calls them is not shown as text: the calls run (``tools.run_tool``),
    the call and its result join the messages (an assistant message with ``tool_calls``, then a ``tool``
    message each, as the chat template reads them) and the model answers again, at most ``MAX_TOOL_ROUNDS``
    times; every update carries the calls made so far.
    Problems the user can fix (a bad, oversized or foreign file, a conversation longer than the context or
    the memory, no model loaded, an engine with no room) end the stream with ``error`` set; nothing is raised
    for them. A reply whose model is switched away ends with ``stopped`` set (or ``error``, if it had not begun).
    """
    loaded = holder.current
    if loaded is None:
        yield ReplyUpdate(error="No model is loaded; pick one in the model list.")
        return
    yield ReplyUpdate(status=READING)
    allowed = upload_dirs() if allowed_dirs is None else allowed_dirs
    try:
        messages, documents = await anyio.to_thread.run_sync(
            lambda: _prepare(loaded, turns, settings, allowed, max_pixels))
    except ValueError as e:
        yield ReplyUpdate(error=str(e))
        return
    used: list[ToolUse] = []
    for round_ in range(MAX_TOOL_ROUNDS + 1):
        parser = ToolCallParser(settings.tools) if settings.tools else None
        calls = []
        async for update in _reply(loaded, holder, messages, settings, parser, () if used else documents):
            update.tools = list(used)
            if update.stats and parser and parser.tool_calls:
                calls = parser.tool_calls  # the reply was calls: run them instead of showing it
            else:
                yield update
        if not calls:
            return
        if round_ == MAX_TOOL_ROUNDS:
            yield ReplyUpdate(tools=list(used), stopped=f"The model called tools {MAX_TOOL_ROUNDS + 1} times in a "
                                                        "row; its last calls were not run.")
            return
        arguments = [json.loads(call.arguments) for call in calls]
        messages = messages + [{"role": "assistant", "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": args}}
            for call, args in zip(calls, arguments)]}]
        for call, args in zip(calls, arguments):
            used.append(run_tool(call.name, args, allowed[0]))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": used[-1].result})
        yield ReplyUpdate(status=READING, tools=list(used))


async def _reply(loaded: LoadedModel, holder: ModelHolder, messages: list[dict], settings: Settings,
                 parser: Optional[ToolCallParser], documents: Sequence[tuple[str, int]]) -> AsyncIterator[ReplyUpdate]:
    """One request's reply to ``messages``, streamed; with a ``parser``, only its content (not its calls) is
    shown, and the parser holds the calls when the final update (with ``stats``) comes."""
    submitted: list[tuple[Handle, float]] = []  # filled in a worker thread: a Stop during submit finds it too
    finished = False
    try:
        try:
            await anyio.to_thread.run_sync(lambda: submitted.append(_submit(loaded, messages, settings)))
        except EngineFull:
            yield ReplyUpdate(error=BUSY)
            return
        except ValueError as e:
            yield ReplyUpdate(error=str(e))
            return
        except RuntimeError:  # the engine closed meanwhile: its model was switched away
            yield ReplyUpdate(error=_switched(loaded, holder))
            return
        handle, submitted_at = submitted[0]
        text, started = "", False
        async for batch in _events(handle):
            new = "".join(event.text for event in batch)
            if parser is None:
                text += new
            else:
                parser.feed(new)
            started = started or any(event.token is not None for event in batch)
            last = batch[-1] if batch else None
            if last is None or last.finish_reason is None:
                status = None if started else reading_status(handle.progress, documents)
                yield ReplyUpdate(text=parser.content if parser else text, status=status)
                continue
            finished = True
            if parser is not None:
                parser.finish()
                text = parser.content
            if last.finish_reason == "error":
                yield ReplyUpdate(text=text, error=f"Generation failed: {last.error}")
            elif last.finish_reason == "cancelled" and text:  # not by this stream: the engine was closed
                yield ReplyUpdate(text=text, stopped=_switched(loaded, holder))
            elif last.finish_reason == "cancelled":
                yield ReplyUpdate(error=_switched(loaded, holder))
            else:
                yield ReplyUpdate(text=text, stats=_stats(last, loaded.name, submitted_at, documents))
    finally:
        if submitted and not finished:
            submitted[0][0].cancel()  # Stop, Clear or a closed tab: the engine frees the row at its next step


def _switched(loaded: LoadedModel, holder: ModelHolder) -> str:
    """Why a reply of ``loaded`` was cut: its engine closed, as the process switched to another model."""
    now = holder.loading or (holder.current.name if holder.current else None)
    return f"The model was switched to {now or 'another one'} before this reply was finished."
