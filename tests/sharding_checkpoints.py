"""Tiny checkpoints for the sharding tests, whose routed experts are most of the bytes, and a stand-in group.

The text model keeps every mechanism a split can break: 8 query heads on 4 KV heads (GQA 2:1, so 2 and 4
processes each hold whole KV groups), 16 routed experts with top-2 routing, a shared expert, a dense layer
(layer 2), chunked RoPE layers and a NoPE layer, a chunk of 32 so that a batch of 8 rows puts 512
(token, expert) pairs in one step (the MoE's path for long prompts, ``moe._OWN_PAIRS_THRESHOLD``), head size 16
and MLP widths of 128 so that each of 4 processes holds 32 input columns of o_proj and down_proj (whole
quantization groups of 32), and the vision tower.
Weights are scaled as in ``checkpoints.scale_text_weights``, so that each mechanism moves the logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from checkpoints import QK_NORM_GAIN, VISION, build_hf, scale_text_weights, text_config
from convert_checkpoints import save_fp8, save_fp8_fbgemm, save_hf, save_per_expert

TEXT = dict(text_config("scout"), hidden_size=64, head_dim=16, num_attention_heads=8, num_key_value_heads=4,
            intermediate_size=128, intermediate_size_mlp=128, num_local_experts=16, num_experts_per_tok=2,
            moe_layers=[0, 1, 3], attention_chunk_size=32)
IDS_SHAPE = (8, 80)  # steps of 32, 32 and 16 tokens: 512 and 256 (token, expert) pairs
TEXT_PROMPT = "w5 w6 w7 w8 w9"
IMAGE_PROMPT = ("<|begin_of_text|><|header_start|>user<|header_end|>\n\n<|image|>w11 w12 w13<|eot|>"
                "<|header_start|>assistant<|header_end|>\n\n")


def build_hf_sharding(seed: int = 0):
    hf = build_hf(TEXT, VISION, seed)
    return scale_text_weights(hf, seed + 1000, QK_NORM_GAIN["scout"])


# name -> converter options for the quantized checkpoints (groups of 32: 4 processes hold whole groups)
QUANTIZED = {"q4": dict(q_bits=4, q_group_size=32), "mxfp4": dict(q_mode="mxfp4")}


def write_checkpoints(root: Path, layouts: bool = False) -> dict[str, Path]:
    """The float checkpoint (Hugging Face layout, with a word-level tokenizer) and its 4-bit affine and mxfp4
    conversions; with ``layouts``, also the per-expert and both FP8 layouts of the same model."""
    from mlx_llama4.convert import convert

    hf = build_hf_sharding()
    paths = {"float": save_hf(hf, root / "float")}
    for name, options in QUANTIZED.items():
        paths[name] = convert(paths["float"], root / name, quantize=True, verbose=False, **options).path
    if layouts:
        paths["per-expert"] = save_per_expert(hf, root / "per-expert")
        paths["fp8"] = save_fp8(hf, root / "fp8")[0]
        paths["fp8-fbgemm"] = save_fp8_fbgemm(hf, root / "fp8-fbgemm")[0]
    return paths


def token_ids(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, size=IDS_SHAPE)


class FakeGroup:
    """A stand-in for ``mx.distributed.Group`` with a rank and a size, for what needs no communication:
    loading one process's share of a tensor-parallel model (or of a pipeline with fixed layers)."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size
