"""Model configuration read from a checkpoint's ``config.json``.

Tolerant of every published spelling: transformers 4 (``rope_theta`` + ``rope_scaling``) and 5
(``rope_parameters``), empty or explicit ``no_rope_layers`` / ``moe_layers``, ``attention_chunk_size: null``,
``attn_temperature_tuning`` as bool or int, multimodal configs (``text_config`` + ``vision_config``) and
text-only ``llama4_text`` exports. Derived per-layer facts (``uses_rope``, ``is_moe``) are computed once here
so that the model code never re-derives them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


class ConfigError(ValueError):
    """A config.json that cannot describe a Llama 4 model; the message names the field."""


def _require(d: dict, key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"{where}: missing required field '{key}'")
    return d[key]


def _int(d: dict, key: str, where: str, default: Any = ...) -> int:
    value = _require(d, key, where) if default is ... else d.get(key, default)
    if value is None:
        return None  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ConfigError(f"{where}: field '{key}' must be an integer, got {value!r}")
    return int(value)


def _pos_int(d: dict, key: str, where: str, default: Any = ...) -> int:
    value = _int(d, key, where, default)
    if value is not None and value <= 0:
        raise ConfigError(f"{where}: field '{key}' must be positive, got {value}")
    return value


def _float(d: dict, key: str, where: str, default: Any = ...) -> float:
    value = _require(d, key, where) if default is ... else d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: field '{key}' must be a number, got {value!r}")
    return float(value)


@dataclass
class TextConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # routed and shared expert width
    intermediate_size_mlp: int  # dense SwiGLU width
    num_local_experts: int
    num_experts_per_tok: int
    uses_rope: list[bool]  # per layer; False = NoPE layer (global attention)
    moe_layers: list[int]
    attention_chunk_size: Optional[int]  # None: RoPE layers attend causally without chunking
    use_qk_norm: bool
    attn_temperature_tuning: bool
    floor_scale: float
    attn_scale: float
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]  # {"rope_type": "llama3", "factor", "low_freq_factor", ...} or None
    max_position_embeddings: int
    bos_token_id: Optional[int] = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: Optional[int] = None

    def is_moe(self, layer: int) -> bool:
        return layer in self._moe_set

    def __post_init__(self) -> None:
        self._moe_set = frozenset(self.moe_layers)

    @classmethod
    def from_dict(cls, d: dict, where: str = "text_config") -> "TextConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{where} must be a JSON object, got {type(d).__name__}")
        n_layers = _pos_int(d, "num_hidden_layers", where)
        n_heads = _pos_int(d, "num_attention_heads", where)
        hidden = _pos_int(d, "hidden_size", where)
        # Absent fields take transformers' Llama4TextConfig defaults (an explicit null: its fallback).
        n_kv = _pos_int(d, "num_key_value_heads", where, 8) or n_heads
        if n_heads % n_kv:
            raise ConfigError(
                f"{where}: num_attention_heads ({n_heads}) must be a multiple of num_key_value_heads ({n_kv})"
            )
        head_dim = _pos_int(d, "head_dim", where, 128) or hidden // n_heads
        if head_dim % 2:
            raise ConfigError(f"{where}: head_dim must be even for RoPE, got {head_dim}")

        uses_rope = _uses_rope(d, n_layers, where)
        moe_layers = _moe_layers(d, n_layers, where)
        n_experts = _pos_int(d, "num_local_experts", where, 16)
        top_k = _pos_int(d, "num_experts_per_tok", where, 1)
        if top_k > n_experts:
            raise ConfigError(f"{where}: num_experts_per_tok ({top_k}) exceeds num_local_experts ({n_experts})")
        chunk = _pos_int(d, "attention_chunk_size", where, 8192)  # null: no chunking
        theta, scaling = _rope(d, where)
        eos = d.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            vocab_size=_pos_int(d, "vocab_size", where),
            hidden_size=hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            intermediate_size=_pos_int(d, "intermediate_size", where),
            intermediate_size_mlp=_pos_int(d, "intermediate_size_mlp", where, 16384),
            num_local_experts=n_experts,
            num_experts_per_tok=top_k,
            uses_rope=uses_rope,
            moe_layers=moe_layers,
            attention_chunk_size=chunk,
            use_qk_norm=bool(d.get("use_qk_norm", True)),
            # Older hub configs carry the int 4 here; any truthy value enables it.
            attn_temperature_tuning=bool(d.get("attn_temperature_tuning", True)),
            floor_scale=_float(d, "floor_scale", where, 8192),
            attn_scale=_float(d, "attn_scale", where, 0.1),
            rms_norm_eps=_float(d, "rms_norm_eps", where, 1e-5),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=_pos_int(d, "max_position_embeddings", where, 4096 * 32),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=d.get("pad_token_id"),
        )


def _uses_rope(d: dict, n_layers: int, where: str) -> list[bool]:
    """``no_rope_layers[i] == 1`` means layer i USES RoPE (the name is inverted); empty means interval rule."""
    explicit = d.get("no_rope_layers") or []
    if explicit:
        if len(explicit) != n_layers or any(v not in (0, 1) for v in explicit):
            raise ConfigError(
                f"{where}: no_rope_layers must list 0 or 1 for each of the {n_layers} layers, got {explicit!r}"
            )
        return [bool(v) for v in explicit]
    interval = _pos_int(d, "no_rope_layer_interval", where, 4)
    return [(i + 1) % interval != 0 for i in range(n_layers)]


def _moe_layers(d: dict, n_layers: int, where: str) -> list[int]:
    explicit = d.get("moe_layers")
    if explicit is not None:
        if any(not isinstance(i, int) or not 0 <= i < n_layers for i in explicit):
            raise ConfigError(f"{where}: moe_layers must be layer indices in [0, {n_layers}), got {explicit!r}")
        return sorted(set(explicit))
    step = _pos_int(d, "interleave_moe_layer_step", where, 1)
    return list(range(step - 1, n_layers, step))


def _rope(d: dict, where: str) -> tuple[float, Optional[dict]]:
    """Return (theta, llama3 scaling or None) from transformers-4 or transformers-5 spellings."""
    params = d.get("rope_parameters")
    if params:
        theta = _float(params, "rope_theta", f"{where}.rope_parameters", d.get("rope_theta", 500000.0))
        scaling = params if params.get("rope_type", "default") != "default" else None
    else:
        theta = _float(d, "rope_theta", where, 500000.0)
        scaling = d.get("rope_scaling")
    if scaling is None:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConfigError(f"{where}: unsupported rope scaling type {kind!r} (Llama 4 uses 'llama3' or none)")
    sw = f"{where}.rope_scaling"
    return theta, {
        "rope_type": "llama3",
        "factor": _float(scaling, "factor", sw),
        "low_freq_factor": _float(scaling, "low_freq_factor", sw, 1.0),
        "high_freq_factor": _float(scaling, "high_freq_factor", sw, 4.0),
        "original_max_position_embeddings": _pos_int(scaling, "original_max_position_embeddings", sw, 8192),
    }


@dataclass
class VisionConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    num_channels: int
    pixel_shuffle_ratio: float
    projector_input_dim: int
    projector_output_dim: int
    vision_output_dim: int
    rope_theta: float
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """``<|patch|>`` tokens one tile contributes after pixel shuffle (144 for the published models)."""
        return int(self.patches_per_side**2 * self.pixel_shuffle_ratio**2)

    @classmethod
    def from_dict(cls, d: dict, where: str = "vision_config") -> "VisionConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{where} must be a JSON object, got {type(d).__name__}")
        cfg = cls(
            hidden_size=_pos_int(d, "hidden_size", where),
            num_hidden_layers=_pos_int(d, "num_hidden_layers", where),
            num_attention_heads=_pos_int(d, "num_attention_heads", where),
            intermediate_size=_pos_int(d, "intermediate_size", where),
            image_size=_pos_int(d, "image_size", where, 336),
            patch_size=_pos_int(d, "patch_size", where, 14),
            num_channels=_pos_int(d, "num_channels", where, 3),
            pixel_shuffle_ratio=_float(d, "pixel_shuffle_ratio", where, 0.5),
            projector_input_dim=_pos_int(d, "projector_input_dim", where, 4096),
            projector_output_dim=_pos_int(d, "projector_output_dim", where, 4096),
            vision_output_dim=_pos_int(d, "vision_output_dim", where, 4096),
            # transformers 5 nests the theta in rope_parameters
            rope_theta=_float(d.get("rope_parameters") or d, "rope_theta", where, d.get("rope_theta", 10000.0)),
            norm_eps=_float(d, "norm_eps", where, 1e-5),
        )
        if cfg.hidden_size % cfg.num_attention_heads or cfg.head_dim % 4:
            raise ConfigError(
                f"{where}: hidden_size / num_attention_heads must be a multiple of 4 for 2-D RoPE, "
                f"got {cfg.hidden_size} / {cfg.num_attention_heads}"
            )
        if cfg.image_size % cfg.patch_size or cfg.patches_per_side % 2:
            raise ConfigError(
                f"{where}: image_size / patch_size must be an even integer, got {cfg.image_size} / {cfg.patch_size}"
            )
        # Shape rules transformers' modules assume without checking (docs/architecture.md, "Vision tower", step 7).
        shuffled = cfg.hidden_size / cfg.pixel_shuffle_ratio**2
        if shuffled != int(shuffled):
            raise ConfigError(
                f"{where}: hidden_size ({cfg.hidden_size}) / pixel_shuffle_ratio^2 ({cfg.pixel_shuffle_ratio}^2) "
                "must be an integer"
            )
        if cfg.intermediate_size != int(shuffled):
            raise ConfigError(
                f"{where}: intermediate_size ({cfg.intermediate_size}) must equal hidden_size / "
                f"pixel_shuffle_ratio^2 ({int(shuffled)}): the adapter's fc1 input is sized by it"
            )
        dims = (cfg.projector_input_dim, cfg.projector_output_dim, cfg.vision_output_dim)
        if len(set(dims)) != 1:
            raise ConfigError(
                f"{where}: projector_input_dim, projector_output_dim and vision_output_dim must be equal, got "
                f"{dims}"
            )
        if cfg.tokens_per_tile * round(1 / cfg.pixel_shuffle_ratio) ** 2 != cfg.patches_per_side**2:
            raise ConfigError(
                f"{where}: {cfg.patches_per_side}x{cfg.patches_per_side} patches cannot be pixel-shuffled "
                f"with ratio {cfg.pixel_shuffle_ratio}"
            )
        return cfg


@dataclass
class ModelConfig:
    text: TextConfig
    vision: Optional[VisionConfig]  # None for text-only ``llama4_text`` exports
    image_token_index: int = 200092  # <|patch|>: rows replaced by projected vision features
    boi_token_index: int = 200080
    eoi_token_index: int = 200081
    quantization: Optional[dict] = None  # mlx-lm's ``quantization`` block, for MLX-format checkpoints

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type == "llama4":
            text = TextConfig.from_dict(_require(d, "text_config", "config"))
            vision_d = d.get("vision_config")
            vision = VisionConfig.from_dict(vision_d) if vision_d else None
        elif model_type == "llama4_text":
            text, vision = TextConfig.from_dict(d, "config"), None
        else:
            raise ConfigError(
                f"config: model_type is {model_type!r}; this package loads Llama 4 ('llama4' or 'llama4_text')"
            )
        quant = d.get("quantization") or d.get("quantization_config")
        if quant is not None and quant.get("quant_method") not in (None, "mlx"):
            # e.g. compressed-tensors FP8 sources are handled by the converter, not here.
            quant = None
        return cls(
            text=text,
            vision=vision,
            image_token_index=_int(d, "image_token_index", "config", 200092),
            boi_token_index=_int(d, "boi_token_index", "config", 200080),
            eoi_token_index=_int(d, "eoi_token_index", "config", 200081),
            quantization=quant,
        )


def read_config_json(path: str | Path) -> tuple[Path, dict]:
    """``(file, raw dict)`` of ``config.json`` in a checkpoint folder (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no config.json in {path}")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: must be a JSON object")
    return file, raw


def load_config(path: str | Path) -> ModelConfig:
    """Read ``config.json`` from a checkpoint folder (or the file itself)."""
    file, raw = read_config_json(path)
    try:
        return ModelConfig.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
