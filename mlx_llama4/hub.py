"""Resolve a model reference (a local folder or a Hugging Face Hub repo id) to a local folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

# What a Llama 4 checkpoint needs; original Meta weights (consolidated.*.pth) and other formats are skipped.
MODEL_FILES = ("*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.md")

# The bundled demonstration model (a tiny Llama 4 trained on synthetic shapes; see training/train_demo.py).
DEMO_NAME = "demo"
DEMO_PATH = Path(__file__).resolve().parent / "demo"


def resolve_model_path(
    path_or_repo: str | Path, revision: Optional[str] = None, allow_patterns: Sequence[str] = MODEL_FILES
) -> Path:
    """A local folder as is; ``"demo"`` the bundled demo model (unless a folder of that name exists); otherwise
    download (or find in the shared HF cache) the Hub repo's needed files.

    ``huggingface_hub`` honours ``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_ENDPOINT`` and shows a progress bar.
    """
    if not str(path_or_repo).strip():
        raise ValueError("no model given (an empty name): pass a checkpoint folder, a Hub repo id or 'demo'")
    local = Path(path_or_repo).expanduser()
    if local.is_dir():
        return local
    if str(path_or_repo) == DEMO_NAME:
        if not (DEMO_PATH / "config.json").is_file():
            raise FileNotFoundError(f"the bundled demo model is missing from {DEMO_PATH} (a broken install?)")
        return DEMO_PATH
    if local.exists():
        raise NotADirectoryError(f"{local} is a file; give a checkpoint folder or a Hub repo id")
    repo = str(path_or_repo)
    if repo.count("/") != 1 or repo.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{repo}: no such folder, and not a Hub repo id of the form 'owner/name'")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=list(allow_patterns)))
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: catch it first
        raise PermissionError(
            f"{repo} is a gated repo on the Hugging Face Hub: accept its license on {constants.ENDPOINT}/{repo} "
            "(logged in), then, once access is granted, log in here with `hf auth login` (or `huggingface-cli "
            "login`) or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{repo}: not found on the Hugging Face Hub (if it is private, log in with `hf auth login` or set "
            "HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{repo}: the Hub repo has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{repo}: not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1); download it first or give a local folder"
        ) from None
