"""Documents attached to a chat message: which files are documents, their text, and the checks before a prompt
with them is read.

A document's text goes into its user turn, ahead of the message (``document_block``); the turn is then an
ordinary prompt, and the engine's prefix cache keeps its KV, so that later questions in the conversation
reuse it instead of reading the document again. Text files must be UTF-8; a PDF's text is extracted with
pypdf, page by page. Before a prompt is read, its tokens (and the reply's) are checked against the model's
context and the KV cache they need against the memory free (``check_fits``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

from mlx_llama4.long_context import kv_cache_bytes

from .uploads import is_uploaded

TEXT_SUFFIXES = frozenset((
    ".txt", ".md", ".markdown", ".rst", ".py", ".json", ".jsonl", ".csv", ".tsv", ".yaml", ".yml", ".toml", ".ini",
    ".cfg", ".xml", ".html", ".htm", ".css", ".js", ".ts", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java",
    ".kt", ".swift", ".rb", ".sh", ".sql", ".tex", ".log"))
DOCUMENT_SUFFIXES = TEXT_SUFFIXES | {".pdf"}
DOCUMENT_KINDS = ".txt, .md, .py, .pdf, other text and code files"  # for messages
MEMORY_SHARE = 0.8  # of the memory free now, what a prompt's KV cache may take: the rest is headroom


def is_document(path: Any) -> bool:
    """Whether ``path`` (a file name or path) names a document by its suffix."""
    return isinstance(path, (str, Path)) and Path(str(path)).suffix.lower() in DOCUMENT_SUFFIXES


def read_document(path: str) -> str:
    """The text of the document at ``path``; ValueError (naming the file) if it has none that can be read."""
    return _read(*_version(path))


def _version(path: str) -> tuple[Path, int, int]:
    """(resolved path, modification time, size): what the caches below are keyed by, so an edited file is read
    and counted again. ValueError if the file is gone."""
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
    except OSError:
        raise ValueError(f"{resolved.name}: the uploaded file is gone; attach it again") from None
    return resolved, stat.st_mtime_ns, stat.st_size


@lru_cache(maxsize=8)  # a document is read again for every later question in its conversation
def _read(path: Path, mtime_ns: int, size: int) -> str:
    if path.suffix.lower() == ".pdf":
        text = _pdf_text(path)
    else:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ValueError(f"{path.name}: not a UTF-8 text file") from None
        if "\0" in text:
            raise ValueError(f"{path.name}: a binary file, not text")
    if not text.strip():
        raise ValueError(f"{path.name}: the document holds no text")
    return text


def _pdf_text(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise ValueError(f"{path.name}: the PDF is encrypted")
        return "\n\n".join(page.extract_text() or "" for page in reader.pages).strip()
    except (PdfReadError, OSError, KeyError, TypeError) as e:
        raise ValueError(f"{path.name}: not a readable PDF ({e})") from None


def document_block(path: str) -> str:
    """How a document stands in its user turn, ahead of the message: its name, then its text."""
    return f"{os.path.basename(path)}:\n\n{read_document(path).strip()}"


def check_document(path: Any, allowed_dirs: Sequence[Path]) -> Optional[str]:
    """Why the document at ``path`` cannot be used (not an uploaded file, no text), or None if it can."""
    name = os.path.basename(str(path)) or str(path)
    if not isinstance(path, (str, Path)) or not is_uploaded(str(path), allowed_dirs):
        return f"{name}: only documents uploaded to this app can be used"
    try:
        read_document(str(path))
    except ValueError as e:
        return str(e)
    return None


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def document_tokens(tokenizer: Any, path: str) -> int:
    """The tokens of ``document_block(path)``: counted once per tokenizer and version of the file, though the
    app checks and shows them before every question in the document's conversation."""
    return _document_tokens(tokenizer, str(path), *_version(path)[1:])


@lru_cache(maxsize=8)
def _document_tokens(tokenizer: Any, path: str, mtime_ns: int, size: int) -> int:
    return count_tokens(tokenizer, document_block(path))


def check_fits(prompt_tokens: int, max_tokens: int, cfg: Any, kv_bits: Optional[int], kv_group_size: Optional[int],
               float_bytes: int, free_memory: int) -> Optional[str]:
    """Why a prompt of about ``prompt_tokens`` (its text; images add a few hundred each, which the engine's own
    check counts) with a reply of up to ``max_tokens`` cannot be answered: past the context of the text config
    ``cfg``, or a KV cache (at ``kv_bits``, else ``float_bytes`` a value) larger than ``MEMORY_SHARE`` of
    ``free_memory`` bytes. None if it fits."""
    total = prompt_tokens + max_tokens
    context = cfg.max_position_embeddings
    if total > context:
        return (f"The conversation is about {prompt_tokens:,} tokens; with a reply of up to {max_tokens:,} that is "
                f"more than this model's context of {context:,} tokens. Remove a document, shorten it, or lower "
                "Max tokens.")
    need = kv_cache_bytes(cfg, total, kv_bits, kv_bits, kv_group_size or 64, float_bytes)
    if need > MEMORY_SHARE * free_memory:
        return (f"The conversation is about {prompt_tokens:,} tokens; its KV cache would need about {_size(need)}, "
                f"and only {_size(free_memory)} of memory is free. Remove a document or shorten it (or start the "
                "app with --kv-bits 8 or 4).")
    return None


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
