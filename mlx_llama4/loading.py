"""Read a checkpoint folder (config.json + single or sharded safetensors) into a ``Model``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelConfig, load_config
from .model import Model
from .weights import sanitize


class CheckpointError(ValueError):
    """A checkpoint whose files or tensors do not match its config; the message names the file or tensor."""


def default_dtype() -> Optional[mx.Dtype]:
    """float32 on MLX's CPU backend (its fast dtype; gather_mm rejects bfloat16 there), else the checkpoint's."""
    return mx.float32 if mx.default_device() == mx.cpu else None


def safetensors_files(path: Path) -> list[Path]:
    """The shards of a checkpoint: those named by ``model.safetensors.index.json``, else every ``*.safetensors``."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    return files


def read_weights(files: list[Path]) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mlx raises RuntimeError/ValueError with a bare message
            raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None
    return weights


def quantize_like_checkpoint(model: nn.Module, quantization: dict, weights: dict[str, mx.array]) -> None:
    """Swap in quantized layers wherever the checkpoint holds ``scales`` (mlx-lm's ``quantization`` block,
    with optional per-layer overrides keyed by module path)."""

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights:
            return False
        override = quantization.get(path)
        return override if isinstance(override, dict) else True

    nn.quantize(
        model,
        group_size=quantization.get("group_size", 64),
        bits=quantization.get("bits", 4),
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def check_weights(model: nn.Module, weights: dict[str, mx.array], source: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mis_shaped = [
        f"{k}: checkpoint {tuple(weights[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
        if items:
            shown = "\n  ".join(items[:20]) + (f"\n  ... and {len(items) - 20} more" if len(items) > 20 else "")
            problems.append(f"{len(items)} {title} tensor(s):\n  {shown}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match its config.json:\n" + "\n".join(problems))


def load_model(path: str | Path, dtype: Optional[mx.Dtype] = None) -> Model:
    """Build the model described by ``path/config.json`` and load its weights.

    ``dtype`` casts floating-point weights (quantized integer weights are kept); the default is float32 on
    the CPU backend and the checkpoint's own dtype on Metal.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    config: ModelConfig = load_config(path)
    weights = sanitize(read_weights(safetensors_files(path)))
    model = Model(config)
    if config.quantization:
        quantize_like_checkpoint(model, config.quantization, weights)
    check_weights(model, weights, path)
    dtype = dtype or default_dtype()
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()))
    try:
        mx.eval(model.parameters())
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensor data ({e})") from None
    model.eval()
    return model


def load(path_or_repo: str | Path, revision: Optional[str] = None, dtype: Optional[mx.Dtype] = None):
    """``(model, processor)`` from a local checkpoint folder or a Hub repo id, in Hugging Face format
    (bf16) or MLX format (quantized, with a ``quantization`` block in config.json)."""
    from .generation import read_generation_config
    from .hub import resolve_model_path
    from .processor import load_processor

    path = resolve_model_path(path_or_repo, revision)
    model = load_model(path, dtype=dtype)
    vision = model.config.vision
    processor = load_processor(path, tokens_per_tile=vision.tokens_per_tile if vision else None)
    processor.generation_config = read_generation_config(path)
    return model, processor
