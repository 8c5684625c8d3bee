"""Vision tower and multimodal merge vs Hugging Face transformers on a tiny checkpoint (float32).

The tiny checkpoint (56-px tiles of 4 patches, hidden 16) has the small vocabulary (1024; image token 1020).
transformers initialises every vision LayerNorm to (1, 0) and every vision bias to 0, which would hide mistakes
in those tensors, so the fixture perturbs them before saving.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import mlx_llama4
from checkpoints import rel_err
from mlx_llama4.config import ModelConfig
from mlx_llama4.model import Model
from mlx_llama4.vision import patchify, pixel_shuffle, vision_rope_angles

IMAGE_TOKEN, BOI, EOI, BOS = 1020, 1010, 1011, 1000

TINY_VISION = dict(
    model_type="llama4_vision_model", hidden_size=16, num_attention_heads=2, intermediate_size=64,
    num_hidden_layers=2, image_size=56, patch_size=14, num_channels=3, hidden_act="gelu", norm_eps=1e-5,
    pixel_shuffle_ratio=0.5, projector_input_dim=32, projector_output_dim=32, vision_output_dim=32,
    multi_modal_projector_bias=False, rope_theta=10000,
)  # fmt: skip
TINY_TEXT = dict(
    model_type="llama4_text", vocab_size=1024, hidden_size=16, head_dim=8, num_attention_heads=4,
    num_key_value_heads=2, num_hidden_layers=4, intermediate_size=16, intermediate_size_mlp=32,
    num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layers=[1, 1, 1, 0],
    attention_chunk_size=8, use_qk_norm=True, attn_temperature_tuning=True, floor_scale=4, attn_scale=0.1,
    rms_norm_eps=1e-5, hidden_act="silu", rope_theta=500000.0,
    rope_scaling=dict(rope_type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                      original_max_position_embeddings=64),
    max_position_embeddings=4096, attention_bias=False, tie_word_embeddings=False,
    bos_token_id=BOS, eos_token_id=[1001], pad_token_id=1002,
)  # fmt: skip
TINY = dict(
    architectures=["Llama4ForConditionalGeneration"], model_type="llama4", boi_token_index=BOI,
    eoi_token_index=EOI, image_token_index=IMAGE_TOKEN, tie_word_embeddings=False,
    text_config=TINY_TEXT, vision_config=TINY_VISION,
)  # fmt: skip

TOKENS_PER_TILE = 4  # (56/14)^2 patches * 0.5^2
TOL = 1e-4


def tiles(n: int, seed: int) -> torch.Tensor:
    """Random tiles in the processor's [-1, 1] range, (n, 3, 56, 56) float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 56, 56, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    """(HF model, checkpoint folder) for the tiny multimodal config."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(Llama4Config(**TINY)).float().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(("vision_model.", "multi_modal_projector.")):
                continue
            noise = torch.randn(p.shape, generator=g)
            if "layernorm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.2 * noise)
            elif p.ndim == 2 and "positional" not in name:
                # unit-gain linears (HF's std 0.02 leaves attention uniform and GELU near-linear, so RoPE
                # and GELU mistakes would go unnoticed); q and k larger still for peaked attention
                gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
                p.copy_(gain * noise / p.shape[1] ** 0.5)
            else:  # class and positional embeddings
                p.copy_(0.5 * noise)
    path = tmp_path_factory.mktemp("tiny-llama4-vision")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def hf(hf_ckpt):
    return hf_ckpt[0]


@pytest.fixture(scope="module")
def ours(hf_ckpt):
    return mlx_llama4.load_model(hf_ckpt[1], dtype=mx.float32)


def hf_features(hf_model, px: torch.Tensor) -> np.ndarray:
    """HF projected image features (tiles, tokens_per_tile, text hidden)."""
    with torch.no_grad():
        out = hf_model.get_image_features(pixel_values=px, return_dict=True).last_hidden_state
        return hf_model.multi_modal_projector(out).numpy()


def our_features(model, px: torch.Tensor) -> np.ndarray:
    out = model.multi_modal_projector(model.vision_model(mx.array(px.numpy())))
    return np.array(out)


