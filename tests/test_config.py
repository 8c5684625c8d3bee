"""config.json in every published spelling, and clear errors for malformed ones."""

import copy
import json

import pytest

from checkpoints import SMALL_VOCAB_SPECIAL, VISION, text_config
from mlx_llama4.config import ConfigError, ModelConfig, load_config


def multimodal(text: dict) -> dict:
    return dict(model_type="llama4", text_config=text, vision_config=dict(VISION), **SMALL_VOCAB_SPECIAL)


SCOUT_TEXT = dict(  # the published Scout text_config, transformers-4 spelling
    vocab_size=202048, hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
    head_dim=128, intermediate_size=8192, intermediate_size_mlp=16384, num_local_experts=16,
    num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layers=[], attention_chunk_size=8192,
    use_qk_norm=True, rope_theta=500000.0, attn_temperature_tuning=4, floor_scale=8192, attn_scale=0.1,
    rope_scaling=dict(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                      original_max_position_embeddings=8192, rope_type="llama3"),
    max_position_embeddings=10485760, rms_norm_eps=1e-5, model_type="llama4_text",
    bos_token_id=200000, eos_token_id=[200001, 200007, 200008], pad_token_id=200018,
)


def test_published_scout_config():
    t = ModelConfig.from_dict(multimodal(copy.deepcopy(SCOUT_TEXT))).text
    nope = [i for i, r in enumerate(t.uses_rope) if not r]
    assert nope == list(range(3, 48, 4))
    assert t.moe_layers == list(range(48))
    assert t.attn_temperature_tuning is True  # the int 4 of older hub files
    assert t.rope_scaling["factor"] == 16.0 and t.attention_chunk_size == 8192
    assert t.eos_token_id == [200001, 200007, 200008]


def test_maverick_derivations():
    d = dict(SCOUT_TEXT, interleave_moe_layer_step=2, rope_scaling=None, use_qk_norm=False, num_local_experts=128)
    t = ModelConfig.from_dict(multimodal(d)).text
    assert t.moe_layers == list(range(1, 48, 2)) and not t.is_moe(0) and t.is_moe(47)
    assert t.rope_scaling is None and not t.use_qk_norm


def test_transformers5_rope_parameters_equal_transformers4_spelling():
    d4 = dict(SCOUT_TEXT)
    d5 = {k: v for k, v in SCOUT_TEXT.items() if k not in ("rope_theta", "rope_scaling")}
    d5["rope_parameters"] = dict(SCOUT_TEXT["rope_scaling"], rope_theta=500000.0)
    a, b = ModelConfig.from_dict(multimodal(d4)).text, ModelConfig.from_dict(multimodal(d5)).text
    assert a.rope_scaling == b.rope_scaling and a.rope_theta == b.rope_theta
    d5["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0)
    t = ModelConfig.from_dict(multimodal(d5)).text
    assert t.rope_scaling is None and t.rope_theta == 10000.0


def test_explicit_lists_null_chunk_and_text_only_export():
    d = dict(SCOUT_TEXT, no_rope_layers=[1, 1, 1, 0] * 12, moe_layers=[0, 5], attention_chunk_size=None)
    t = ModelConfig.from_dict(d).text  # a llama4_text export: the text config at top level
    assert t.moe_layers == [0, 5] and t.attention_chunk_size is None and not t.uses_rope[3]
    assert ModelConfig.from_dict(d).vision is None


def test_written_by_transformers(tmp_path):
    from transformers import Llama4Config

    Llama4Config(text_config=text_config("irregular"), vision_config=dict(VISION)).save_pretrained(tmp_path)
    cfg = load_config(tmp_path)
    assert cfg.text.uses_rope == [True, False, True, True, False, True]
    assert cfg.text.num_experts_per_tok == 2 and cfg.vision.tokens_per_tile == 4


def test_absent_optional_fields_read_as_transformers_fills_them_in():
    """A text config with only the required fields reads the same as transformers' Llama4TextConfig writes it
    out: every absent field takes transformers' default (head_dim 128, not hidden / heads; 8 KV heads; ...)."""
    from transformers import Llama4TextConfig

    minimal = dict(model_type="llama4_text", vocab_size=1024, hidden_size=64, num_hidden_layers=8,
                   num_attention_heads=8, intermediate_size=32)
    ours = ModelConfig.from_dict(minimal).text
    theirs = ModelConfig.from_dict(Llama4TextConfig(**minimal).to_dict()).text
    for name in ("head_dim", "intermediate_size_mlp", "attention_chunk_size",
                 "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "uses_rope", "moe_layers",
                 "use_qk_norm", "attn_temperature_tuning", "floor_scale", "attn_scale", "rms_norm_eps", "rope_theta",
                 "rope_scaling", "max_position_embeddings"):
        assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(model_type="llama"), "model_type is 'llama'"),
        (dict(text_config=None), "text_config"),
        (dict(text_config=dict(SCOUT_TEXT, hidden_size=None)), "hidden_size"),
        (dict(text_config=dict(SCOUT_TEXT, num_hidden_layers="48")), "num_hidden_layers"),
        (dict(text_config=dict(SCOUT_TEXT, no_rope_layers=[1, 0])), "no_rope_layers"),
        (dict(text_config=dict(SCOUT_TEXT, moe_layers=[99])), "moe_layers"),
        (dict(text_config=dict(SCOUT_TEXT, num_key_value_heads=7)), "num_key_value_heads"),
        (dict(text_config=dict(SCOUT_TEXT, num_experts_per_tok=17)), "num_experts_per_tok"),
        (dict(text_config=dict(SCOUT_TEXT, rope_scaling=dict(rope_type="yarn", factor=4.0))), "yarn"),
        (dict(text_config=dict(SCOUT_TEXT, attention_chunk_size=0)), "attention_chunk_size"),
        (dict(vision_config=dict(VISION, patch_size=5)), "image_size / patch_size"),
        (dict(vision_config=dict(VISION, intermediate_size=60)), "intermediate_size \\(60\\) must equal"),
        (dict(vision_config=dict(VISION, vision_output_dim=16)), "must be equal, got \\(32, 32, 16\\)"),
    ],
)
def test_malformed_config_names_the_field(change, message):
    d = multimodal(copy.deepcopy(SCOUT_TEXT))
    d.update(change)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(d)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(model_type="llama4_text")))
    with pytest.raises(ConfigError, match="config.json: .*num_hidden_layers"):
        load_config(tmp_path)
