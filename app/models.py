"""Which models the picker offers: the bundled demo, Llama 4 folders on disk and in the Hugging Face cache.

Only local folders are listed (nothing is fetched to build the list); a Hub cache entry is offered as its
snapshot folder, so that choosing it works offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

DEMO = "demo"
LLAMA4_TYPES = ("llama4", "llama4_text")


def is_llama4_folder(path: Path) -> bool:
    """A folder with a Llama 4 ``config.json`` and safetensors weights (Hugging Face or MLX format)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    types = {config.get("model_type"), (config.get("text_config") or {}).get("model_type")}
    if not types & set(LLAMA4_TYPES):
        return False
    return (path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors"))


def local_folders(search_dirs: Iterable[Path], depth: int = 2) -> list[Path]:
    """Llama 4 folders in ``search_dirs`` and below them, at most ``depth`` levels down (hidden ones skipped)."""
    found: list[Path] = []
    seen: set[Path] = set()

    def visit(folder: Path, level: int) -> None:
        try:
            folder = folder.resolve()
        except OSError:
            return
        if folder in seen or not folder.is_dir():
            return
        seen.add(folder)
        if is_llama4_folder(folder):
            found.append(folder)
            return
        if level >= depth:
            return
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children[:500]:
            visit(child, level + 1)

    for d in search_dirs:
        visit(Path(d).expanduser(), 0)
    return found


def hf_cache_models() -> list[tuple[str, Path]]:
    """``(repo id, snapshot folder)`` of the Llama 4 models in the Hugging Face cache (newest snapshot)."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:  # no cache yet, or an unreadable one: nothing to offer
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        for revision in revisions:
            if is_llama4_folder(Path(revision.snapshot_path)):
                out.append((repo.repo_id, Path(revision.snapshot_path)))
                break
    return out


def _label(path: Path) -> str:
    home = Path.home()
    try:
        return "~/" + str(path.relative_to(home))
    except ValueError:
        return str(path)


def discover_models(search_dirs: Sequence[Path] = (), current: Optional[str] = None,
                    include_hf_cache: bool = True) -> list[tuple[str, str]]:
    """Picker choices as ``(label, value)``: the demo model, then local folders, then the HF cache.

    ``current`` (the loaded model's name) is always listed, so the picker can show it.
    """
    choices: list[tuple[str, str]] = [("demo (bundled, offline)", DEMO)]
    choices += [(f"{_label(p)}", str(p)) for p in local_folders(search_dirs)]
    if include_hf_cache:
        choices += [(f"{repo} (Hugging Face cache)", str(path)) for repo, path in hf_cache_models()]
    return with_current(choices, current)


def with_current(choices: list[tuple[str, str]], current: Optional[str]) -> list[tuple[str, str]]:
    """``choices`` with ``current`` listed (second, after the demo model) if it is not already."""
    if current and current not in {v for _, v in choices}:
        return choices[:1] + [(current, current)] + choices[1:]
    return choices