def prompt_ids(n_tiles: int, seed: int, length: int = 44) -> np.ndarray:
    """(1, length) ids: text, then <|image_start|> <|patch|>*4 per tile (with separator-like text tokens between
    tiles) <|image_end|>, then text. Long enough to span several attention chunks of 8."""
    rng = np.random.default_rng(seed)
    image = [BOI]
    for t in range(n_tiles):
        image += [IMAGE_TOKEN] * TOKENS_PER_TILE + ([int(rng.integers(0, 1000))] if t < n_tiles - 1 else [])
    image += [EOI]
    before = [BOS] + rng.integers(0, 1000, 5).tolist()
    after = rng.integers(0, 1000, length - len(before) - len(image)).tolist()
    ids = np.array([before + image + after], dtype=np.int64)
    assert ids.shape == (1, length) and (ids == IMAGE_TOKEN).sum() == n_tiles * TOKENS_PER_TILE
    return ids


def hf_logits(hf_model, ids: np.ndarray, px: torch.Tensor | None) -> np.ndarray:
    with torch.no_grad():
        return hf_model(input_ids=torch.from_numpy(ids), pixel_values=px, return_dict=False)[0].numpy()


# (a) vision tower + projector
@pytest.mark.parametrize("n_tiles", [1, 3, 5])
def test_image_features_match_hf(hf, ours, n_tiles):
    px = tiles(n_tiles, seed=n_tiles)
    ref = hf_features(hf, px)
    assert ref.shape == (n_tiles, TOKENS_PER_TILE, 16)
    assert rel_err(our_features(ours, px), ref) <= TOL
    # encode_images flattens in tile order
    flat = np.array(ours.encode_images(mx.array(px.numpy())))
    assert rel_err(flat, ref.reshape(-1, 16)) <= TOL


def test_vision_tower_output_matches_hf(hf, ours):
    """Adapter output before the projector (HF ``vision_model``)."""
    px = tiles(2, seed=7)
    with torch.no_grad():
        ref = hf.vision_model(px, return_dict=False)[0].numpy()
    assert ref.shape == (2, TOKENS_PER_TILE, 32)
    assert rel_err(ours.vision_model(mx.array(px.numpy())), ref) <= TOL


# (b) full multimodal forward
def test_multimodal_logits_match_hf(hf, ours):
    px = tiles(3, seed=11)
    ids = prompt_ids(3, seed=0)
    ref = hf_logits(hf, ids, px)
    out = ours(mx.array(ids), pixel_values=mx.array(px.numpy()))
    assert out.shape == (1, ids.shape[1], 1024)
    assert rel_err(out, ref) <= TOL
    # the image changes the logits (the scatter is exercised), text before it is unaffected
    text_only = hf_logits(hf, ids, None)
    first = int(np.argmax(ids[0] == IMAGE_TOKEN))
    assert np.abs(ref[:, first:] - text_only[:, first:]).max() > 1e-2
    assert np.abs(ref[:, :first] - text_only[:, :first]).max() < 1e-6


def test_multimodal_logits_batch_of_two(hf, ours):
    """Features fill <|patch|> positions row-major over the batch (HF masked_scatter order)."""
    px = tiles(3, seed=12)  # row 0 has 1 tile, row 1 has 2 tiles
    a, b = prompt_ids(1, seed=1, length=36), prompt_ids(2, seed=2, length=36)
    ids = np.concatenate([a, b], axis=0)
    ref = hf_logits(hf, ids, px)
    assert rel_err(ours(mx.array(ids), pixel_values=mx.array(px.numpy())), ref) <= TOL


def test_embed_then_prefill_in_pieces(hf, ours):
    """embed() once, prefill its slices with a cache, then decode without pixel_values: equals the full forward."""
    px = tiles(3, seed=13)
    ids = prompt_ids(3, seed=3, length=40)
    ref = hf_logits(hf, ids, px)
    emb = ours.embed(mx.array(ids), mx.array(px.numpy()))
    assert emb.shape == (1, 40, 16)
    cache = ours.make_cache()
    parts = [
        ours(mx.array(ids[:, :13]), cache=cache, input_embeddings=emb[:, :13]),
        ours(mx.array(ids[:, 13:30]), cache=cache, input_embeddings=emb[:, 13:30]),
    ]
    parts += [ours(mx.array(ids[:, i : i + 1]), cache=cache) for i in range(30, 40)]  # text-only decode steps
    assert rel_err(mx.concatenate(parts, axis=1), ref) <= TOL


