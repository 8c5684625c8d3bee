"""Which layers get quantized, and how.

- Routed experts quantize along their input dimension (weights are ``[E, out, in]``), so the fused gate+up stays
  one gather-matmul after quantization.
- The router is never quantized (it picks the experts, and at ``E x D`` per layer it is too small to be worth any
  precision loss). Norms are not quantizable and stay float.
- The vision tower and projector stay float unless ``quantize_vision`` asks for them; then they take the
  attention-class settings.
- Mixed recipes ``mixed_<low>_<high>``: routed experts at ``low`` bits, attention / shared expert / dense FFN at
  ``high`` bits, embeddings and lm_head at ``max(high, 6)`` bits (affine only).
- A layer whose input width is not a multiple of the group size stays float (e.g. the 588-wide patch embedding).

Modes and what MLX accepts (``mx.quantize``): affine: the bit widths of the installed MLX (``affine_bits``: 2, 3,
4, 5, 6 and 8, plus 1 in MLX 0.32.4) with group size 32, 64, 128 (default 4 bits, 64); mxfp4: 4 bits, group 32;
nvfp4: 4 bits, group 16; mxfp8: 8 bits, group 32.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import cache
from typing import Optional

MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")
FIXED = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
AFFINE_GROUP_SIZES = (32, 64, 128)
RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_3_8", "mixed_4_6", "mixed_4_8")
_RECIPE = re.compile(r"^mixed_(\d)_(\d)$")
VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")
EMBEDDING_MIN_BITS = 6


@cache
def affine_bits() -> tuple[int, ...]:
    """The bit widths the installed MLX's ``mx.quantize`` accepts in affine mode (it has grown across versions)."""
    import mlx.core as mx

    accepted = []
    for bits in range(1, 9):
        try:
            mx.eval(mx.quantize(mx.zeros((1, 32)), group_size=32, bits=bits))
        except (ValueError, RuntimeError):  # refused, or no kernel for it on this device
            continue
        accepted.append(bits)
    return tuple(accepted)


class QuantizationOptionError(ValueError):
    """Quantization settings that MLX or this converter does not support; the message says what would work."""


@dataclass(frozen=True)
class QuantSpec:
    group_size: int
    bits: int
    mode: str = "affine"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        return cls(int(d["group_size"]), int(d["bits"]), d.get("mode", "affine"))


@dataclass(frozen=True)
class QuantPolicy:
    default: QuantSpec  # the ``quantization`` block's top level
    experts: QuantSpec  # routed experts
    other: QuantSpec  # attention, shared expert, dense FFN
    embeddings: QuantSpec  # embed_tokens and lm_head
    vision: Optional[QuantSpec]  # None: the vision tower and projector stay float
    recipe: Optional[str] = None

    def spec_for(self, path: str, in_dims: int) -> Optional[QuantSpec]:
        """The settings for the quantizable layer at ``path`` (input width ``in_dims``), or None to keep it float."""
        if path.endswith(".router"):
            return None
        if path.startswith(VISION_PREFIXES):
            spec = self.vision
        elif ".feed_forward.experts." in path + ".":
            spec = self.experts
        elif path.endswith((".embed_tokens", ".lm_head")):
            spec = self.embeddings
        else:
            spec = self.other
        if spec is None or in_dims % spec.group_size:
            return None
        return spec

    def describe(self) -> str:
        def s(q: QuantSpec) -> str:
            return f"{q.bits}-bit {q.mode} (group {q.group_size})"

        if self.recipe:
            text = (f"recipe {self.recipe}: routed experts {s(self.experts)}, attention/shared expert/dense "
                    f"{s(self.other)}, embeddings and lm_head {s(self.embeddings)}")
        else:
            text = s(self.default)
        text += "; router and norms float"
        text += f"; vision {s(self.vision)}" if self.vision else "; vision tower float"
        return text


def _spec(bits: Optional[int], group_size: Optional[int], mode: str) -> QuantSpec:
    if mode not in MODES:
        raise QuantizationOptionError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode in FIXED:
        need_bits, need_group = FIXED[mode]
        if bits not in (None, need_bits) or group_size not in (None, need_group):
            raise QuantizationOptionError(
                f"{mode} quantization uses {need_bits} bits with group size {need_group} "
                f"(got bits {bits}, group size {group_size})"
            )
        return QuantSpec(need_group, need_bits, mode)
    bits = 4 if bits is None else bits
    group_size = 64 if group_size is None else group_size
    if bits not in affine_bits():
        raise QuantizationOptionError(f"affine quantization supports {', '.join(map(str, affine_bits()))} bits "
                                      f"(those of the installed MLX), got {bits}")
    if group_size not in AFFINE_GROUP_SIZES:
        raise QuantizationOptionError(f"affine quantization supports group sizes {AFFINE_GROUP_SIZES}, got {group_size}")
    return QuantSpec(group_size, bits, mode)


def make_policy(
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    q_mode: str = "affine",
    quant_recipe: Optional[str] = None,
    quantize_vision: bool = False,
) -> QuantPolicy:
    """Validate the quantization options and turn them into a per-layer policy."""
    if quant_recipe is None:
        spec = _spec(q_bits, q_group_size, q_mode)
        return QuantPolicy(spec, spec, spec, spec, spec if quantize_vision else None)
    m = _RECIPE.match(quant_recipe)
    if not m:
        raise QuantizationOptionError(
            f"unknown quantization recipe {quant_recipe!r}; use mixed_<expert bits>_<other bits>, e.g. "
            + ", ".join(RECIPES)
        )
    if q_mode != "affine":
        raise QuantizationOptionError(f"mixed recipes use affine quantization, not {q_mode}")
    if q_bits is not None:
        raise QuantizationOptionError("give either --q-bits or --quant-recipe (the recipe sets the bits)")
    low, high = int(m[1]), int(m[2])
    if low > high:
        raise QuantizationOptionError(f"{quant_recipe}: expert bits ({low}) must not exceed the other bits ({high})")
    experts, other = _spec(low, q_group_size, "affine"), _spec(high, q_group_size, "affine")
    embeddings = _spec(max(high, EMBEDDING_MIN_BITS), q_group_size, "affine")
    return QuantPolicy(experts, experts, other, embeddings, other if quantize_vision else None, quant_recipe)
