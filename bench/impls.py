"""Loading the same checkpoint in ours, mlx-lm and mlx-vlm, in float32 or 4-bit with the same layers quantized.

- float32: both read the float32 safetensors. mlx-lm's ``sanitize`` splits the fused expert tensor and swaps
  axes lazily, so its expert weights stay strided views of the checkpoint; on MLX's CPU backend ``gather_mm``
  then copies the whole expert tensor on every call (~20x slower MoE). ``mlx_lm.convert`` would write them out
  contiguous, so we make every mlx-lm parameter contiguous after loading: the weights a user of mlx-lm gets from
  its converter (``as_converted=False`` keeps the raw load, reported once for reference).
- 4-bit: both models are quantized in memory with ``nn.quantize`` (affine, group 64, 4 bits) and the same
  predicate: every linear, expert and embedding layer of the text model except the router, which stays float
  (a 4-bit router flips top-1 choices). Quantization groups run along the input, so our fused gate|up rows and
  mlx-lm's separate gate and up rows quantize to identical values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

GROUP_SIZE = 64
BITS = 4


def quant_predicate(path: str, module: nn.Module) -> bool:
    if not hasattr(module, "to_quantized") or path.endswith("router"):
        return False
    if path.startswith(("vision_model", "multi_modal_projector")):
        return False
    weight = getattr(module, "weight", None)
    return weight is not None and weight.shape[-1] % GROUP_SIZE == 0


def quantize(model: nn.Module) -> nn.Module:
    nn.quantize(model, group_size=GROUP_SIZE, bits=BITS, class_predicate=quant_predicate)
    mx.eval(model.parameters())
    return model


def _contiguous(model: nn.Module) -> None:
    model.update(tree_map(lambda a: mx.contiguous(a), model.parameters()))
    mx.eval(model.parameters())


def load_ours(path: Path, quant: str = "f32"):
    """(multimodal Model, its text model following mlx-lm's protocol)."""
    from mlx_llama4 import load_model

    model = load_model(path, dtype=mx.float32)
    if quant == "q4":
        quantize(model.language_model)
    return model, model.language_model


def load_mlx_lm(path: Path, quant: str = "f32", as_converted: bool = True):
    import mlx_lm.utils

    model, _ = mlx_lm.utils.load_model(Path(path) / "compat")
    if model.parameters()["language_model"]["lm_head"]["weight"].dtype != mx.float32:
        model.set_dtype(mx.float32)
    if as_converted:
        _contiguous(model)
    if quant == "q4":
        quantize(model.language_model)
    model.eval()
    return model, model


def load_mlx_vlm(path: Path):
    import mlx_vlm.utils

    model = mlx_vlm.utils.load_model(Path(path) / "compat")
    model.set_dtype(mx.float32)
    _contiguous(model)
    model.eval()
    return model


LOADERS = {"ours": load_ours, "mlx-lm": load_mlx_lm}


def param_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def versions() -> dict[str, Any]:
    import importlib.metadata as md

    out = {}
    for pkg in ("mlx", "mlx-lm", "mlx-vlm", "transformers", "torch", "numpy", "pillow", "mlx-llama4"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
