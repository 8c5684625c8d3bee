"""Tiny random Llama 4 checkpoints built with transformers, the reference implementation.

Every structural feature stays (MoE and dense layers, NoPE layers, chunked attention, qk-norm, temperature
tuning with a small floor_scale, llama3 scaling with and without its smooth band, the vision tower) at sizes
that run in milliseconds. ``build_hf_model`` rescales the text weights (``scale_text_weights``) so that each of
these mechanisms moves the logits far beyond float32 rounding.
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

# Relative error (max |ours - reference| / max |reference|) allowed on float32 text logits. With the scaled
# weights float32 rounding measures 1e-6 to 2.1e-6; every planted porting mistake measures 2.7e-5 or more.
PARITY = 1e-5

# name -> overrides of the text config
VARIANTS = {
    # all layers MoE, qk-norm, llama3 scaling
    "scout": dict(),
    # dense even layers, MoE odd layers, no qk-norm, plain RoPE
    "maverick": dict(interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None),
    # NoPE layers not every 4th, top-2 routing, explicit MoE layers, chunk size 5; llama3 scaling whose smooth
    # band [256 / 4, 256 / 1] holds one of the four wavelengths (6.3, 167, 4443, 118143), one below it is kept
    # and two above it are divided by the factor
    "irregular": dict(
        num_hidden_layers=6, no_rope_layers=[1, 0, 1, 1, 0, 1], num_experts_per_tok=2, attention_chunk_size=5,
        moe_layers=[0, 2, 3, 5], rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                   high_freq_factor=4.0, original_max_position_embeddings=256),
    ),
    # no chunking: RoPE layers attend globally too
    "unchunked": dict(attention_chunk_size=None),
}

# Gain of the q/k projections of RoPE layers with qk-norm (default 1). Scout's are tiny (q and k of RMS ~3e-3,
# mean square ~ rms_norm_eps) so that the qk-norm's eps changes the output: at RMS 1 an eps of 1e-6 instead of
# 1e-5 moves the logits by only ~3e-5.
QK_NORM_GAIN = {"scout": 3e-3}


def text_config(variant: str) -> dict:
    cfg = copy.deepcopy(_TEXT)
    cfg.update(copy.deepcopy(VARIANTS[variant]))
    return cfg


def build_hf(text: dict, vision: dict | None, seed: int = 0, special: dict = SMALL_VOCAB_SPECIAL):
    """A float32 transformers model from config dicts: Llama4ForConditionalGeneration, or Llama4ForCausalLM
    when ``vision`` is None."""
    import torch
    from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

    torch.manual_seed(seed)
    if vision is not None:
        cfg = Llama4Config(text_config=text, vision_config=dict(vision), tie_word_embeddings=False, **special)
        model = Llama4ForConditionalGeneration(cfg)
    else:
        model = Llama4ForCausalLM(Llama4TextConfig(**text))
    return model.float().eval()


def scale_text_weights(model, seed: int, qk_norm_gain: float = 1.0):
    """Redraw the text weights of a transformers Llama 4 at gains where every mechanism shows in the logits.

    transformers' init (std 0.02, norms at 1) leaves attention uniform and the experts near-linear and tiny
    next to the residual, so a wrong temperature, RoPE layout, chunk boundary or expert-score placement moves
    the logits by less than float32 rounding. Here: embeddings of unit RMS, unit-gain linears, norm weights
    1 + 0.2 noise, q and k of NoPE and un-normed layers at gain 2 (peaked attention), router at gain 2 (sigmoid
    scores spread over (0, 1)), q and k of qk-normed layers at ``qk_norm_gain``. The vision tower is left
    as it is. Returns the model."""
    import torch

    cfg = model.config.get_text_config()
    qk_normed = [bool(r) and cfg.use_qk_norm for r in cfg.no_rope_layers]  # no_rope_layers[i] == 1: RoPE layer
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("vision_model.", "multi_modal_projector.")):
                continue
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # (E, in, out)
                p.copy_(noise / p.shape[1] ** 0.5)
            else:  # nn.Linear (out, in)
                gain = 1.0
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    layer = int(name.split("layers.")[1].split(".")[0])
                    gain = qk_norm_gain if qk_normed[layer] else 2.0
                elif name.endswith("router.weight"):
                    gain = 2.0
                p.copy_(gain * noise / p.shape[1] ** 0.5)
    return model


def build_hf_model(variant: str, seed: int = 0, vision: bool = True, **text_overrides):
    """The tiny model of ``variant`` (text config fields overridden by ``text_overrides``), multimodal or
    text-only, with text weights from ``scale_text_weights``."""
    model = build_hf(dict(text_config(variant), **text_overrides), VISION if vision else None, seed)
    return scale_text_weights(model, seed + 1000, QK_NORM_GAIN.get(variant, 1.0))


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
