"""Checkpoint layouts that load, and bad checkpoints that fail naming the file or tensor."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from checkpoints import build_hf_model, hf_logits, rel_err, save_hf_model
from mlx_llama4 import CheckpointError, load_model


@pytest.fixture(scope="module")
def maverick(tmp_path_factory):
    hf = build_hf_model("maverick", seed=7)
    return hf, save_hf_model(hf, tmp_path_factory.mktemp("maverick"))


@pytest.fixture
def copy_of(maverick, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(maverick[1], dst)
    return dst


IDS = np.arange(3, 40)[None] * 7 % 1000


def test_sharded_checkpoint(maverick, tmp_path):
    hf, _ = maverick
    path = save_hf_model(hf, tmp_path / "sharded", max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("*.safetensors"))) > 1
    assert rel_err(load_model(path, dtype=mx.float32)(mx.array(IDS)), hf_logits(hf, IDS)) <= 1e-4


def test_text_only_export(tmp_path):
    hf = build_hf_model("irregular", seed=2, vision=False)
    path = save_hf_model(hf, tmp_path / "text")
    assert json.loads((path / "config.json").read_text())["model_type"] == "llama4_text"
    model = load_model(path, dtype=mx.float32)
    assert model.config.vision is None
    assert rel_err(model(mx.array(IDS)), hf_logits(hf, IDS)) <= 1e-4


def test_bfloat16_checkpoint_loads_as_float32_on_cpu(tmp_path):
    import torch

    path = save_hf_model(build_hf_model("maverick", vision=False).to(torch.bfloat16), tmp_path / "bf16")
    model = load_model(path)
    assert model.language_model.lm_head.weight.dtype == mx.float32
    assert load_model(path, dtype=mx.bfloat16).language_model.lm_head.weight.dtype == mx.bfloat16


def _rewrite(path, edit):
    from safetensors.numpy import load_file, save_file

    f = path / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_tensor_is_named(copy_of):
    _rewrite(copy_of, lambda t: t.pop("language_model.model.layers.1.feed_forward.router.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing tensor.*\n.*layers\.1\.feed_forward\.router\.weight"):
        load_model(copy_of)


def test_unexpected_and_misshaped_tensors_are_named(copy_of):
    def edit(t):
        t["language_model.model.layers.0.extra.weight"] = np.zeros(3, np.float32)
        key = next(k for k in t if k.endswith("layers.2.self_attn.q_proj.weight"))
        t[key] = t[key][:, :-1].copy()

    _rewrite(copy_of, edit)
    with pytest.raises(CheckpointError) as e:
        load_model(copy_of)
    msg = str(e.value)
    assert "unexpected" in msg and "layers.0.extra.weight" in msg
    assert "mis-shaped" in msg and "layers.2.self_attn.q_proj.weight: checkpoint (32, 15), model (32, 16)" in msg


def test_missing_files(copy_of, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        load_model(tmp_path / "nowhere")
    (copy_of / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        load_model(copy_of)
    (copy_of / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    with pytest.raises(CheckpointError, match="lists shards that are missing: model-00001.safetensors"):
        load_model(copy_of)


def test_truncated_shard(copy_of):
    f = copy_of / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(copy_of)


def test_load_model_takes_what_load_takes():
    from mlx_llama4 import load
    from mlx_llama4.hub import DEMO_PATH

    model = load_model("demo", dtype=mx.float32)
    assert model.config.text.hidden_size == json.loads((DEMO_PATH / "config.json").read_text())["text_config"][
        "hidden_size"]
    for loader in (load, load_model):
        with pytest.raises(ValueError, match="no model given"):
            loader("")


def _modelopt(folder, config_mark=True, side_file=True):
    """Mark a checkpoint as NVIDIA ModelOpt FP8: its flat scale tensors, quant_method and hf_quant_config.json."""
    from safetensors.numpy import save_file

    names = ["language_model.model.layers.0.self_attn.q_proj", "language_model.model.layers.0.self_attn.k_proj"]
    extra = {f"{n}.{s}": np.ones((), np.float32) for n in names for s in ("weight_scale", "input_scale")}
    extra["language_model.model.layers.0.self_attn.k_proj.k_scale"] = np.ones((), np.float32)
    extra["language_model.model.layers.0.self_attn.v_proj.v_scale"] = np.ones((), np.float32)
    save_file(extra, folder / "scales.safetensors")
    if config_mark:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}
        (folder / "config.json").write_text(json.dumps(cfg))
    if side_file:
        (folder / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}}))


@pytest.mark.parametrize("marks", [(True, True), (True, False), (False, True)])
def test_modelopt_fp8_is_refused_before_reading_tensors(copy_of, marks):
    _modelopt(copy_of, *marks)
    (copy_of / "model.safetensors").write_bytes(b"not read")  # reading it would fail otherwise
    with pytest.raises(CheckpointError) as e:
        load_model(copy_of)
    message = str(e.value)
    assert "NVIDIA ModelOpt FP8" in message and "not supported" in message
    assert "bf16" in message and "Llama-4-Maverick-17B-128E-Instruct-FP8" in message and "mlx-llama4 convert" in message
