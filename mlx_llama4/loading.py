"""Read a checkpoint folder (config.json + single or sharded safetensors) into a ``Model``."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelConfig, load_config, read_config_json
from .model import Model
from .safetensors_reader import CheckpointReader
from .pipeline import PipelineParallel
from .sharding import PARALLEL_MODES, Sharding, TensorParallel
from .weights import CheckpointError, canonical_module, plan_layout, sanitize

__all__ = ["CheckpointError", "load", "load_model", "quantize_like_checkpoint", "infer_quant_params"]

# Quantization modes whose (bits, group_size) pair is fixed; affine keeps float scales, these keep uint8 ones.
FIXED_MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


def default_dtype() -> Optional[mx.Dtype]:
    """float32 on MLX's CPU backend (its fast dtype; gather_mm rejects bfloat16 there), else the checkpoint's."""
    return mx.float32 if mx.default_device() == mx.cpu else None


def checkpoint_reader(path: Path) -> CheckpointReader:
    """The shards of a checkpoint: those named by ``model.safetensors.index.json``, else every ``*.safetensors``.

    Index and headers are checked by the converter's strict reader (``safetensors_reader.CheckpointReader``), so
    the loader and the converter accept and refuse the same folders, with the same errors.
    """
    reader = CheckpointReader(path)
    if reader.unlisted:
        warnings.warn(f"{path}: shards that model.safetensors.index.json does not name are not read: "
                      f"{', '.join(reader.unlisted)}", stacklevel=4)
    return reader


def safetensors_files(path: Path) -> list[Path]:
    return [f.path for f in checkpoint_reader(path).files]


def read_weights(files: list[Path]) -> dict[str, mx.array]:
    """All tensors of the (already checked) shards, as lazy arrays."""
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mlx raises RuntimeError/ValueError with a bare message
            raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None
    return weights


def infer_quant_params(path: str, in_dims: int, weights: Mapping[str, Any]) -> dict:
    """The ``group_size``, ``bits`` and ``mode`` a layer was packed with, from its tensors' shapes and dtypes.

    ``in_dims`` is the layer's unquantized input width; ``weights`` maps names to anything with ``shape`` and
    ``dtype`` (arrays, or the converter's ``TensorInfo``).
    """
    w, s = weights[f"{path}.weight"], weights[f"{path}.scales"]
    packed, groups = w.shape[-1], s.shape[-1]
    bits, group_size = packed * 32 // in_dims, in_dims // max(groups, 1)
    if bits * in_dims != packed * 32 or group_size * groups != in_dims:
        raise CheckpointError(
            f"{path}: packed weight {tuple(w.shape)} and scales {tuple(s.shape)} do not fit an input width of {in_dims}"
        )
    if s.dtype != mx.uint8:
        return {"group_size": group_size, "bits": bits, "mode": "affine"}
    for mode, pair in FIXED_MODES.items():
        if pair == (bits, group_size):
            return {"group_size": group_size, "bits": bits, "mode": mode}
    raise CheckpointError(f"{path}: cannot tell the quantization mode of {bits} bits with group size {group_size}")


def _overrides(quantization: dict) -> dict[str, dict]:
    """Per-layer entries of a ``quantization`` block, keyed by our module paths (mlx-lm / mlx-vlm spell some
    differently, e.g. separate ``experts.gate_proj`` / ``experts.up_proj``)."""
    return {canonical_module(k): v for k, v in quantization.items() if isinstance(v, dict)}


def quantize_like_checkpoint(model: nn.Module, quantization: Optional[dict], weights: Mapping[str, Any]) -> None:
    """Swap in quantized layers wherever the checkpoint holds ``scales``.

    Each layer takes its per-layer entry of the ``quantization`` block (mlx-lm convention: keyed by module
    path, e.g. from a mixed recipe) if there is one, else what its tensors' shapes say, else the block's
    top-level ``group_size`` / ``bits`` / ``mode``.
    """
    quantization = quantization or {}
    overrides = _overrides(quantization)
    default = {
        "group_size": quantization.get("group_size", 64),
        "bits": quantization.get("bits", 4),
        "mode": quantization.get("mode", "affine"),
    }

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        if path in overrides:
            return {**default, **{k: overrides[path][k] for k in ("group_size", "bits", "mode") if k in overrides[path]}}
        try:
            return infer_quant_params(path, module.weight.shape[-1], weights)
        except CheckpointError:
            return dict(default)  # the shape check that follows names the tensor

    nn.quantize(model, class_predicate=predicate)


def check_shapes(expected: Mapping[str, Any], found: Mapping[str, Any], source: Any) -> None:
    """Raise a ``CheckpointError`` listing missing, unexpected and mis-shaped tensors (values have ``.shape``)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mis_shaped = [
        f"{k}: checkpoint {tuple(found[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and tuple(found[k].shape) != tuple(v.shape)
    ]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
        if items:
            shown = "\n  ".join(items[:20]) + (f"\n  ... and {len(items) - 20} more" if len(items) > 20 else "")
            problems.append(f"{len(items)} {title} tensor(s):\n  {shown}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match its config.json:\n" + "\n".join(problems))


def without_absent_vision(config: ModelConfig, names) -> ModelConfig:
    """Text-only when the checkpoint holds no vision tensors at all (mlx-lm writes text-only MLX checkpoints,
    some with the original ``vision_config`` still in config.json)."""
    if config.vision is not None and not any(n.startswith(VISION_PREFIXES) for n in names):
        warnings.warn("the checkpoint has no vision tensors; loading the text model only", stacklevel=3)
        return dataclasses.replace(config, vision=None)
    return config


def refuse_modelopt(path: Path) -> None:
    """Refuse an NVIDIA ModelOpt FP8 checkpoint before any tensor is read.

    ModelOpt (``quantization_config.quant_method == "modelopt"`` in config.json, an ``hf_quant_config.json``)
    stores static per-tensor scales under flat names (``*_weight_scale``, ``*_input_scale``, ``k_scale`` /
    ``v_scale``), another FP8 scheme than Meta's, which ``weights.py`` reads.
    """
    _, raw = read_config_json(path)
    quant = raw.get("quantization_config")
    modelopt = isinstance(quant, dict) and quant.get("quant_method") == "modelopt"
    if modelopt or (path / "hf_quant_config.json").exists():
        raise CheckpointError(
            f"{path}: an NVIDIA ModelOpt FP8 checkpoint (quant_method 'modelopt' / hf_quant_config.json); this FP8 "
            "flavour is not supported. Use the official bf16 checkpoint (e.g. meta-llama/Llama-4-Scout-17B-16E-"
            "Instruct) or Meta's FP8 one (meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8), directly or "
            "converted with `mlx-llama4 convert --hf-path REPO --mlx-path OUT [-q]`"
        )


def _cast(array: mx.array, dtype: Optional[mx.Dtype]) -> mx.array:
    if dtype is None or array.dtype == dtype or not mx.issubdtype(array.dtype, mx.floating):
        return array
    return array.astype(dtype)


def make_parallel(group: mx.distributed.Group, parallel: str, dtype: Optional[mx.Dtype],
                  layers_per_rank: Optional[Sequence[int]]):
    """What process ``group.rank()`` holds of the model for ``parallel`` ("tensor" or "pipeline")."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}")
    if parallel == "tensor" and layers_per_rank is not None:
        raise ValueError("layers_per_rank splits layers: it needs parallel='pipeline'")
    return TensorParallel(group) if parallel == "tensor" else PipelineParallel(group, dtype, layers_per_rank)


def read_shares(path: Path, config: ModelConfig, parallel, dtype: Optional[mx.Dtype]) -> tuple[Model, dict]:
    """This process's model and weights for ``parallel`` (``sharding.TensorParallel`` or
    ``pipeline.PipelineParallel``): only its share of each tensor is read from the files, cast and evaluated
    one tensor at a time, so loading holds its share plus one tensor."""
    reader = checkpoint_reader(path)
    entries = plan_layout(reader.info(), fp8_dtype=dtype or mx.bfloat16)
    config = without_absent_vision(config, [name for e in entries for name in e.outputs])
    model = Model(config)
    parallel.apply(model, entries)
    weights: dict[str, mx.array] = {}
    for entry in entries:
        for name, array in parallel.read(entry, reader.get).items():
            weights[name] = _cast(array, dtype)
            mx.eval(weights[name])
    return model, weights


def load_model(path_or_repo: str | Path, dtype: Optional[mx.Dtype] = None, revision: Optional[str] = None,
               group: Optional[mx.distributed.Group] = None, parallel: str = "tensor",
               layers_per_rank: Optional[Sequence[int]] = None) -> Model:
    """Build the model of a checkpoint (a local folder, ``"demo"`` or a Hub repo id, as for ``load``) and load
    its weights.

    Reads every supported layout (``weights.py``): Hugging Face, per-expert, FP8 (dequantized), mlx-lm /
    mlx-vlm and our own MLX checkpoints, float or quantized. ``dtype`` casts floating-point weights (quantized
    integer weights are kept); the default is float32 on the CPU backend and the checkpoint's own dtype on Metal.

    With a ``group`` of several processes (``mx.distributed.init()`` under ``mlx.launch``), each process holds
    and reads only its share (README.md, "Several Macs"): ``parallel="tensor"`` splits heads, experts and MLP
    widths (two ``all_sum`` per layer), ``"pipeline"`` splits the layers, in proportion to each machine's memory
    or ``layers_per_rank``. Every process must then make the same calls (``generate``, the model) in step.
    """
    from .hub import resolve_model_path

    sharded = group is not None and group.size() > 1
    dtype = dtype or default_dtype()
    split = make_parallel(group, parallel, dtype, layers_per_rank) if sharded else None
    path = resolve_model_path(path_or_repo, revision)
    refuse_modelopt(path)
    config: ModelConfig = load_config(path)
    if sharded:
        model, weights = read_shares(path, config, split, dtype)
    else:
        # FP8 checkpoints are dequantized on the fly, to bfloat16 unless a dtype is asked for.
        weights = sanitize(read_weights(safetensors_files(path)), fp8_dtype=dtype or mx.bfloat16)
        model = Model(without_absent_vision(config, weights))
    if model.config.quantization or any(k.endswith(".scales") for k in weights):
        quantize_like_checkpoint(model, model.config.quantization, weights)
    check_shapes(dict(tree_flatten(model.parameters())), weights, path)
    model.load_weights([(k, _cast(v, dtype)) for k, v in weights.items()])
    if sharded:
        model.sharding = Sharding(group, parallel)
    try:
        mx.eval(model.parameters())
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensor data ({e})") from None
    model.eval()
    return model


def load(path_or_repo: str | Path, revision: Optional[str] = None, dtype: Optional[mx.Dtype] = None,
         group: Optional[mx.distributed.Group] = None, parallel: str = "tensor",
         layers_per_rank: Optional[Sequence[int]] = None):
    """``(model, processor)`` from a local checkpoint folder, ``"demo"`` (the bundled demo model) or a Hub repo
    id, in Hugging Face format (bf16, FP8) or MLX format (quantized, with a ``quantization`` block in
    config.json). ``group``, ``parallel`` and ``layers_per_rank`` split the model across processes, as for
    ``load_model``."""
    from .generation import read_generation_config
    from .hub import resolve_model_path
    from .processor import load_processor

    path = resolve_model_path(path_or_repo, revision)
    model = load_model(path, dtype=dtype, group=group, parallel=parallel, layers_per_rank=layers_per_rank)
    vision = model.config.vision
    processor = load_processor(path, tokens_per_tile=vision.tokens_per_tile if vision else None)
    processor.generation_config = read_generation_config(path)
    return model, processor
