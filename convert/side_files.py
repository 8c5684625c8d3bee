"""The files next to the weights: run-time files and license files copied as they are, and the model card.

A converted checkpoint keeps the source's license: its ``LICENSE*``, ``USE_POLICY*`` and ``NOTICE*`` files are
copied, and the model card (``README.md``) keeps the YAML front matter of the source's card (``license``,
``license_name``, ``license_link``, the ``extra_gated_*`` fields that gate the Llama 4 repos, ``language``, ...),
with ``library_name: mlx``, our ``pipeline_tag``, ``base_model`` set to the source repo and ``mlx`` added to the
tags. mlx-lm's converter keeps a source card's metadata in the same way.
"""

from __future__ import annotations

import shutil
from fnmatch import fnmatchcase
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

# Files a Llama 4 checkpoint needs at run time.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
    "generation_config.json",
)
LICENSE_PATTERNS = ("LICENSE*", "USE_POLICY*", "NOTICE*")
CARD = "README.md"
# Everything besides config, index and weights that a conversion downloads from the Hub.
FETCHED = SIDE_FILES + LICENSE_PATTERNS + (CARD,)
# Card metadata that describes the source itself, replaced (or dropped) in ours.
_REPLACED = ("library_name", "pipeline_tag", "base_model", "base_model_relation", "tags")
OUR_TAGS = ("mlx", "llama4", "mlx-llama4")


def license_files(folder: Path) -> list[Path]:
    """The source's license files (top level, names as on the Hub: ``LICENSE``, ``USE_POLICY.md``, ...)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatchcase(p.name, x) for x in LICENSE_PATTERNS))


def copy_side_files(source: Path, dest: Path) -> list[str]:
    """Copy the run-time and license files that ``source`` has into ``dest``; returns the license file names."""
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
    licenses = license_files(source)
    for f in licenses:
        shutil.copyfile(f, dest / f.name)
    return [f.name for f in licenses]


def read_card_metadata(folder: Path) -> dict:
    """The YAML front matter of the source's model card (empty without a card or front matter).

    Raises ``ValueError`` naming the file when the front matter is not a YAML mapping.
    """
    from huggingface_hub import metadata_load

    card = folder / CARD
    if not card.is_file():
        return {}
    try:
        return metadata_load(card) or {}
    except Exception as e:  # yaml.YAMLError, ValueError
        raise ValueError(f"{card}: cannot read the model card's YAML front matter ({e})") from None


def model_card(source: str, is_hub: bool, quant_text: str, dtype_name: str, has_vision: bool,
               source_metadata: Optional[dict] = None, licenses: tuple[str, ...] = (),
               repo_id: Optional[str] = None) -> str:
    """Our ``README.md``: the source card's metadata with ours on top, and how the weights were converted."""
    from huggingface_hub import CardData

    source_metadata = source_metadata or {}
    tags = [t for t in source_metadata.get("tags") or [] if isinstance(t, str)]
    metadata = {
        "library_name": "mlx",
        "pipeline_tag": "image-text-to-text" if has_vision else "text-generation",
        "tags": tags + [t for t in OUR_TAGS if t not in tags],
        **({"base_model": source} if is_hub else {}),
        **{k: v for k, v in source_metadata.items() if k not in _REPLACED},
    }
    try:
        ver = version("mlx-llama4")
    except PackageNotFoundError:
        ver = "unknown"
    base = f"[{source}](https://huggingface.co/{source})" if is_hub else f"`{source}`"
    lines = [
        "---",
        CardData(**metadata).to_yaml(),
        "---",
        "",
        f"# {repo_id or Path(source).name}",
        "",
        f"Converted to MLX from {base} with mlx-llama4 {ver} (`mlx-llama4 convert`).",
        "",
        f"- Weights: {dtype_name}; {quant_text}.",
        "- Layout: routed experts fused gate|up as `feed_forward.experts.gate_up_proj` [experts, out, in],",
        "  quantized along the input, read with one gather-matmul. Loads with `mlx_llama4`, not with mlx-lm/mlx-vlm.",
    ]
    if licenses:
        lines.append(f"- License: the source's, unchanged ({', '.join(f'`{n}`' for n in licenses)}).")
    lines += [
        "",
        "```python",
        "from mlx_llama4 import load, generate",
        "",
        f'model, processor = load("{repo_id or "<this folder or repo>"}")',
        'print(generate(model, processor, "Describe the picture.", images=["cat.jpg"], max_tokens=200))',
        "```",
        "",
    ]
    return "\n".join(lines)
