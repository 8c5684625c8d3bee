"""Hugging Face Hub: download only the files a conversion needs, upload the result."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

from mlx_llama4.hub import resolve_model_path
from mlx_llama4.safetensors_reader import INDEX_FILE, read_index

from .side_files import FETCHED

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
META_FILES = ("config.json", INDEX_FILE) + FETCHED


def fetch(hf_path: str, revision: Optional[str] = None, verbose: bool = True) -> tuple[Path, bool]:
    """``(local folder, came from the Hub)`` for a local checkpoint folder or a Hub repo id.

    From the Hub, in two steps through ``huggingface_hub`` (which resumes interrupted transfers and reuses its
    cache): first config, index, tokenizer and processor files; then exactly the weight shards the index names
    (``model.safetensors`` when there is no index). Other files in the repo (Meta's original ``.pth`` weights,
    images, ...) are never downloaded.
    """
    local = Path(hf_path).expanduser()
    if local.is_dir():
        if revision:
            print(f"[mlx-llama4 convert] note: --revision is ignored for the local folder {local}", file=sys.stderr)
        return local, False
    meta = resolve_model_path(hf_path, revision, allow_patterns=META_FILES)
    # Pin the second step to the commit the first one resolved, so both see the same files.
    pinned = meta.name if _COMMIT.match(meta.name) else revision
    index = meta / INDEX_FILE
    if index.exists():
        shards = sorted(set(read_index(index).values()))
    else:
        shards = ["model.safetensors"]
    path = resolve_model_path(hf_path, pinned, allow_patterns=META_FILES + tuple(shards))
    if not index.exists() and not (path / "model.safetensors").exists():
        path = resolve_model_path(hf_path, pinned, allow_patterns=META_FILES + ("*.safetensors",))
    return path, True


def upload(path: Path, repo_id: str, verbose: bool = True) -> None:
    """Create ``repo_id`` (if needed) and upload the folder: ``upload_large_folder`` (resumable, parallel,
    several commits) where ``huggingface_hub`` has it; from version 2 on, ``upload_folder`` took over that role
    (resumable and batched through hf_xet) and ``upload_large_folder`` is gone."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id=repo_id, repo_type="model", exist_ok=True)
    if hasattr(api, "upload_large_folder"):
        api.upload_large_folder(repo_id=repo_id, folder_path=str(path), repo_type="model")
    else:
        api.upload_folder(repo_id=repo_id, folder_path=str(path), repo_type="model",
                          commit_message="Upload MLX checkpoint converted with mlx-llama4")
    if verbose:
        print(f"[mlx-llama4 convert] uploaded {path} to https://huggingface.co/{repo_id}", file=sys.stderr)