def test_embed_places_features_in_order(ours):
    px = tiles(2, seed=14)
    ids = prompt_ids(2, seed=4, length=20)
    emb = np.array(ours.embed(mx.array(ids), mx.array(px.numpy())))[0]
    feats = np.array(ours.encode_images(mx.array(px.numpy())))
    text = np.array(ours.embed(mx.array(ids)))[0]
    mask = ids[0] == IMAGE_TOKEN
    np.testing.assert_array_equal(emb[mask], feats)
    np.testing.assert_array_equal(emb[~mask], text[~mask])


# (c) count mismatch
@pytest.mark.parametrize("n_tiles", [2, 4])
def test_patch_count_mismatch_errors(ours, n_tiles):
    ids = prompt_ids(3, seed=5)  # 12 <|patch|> tokens
    with pytest.raises(ValueError) as e:
        ours(mx.array(ids), pixel_values=mx.array(tiles(n_tiles, seed=0).numpy()))
    msg = str(e.value)
    assert "12" in msg and str(n_tiles * TOKENS_PER_TILE) in msg


def test_pixel_values_and_input_embeddings_together_error(ours):
    ids = prompt_ids(1, seed=6)
    with pytest.raises(ValueError, match="not both"):
        ours(mx.array(ids), pixel_values=mx.array(tiles(1, 0).numpy()), input_embeddings=ours.embed(mx.array(ids)))


# (d) text-only model
def test_pixel_values_on_text_only_model_errors(ours):
    cfg = ModelConfig(text=ours.config.text, vision=None, image_token_index=IMAGE_TOKEN)
    model = Model(cfg)
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert not any(k.startswith(("vision_model", "multi_modal_projector")) for k in names)
    ids = mx.array(prompt_ids(1, seed=7))
    with pytest.raises(ValueError, match="text-only"):
        model(ids, pixel_values=mx.array(tiles(1, 0).numpy()))
    with pytest.raises(ValueError, match="text-only"):
        model.embed(ids, mx.array(tiles(1, 0).numpy()))


# (e) patchify
@pytest.mark.parametrize("shape,patch", [((3, 3, 56, 56), 14), ((2, 3, 336, 336), 14), ((1, 2, 12, 12), 4)])
def test_patchify_equals_hf_unfold(shape, patch):
    x = torch.randn(*shape)
    ref = torch.nn.Unfold(kernel_size=patch, stride=patch)(x).permute(0, 2, 1).numpy()
    np.testing.assert_array_equal(np.array(patchify(mx.array(x.numpy()), patch)), ref)


def test_patch_embedding_equals_hf(hf, ours):
    px = tiles(2, seed=15)
    with torch.no_grad():
        ref = hf.vision_model.patch_embedding(px).numpy()
    assert rel_err(ours.vision_model.patch_embedding(mx.array(px.numpy())), ref) <= 1e-5


@pytest.mark.parametrize("n", [16, 576])
def test_pixel_shuffle_equals_hf(n):
    from transformers.models.llama4.modeling_llama4 import pixel_shuffle as hf_pixel_shuffle

    x = torch.randn(2, n, 6)
    np.testing.assert_array_equal(np.array(pixel_shuffle(mx.array(x.numpy()), 0.5)), hf_pixel_shuffle(x, 0.5).numpy())


def test_pixel_shuffle_layout_reference_example():
    """Reference 3.4: on the 24x24 grid, output token 0 = patches [0, 1, 24, 25], token 1 = [2, 3, 26, 27],
    token 12 = [48, 49, 72, 73], channel blocks dy-major."""
    x = mx.arange(576, dtype=mx.float32).reshape(1, 576, 1)
    out = np.array(pixel_shuffle(x, 0.5))[0]
    assert out.shape == (144, 4)
    assert out[0].tolist() == [0, 1, 24, 25]
    assert out[1].tolist() == [2, 3, 26, 27]
    assert out[12].tolist() == [48, 49, 72, 73]


