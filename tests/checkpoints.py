"""Tiny random Llama 4 checkpoints built with transformers, the reference implementation.

Every structural feature stays (MoE and dense layers, NoPE layers, chunked attention, qk-norm, temperature
tuning with a small floor_scale, llama3 scaling, the vision tower) at sizes that run in milliseconds.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

SMALL_VOCAB = dict(vocab_size=1024, bos_token_id=1000, eos_token_id=[1001], pad_token_id=1002)
SMALL_VOCAB_SPECIAL = dict(image_token_index=1020, boi_token_index=1010, eoi_token_index=1011)

VISION = dict(
    model_type="llama4_vision_model", hidden_size=16, num_attention_heads=2, intermediate_size=64,
    num_hidden_layers=2, image_size=56, patch_size=14, num_channels=3, hidden_act="gelu", norm_eps=1e-5,
    pixel_shuffle_ratio=0.5, projector_input_dim=32, projector_output_dim=32, vision_output_dim=32,
    multi_modal_projector_bias=False, rope_theta=10000,
)

_TEXT = dict(
    model_type="llama4_text", hidden_size=16, head_dim=8, num_attention_heads=4, num_key_value_heads=2,
    num_hidden_layers=4, intermediate_size=16, intermediate_size_mlp=32, num_local_experts=4,
    num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layers=[1, 1, 1, 0], attention_chunk_size=8,
    use_qk_norm=True, attn_temperature_tuning=True, floor_scale=4, attn_scale=0.1, rms_norm_eps=1e-5,
    hidden_act="silu", rope_theta=500000.0,
    rope_scaling=dict(rope_type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                      original_max_position_embeddings=64),
    max_position_embeddings=4096, attention_bias=False, tie_word_embeddings=False, **SMALL_VOCAB,
)

# name -> overrides of the text config
VARIANTS = {
    # all layers MoE, qk-norm, llama3 scaling
    "scout": dict(),
    # dense even layers, MoE odd layers, no qk-norm, plain RoPE
    "maverick": dict(interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None),
    # NoPE layers not every 4th, top-2 routing, explicit MoE layers, chunk size 5
    "irregular": dict(
        num_hidden_layers=6, no_rope_layers=[1, 0, 1, 1, 0, 1], num_experts_per_tok=2, attention_chunk_size=5,
        moe_layers=[0, 2, 3, 5], rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                   high_freq_factor=4.0, original_max_position_embeddings=64),
    ),
    # no chunking: RoPE layers attend globally too
    "unchunked": dict(attention_chunk_size=None),
}


def text_config(variant: str) -> dict:
    cfg = copy.deepcopy(_TEXT)
    cfg.update(copy.deepcopy(VARIANTS[variant]))
    return cfg


def build_hf(text: dict, vision: dict | None, seed: int = 0, special: dict = SMALL_VOCAB_SPECIAL):
    """A float32 transformers model from config dicts: Llama4ForConditionalGeneration, or Llama4ForCausalLM
    when ``vision`` is None."""
    import torch
    import transformers
    from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

    # transformers 5.24 bug: forward(return_dict=True) reads a field the output class lacks.
    transformers.modeling_outputs.MoeCausalLMOutputWithPast.image_outputs = None
    torch.manual_seed(seed)
    if vision is not None:
        cfg = Llama4Config(text_config=text, vision_config=dict(vision), tie_word_embeddings=False, **special)
        model = Llama4ForConditionalGeneration(cfg)
    else:
        model = Llama4ForCausalLM(Llama4TextConfig(**text))
    return model.float().eval()


def build_hf_model(variant: str, seed: int = 0, vision: bool = True):
    """The tiny model of ``variant``, multimodal or text-only."""
    return build_hf(text_config(variant), VISION if vision else None, seed)


def save_hf_model(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids).long()).logits.float().numpy()


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.abs(out - ref).max() / np.abs(ref).max())