# (f) vision RoPE
@pytest.mark.parametrize(
    "dims",
    [
        dict(hidden_size=16, num_attention_heads=2, image_size=56, intermediate_size=64, projector_input_dim=32,
             projector_output_dim=32, vision_output_dim=32),
        dict(hidden_size=1408, num_attention_heads=16, image_size=336, patch_size=14, intermediate_size=5632,
             projector_input_dim=4096, projector_output_dim=4096, vision_output_dim=4096),
    ],
    ids=["tiny", "published"],
)
def test_vision_rope_equals_hf_freqs_ci(dims):
    from transformers import Llama4VisionConfig
    from transformers.models.llama4.modeling_llama4 import Llama4VisionRotaryEmbedding

    from mlx_llama4.config import VisionConfig

    hf_cfg = Llama4VisionConfig(**dims)
    ref = Llama4VisionRotaryEmbedding._compute_freqs_ci(hf_cfg)[:, 0, :]  # (N+1, Dh/2) complex64
    ours_cfg = VisionConfig.from_dict(hf_cfg.to_dict())
    angles = vision_rope_angles(ours_cfg)
    assert angles.shape == tuple(ref.shape) and angles.dtype == mx.float32
    np.testing.assert_allclose(np.cos(np.array(angles)), ref.real.numpy(), atol=2e-6)
    np.testing.assert_allclose(np.sin(np.array(angles)), ref.imag.numpy(), atol=2e-6)
    a = np.array(angles)
    assert (a[-1] == 0).all()  # CLS (last) unrotated
    P = ours_cfg.patches_per_side
    F = ours_cfg.head_dim // 4
    f = 1.0 / ours_cfg.rope_theta ** (np.arange(F) * 2 / (2 * F))
    t = P + 2  # x = 2, y = 1 -> angles 3*f and 2*f (1-based)
    np.testing.assert_allclose(a[t], np.concatenate([3 * f, 2 * f]), rtol=1e-6)


def test_vision_rope_theta_from_rope_parameters():
    from transformers import Llama4VisionConfig

    from mlx_llama4.config import VisionConfig

    theta = {"rope_theta": 500.0, "rope_type": "default"}
    hf_cfg = Llama4VisionConfig(
        hidden_size=16, num_attention_heads=2, image_size=56, intermediate_size=64, projector_input_dim=32,
        projector_output_dim=32, vision_output_dim=32, rope_parameters=theta,
    )
    assert "rope_theta" not in hf_cfg.to_dict()  # the transformers-5 spelling
    assert VisionConfig.from_dict(hf_cfg.to_dict()).rope_theta == 500.0


def test_vision_rope_tables_are_not_parameters(ours):
    names = [k for k, _ in tree_flatten(ours.parameters())]
    assert not any("rope" in k or "rotary" in k for k in names)
    hf_names = {
        "vision_model.patch_embedding.linear.weight", "vision_model.class_embedding",
        "vision_model.positional_embedding_vlm", "vision_model.layernorm_pre.weight",
        "vision_model.model.layers.1.self_attn.q_proj.bias", "vision_model.model.layers.0.mlp.fc1.weight",
        "vision_model.model.layers.0.post_attention_layernorm.bias", "vision_model.vision_adapter.mlp.fc2.weight",
        "multi_modal_projector.linear_1.weight",
    }  # fmt: skip
    assert hf_names <= set(names)


# (g) many tiles in one call
def test_48_tiles_in_one_call(hf, ours):
    px = tiles(48, seed=48)
    feats = ours.encode_images(mx.array(px.numpy()))  # batched through the tower TILE_BATCH at a time
    assert feats.shape == (48 * TOKENS_PER_TILE, 16)
    feats = np.array(feats).reshape(48, TOKENS_PER_TILE, 16)
    subset = [0, 1, 15, 16, 31, 47]
    assert rel_err(feats[subset], hf_features(hf, px[subset])) <= TOL
    # batching does not change results: one call over all tiles equals small batches
    small = np.array(ours.encode_images(mx.array(px.numpy()), tile_batch=5)).reshape(48, TOKENS_PER_TILE, 16)
    assert rel_err(small, feats) <= 1e-5


def test_bfloat16_vision_tower_runs_close(hf_ckpt, ours):
    """bf16 weights: RoPE tables stay float32 inside, output dtype follows the weights."""
    model = mlx_llama4.load_model(hf_ckpt[1], dtype=mx.bfloat16)
    px = mx.array(tiles(2, seed=16).numpy())
    out = model.multi_modal_projector(model.vision_model(px))
    assert out.dtype == mx.bfloat16
    assert model.vision_model._rope_cos.dtype == mx.float32
    ref = np.array(ours.multi_modal_projector(ours.vision_model(px)))
    assert rel_err(out.astype(mx.float32), ref) <= 5e-2


def test_wrong_tile_shape_errors(ours):
    with pytest.raises(ValueError, match="pixel_values must be"):
        ours.vision_model(mx.zeros((1, 3, 28, 28)))
