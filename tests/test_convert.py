"""The converter (``mlx_llama4.convert``) and ``load_model`` on every checkpoint layout.

Sources are tiny transformers models (width 64, so that quantization groups fit) written in each published
layout: Hugging Face bf16 / float32 (single and sharded), per-expert, FP8 (compressed-tensors per-expert, and
fbgemm fused), and the mlx-community layouts written by mlx-vlm's and mlx-lm's own converters. The Hub is a
local stand-in (``hub_stub.py``) talked to by the real ``huggingface_hub`` client.

Quantized outputs are checked three ways:

- exactly: their logits equal, to float32 rounding, those of the float conversion with each packed weight
  replaced by ``dequantize(quantize(weight))`` at that layer's setting (``fake_quantized_logits``), on a model
  with the scaled text weights of ``checkpoints.scale_text_weights`` and no boost. A converter that drops or
  damages any tensor fails this at every bit width;
- by a relative-error bound per recipe against the float conversion (loose: random weights have no redundancy,
  so 4-bit noise is about as large as losing the shared expert);
- by argmax agreement with the float conversion. A randomly initialized model's logits are nearly flat (any
  perturbation flips its argmax), so those models get a trained model's confident predictions on the test ids
  first (``make_confident``); without it even 8-bit agreement would be noise.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from checkpoints import PARITY, QK_NORM_GAIN, hf_logits, rel_err, scale_text_weights
from convert_checkpoints import (
    argmax_agreement,
    build_wide_hf,
    copy_folder,
    hub_style_config,
    make_confident,
    rounded,
    save_fp8,
    save_fp8_fbgemm,
    save_hf,
    save_per_expert,
)
from hub_stub import HubStub
from mlx_llama4 import CheckpointError, ConfigError, load_model
from mlx_llama4.convert import ConvertError, QuantizationOptionError, convert, main
from mlx_llama4.convert import core as convert_core

IDS = np.random.default_rng(0).integers(0, 1000, size=(1, 48))  # spans 6 attention chunks
AGREEMENT = 0.95
# Quantization options per recipe name.
RECIPES = {
    "q4": dict(quantize=True, q_bits=4), "q8": dict(quantize=True, q_bits=8),
    "mixed_3_6": dict(quant_recipe="mixed_3_6", quantize_vision=True),
    "mxfp4": dict(quantize=True, q_mode="mxfp4"), "nvfp4": dict(quantize=True, q_mode="nvfp4"),
    "mxfp8": dict(quantize=True, q_mode="mxfp8"),
}
# Relative error of the ``scout`` fixture's quantized logits against its float conversion's, about 2.5x the
# measured q4 1.3e-1, q8 1.1e-2, mixed_3_6 2.8e-2, mxfp4 1.4e-1, nvfp4 1.3e-1, mxfp8 4.2e-2.
QUANT_ERROR = {"q4": 3e-1, "q8": 3e-2, "mixed_3_6": 7e-2, "mxfp4": 3.5e-1, "nvfp4": 3.5e-1, "mxfp8": 1e-1}
SCOUT_LAYER0 = "language_model.model.layers.0"


def logits(path) -> np.ndarray:
    return np.array(load_model(path, dtype=mx.float32)(mx.array(IDS)))


def fake_quantized_logits(float_path: Path, quant_path: Path) -> np.ndarray:
    """Logits of the float conversion ``float_path`` with every weight that ``quant_path`` packs replaced by
    ``dequantize(quantize(weight))`` at that layer's group size, bits and mode (its config's quantization block):
    what the quantized checkpoint must compute."""
    block = json.loads((quant_path / "config.json").read_text())["quantization"]
    packed = tensors(quant_path)
    weights = tensors(float_path)
    f32 = lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a  # noqa: E731
    for name, w in weights.items():
        prefix = name[: -len(".weight")]
        if prefix + ".scales" not in packed:
            continue
        spec = block.get(prefix, block)  # a per-layer entry, else the default
        kw = dict(group_size=spec["group_size"], bits=spec["bits"], mode=spec["mode"])
        q, scales, *biases = mx.quantize(w, **kw)
        weights[name] = mx.dequantize(q, f32(scales), *map(f32, biases), **kw)  # dequantized in float32
    model = load_model(float_path, dtype=mx.float32)
    model.load_weights([(k, f32(v)) for k, v in weights.items()])
    return np.array(model(mx.array(IDS)))


def tensors(path: Path) -> dict:
    out = {}
    for f in sorted(Path(path).glob("model-*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def header(file: Path) -> dict:
    raw = file.read_bytes()
    return json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])


def run_convert(src, dst, **kw):
    return convert(src, dst, verbose=False, **kw)


# -- fixtures: one model per family, built once ------------------------------------------------------------------


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
    """Multimodal Scout-like model saved in bf16 (as on the Hub): (path, reference logits in float32)."""
    hf = build_wide_hf("scout", seed=1)
    make_confident(hf, IDS)
    path = save_hf(hf, tmp_path_factory.mktemp("scout") / "hf", dtype=torch.bfloat16)
    return path, hf_logits(rounded(hf, torch.bfloat16), IDS)


@pytest.fixture(scope="module")
def scout_float(scout, tmp_path_factory):
    """The float conversion of ``scout`` and its logits: the baseline for the quantized conversions."""
    out = run_convert(scout[0], tmp_path_factory.mktemp("scout_out") / "float").path
    return out, logits(out)


@pytest.fixture(scope="module")
def maverick(tmp_path_factory):
    """Text-only Maverick-like model (dense and MoE layers, no qk-norm), float32: (hf model, folder, logits)."""
    hf = build_wide_hf("maverick", seed=2, vision=False)
    make_confident(hf, IDS)
    return hf, save_hf(hf, tmp_path_factory.mktemp("maverick") / "hf"), hf_logits(hf, IDS)


@pytest.fixture(scope="module")
def maverick_float(maverick, tmp_path_factory):
    out = run_convert(maverick[1], tmp_path_factory.mktemp("maverick_out") / "float").path
    return out, logits(out)


# -- Hugging Face bf16 -> float / quantized ------------------------------------------------------------------------


def test_bf16_to_float_reproduces_hf_logits(scout, scout_float):
    path, ref = scout
    out, out_logits = scout_float
    assert rel_err(out_logits, ref) <= PARITY
    files = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "README.md", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
            "generation_config.json"} <= files
    assert not any(n.startswith(".") or n.endswith(".incomplete") for n in files)
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["dtype"] == "bfloat16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f for f in files if f.startswith("model-")}
    t = tensors(out)
    assert set(index["weight_map"]) == set(t)
    experts = t[f"{SCOUT_LAYER0}.feed_forward.experts.gate_up_proj.weight"]
    assert experts.dtype == mx.bfloat16 and experts.shape == (4, 128, 64)  # fused gate|up, [E, out, in]
    assert "library_name: mlx" in (out / "README.md").read_text()


@pytest.fixture(scope="module")
def plain_scout(tmp_path_factory):
    """A multimodal Scout-like model in bf16 with the text weights of ``scale_text_weights`` (so that every
    layer moves the logits) and no ``make_confident`` boost, and its float conversion: (source, float folder)."""
    hf = scale_text_weights(build_wide_hf("scout", seed=5), seed=6, qk_norm_gain=QK_NORM_GAIN["scout"])
    root = tmp_path_factory.mktemp("plain_scout")
    src = save_hf(hf, root / "hf", dtype=torch.bfloat16)
    return src, run_convert(src, root / "float").path


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_quantized_logits_equal_the_float_model_with_rounded_weights(plain_scout, tmp_path, recipe):
    """Only float32 rounding may differ (measured: 0 for affine, at most 1.6e-6 for mxfp4 / nvfp4 / mxfp8);
    losing the shared expert moves these logits by ~1 and zeroing one routed expert by ~0.35."""
    src, float_path = plain_scout
    out = run_convert(src, tmp_path / recipe, **RECIPES[recipe]).path
    assert rel_err(logits(out), fake_quantized_logits(float_path, out)) <= PARITY


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_agrees_with_float_and_follows_policy(scout, scout_float, tmp_path, bits):
    out = run_convert(scout[0], tmp_path / f"q{bits}", quantize=True, q_bits=bits).path
    quantized = logits(out)
    assert rel_err(quantized, scout_float[1]) <= QUANT_ERROR[f"q{bits}"]
    assert argmax_agreement(quantized, scout_float[1]) >= AGREEMENT
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q == {"group_size": 64, "bits": bits, "mode": "affine"}
    t = tensors(out)
    # experts quantized along the input: fused gate|up stays one [E, 2I, D * bits / 32] tensor
    gate_up = f"{SCOUT_LAYER0}.feed_forward.experts.gate_up_proj"
    assert t[gate_up + ".weight"].shape == (4, 128, 64 * bits // 32) and t[gate_up + ".weight"].dtype == mx.uint32
    assert t[gate_up + ".scales"].shape == (4, 128, 1)
    # the packed tensors are exactly mx.quantize of the float conversion's weights (bf16)
    ref = tensors(scout_float[0])[gate_up + ".weight"]
    w, s, b = mx.quantize(ref, group_size=64, bits=bits)
    assert mx.array_equal(w, t[gate_up + ".weight"]) and mx.array_equal(s, t[gate_up + ".scales"])
    # policy: the router, norms and the vision tower stay float; embeddings and lm_head are quantized
    assert f"{SCOUT_LAYER0}.feed_forward.router.scales" not in t
    assert t[f"{SCOUT_LAYER0}.feed_forward.router.weight"].dtype == mx.bfloat16
    assert t[f"{SCOUT_LAYER0}.input_layernorm.weight"].dtype == mx.bfloat16
    assert not any(k.startswith(("vision_model.", "multi_modal_projector.")) and k.endswith(".scales") for k in t)
    assert "language_model.lm_head.scales" in t and "language_model.model.embed_tokens.scales" in t


def test_mixed_recipe_and_vision_quantization(scout, scout_float, tmp_path):
    out = run_convert(scout[0], tmp_path / "mixed", **RECIPES["mixed_3_6"]).path
    quantized = logits(out)
    assert rel_err(quantized, scout_float[1]) <= QUANT_ERROR["mixed_3_6"]
    assert argmax_agreement(quantized, scout_float[1]) >= AGREEMENT
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert {k: q[k] for k in ("group_size", "bits", "mode")} == {"group_size": 64, "bits": 3, "mode": "affine"}
    assert f"{SCOUT_LAYER0}.feed_forward.experts.gate_up_proj" not in q  # experts at the top-level 3 bits
    for path in ("language_model.lm_head", "language_model.model.embed_tokens", f"{SCOUT_LAYER0}.self_attn.q_proj",
                 f"{SCOUT_LAYER0}.feed_forward.shared_expert.down_proj", "vision_model.model.layers.0.mlp.fc1"):
        assert q[path]["bits"] == 6, path
    t = tensors(out)
    assert f"{SCOUT_LAYER0}.feed_forward.router.scales" not in t
    assert "vision_model.patch_embedding.linear.scales" not in t  # 588 inputs: not a multiple of the group
    # what load_model built follows the per-layer entries
    model = load_model(out, dtype=mx.float32)
    layer0 = model.language_model.model.layers[0]
    assert layer0.feed_forward.experts.gate_up_proj.bits == 3 and layer0.self_attn.q_proj.bits == 6
    assert model.language_model.model.embed_tokens.bits == 6
    assert type(layer0.feed_forward.router) is nn.Linear  # never quantized


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_float_quantization_modes(scout, scout_float, tmp_path, mode):
    out = run_convert(scout[0], tmp_path / mode, **RECIPES[mode]).path
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["mode"] == mode and (q["bits"], q["group_size"]) == {"mxfp4": (4, 32), "nvfp4": (4, 16),
                                                                    "mxfp8": (8, 32)}[mode]
    quantized = logits(out)
    assert rel_err(quantized, scout_float[1]) <= QUANT_ERROR[mode]
    assert argmax_agreement(quantized, scout_float[1]) >= AGREEMENT


def test_bad_quantization_options_are_refused_before_any_work(scout, tmp_path):
    cases = [
        (dict(quantize=True, q_mode="mxfp4", q_bits=3), "mxfp4 quantization uses 4 bits with group size 32"),
        (dict(quantize=True, q_bits=7), "supports"),
        (dict(quantize=True, q_group_size=16), "group sizes"),
        (dict(quant_recipe="mixed_3_6", q_mode="nvfp4"), "mixed recipes use affine"),
        (dict(quant_recipe="mixed_6_3"), "must not exceed"),
        (dict(quant_recipe="fancy"), "unknown quantization recipe"),
    ]
    for kwargs, message in cases:
        with pytest.raises(QuantizationOptionError, match=message):
            run_convert(scout[0], tmp_path / "out", **kwargs)
    with pytest.raises(ConvertError, match="either quantize or dequantize"):
        run_convert(scout[0], tmp_path / "out", quantize=True, dequantize=True)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


# -- other source layouts ------------------------------------------------------------------------------------------


def test_per_expert_layout(maverick, maverick_float, tmp_path):
    hf, _, ref = maverick
    src = save_per_expert(hf, tmp_path / "per_expert")
    assert "model.layers.1.feed_forward.experts.3.down_proj.weight" in header(src / "model.safetensors")
    assert rel_err(logits(src), ref) <= PARITY  # load() reads it directly
    out = run_convert(src, tmp_path / "float").path
    assert rel_err(logits(out), ref) <= PARITY
    for bits in (4, 8):
        out = run_convert(src, tmp_path / f"q{bits}", quantize=True, q_bits=bits).path
        assert argmax_agreement(logits(out), maverick_float[1]) >= AGREEMENT


def test_fp8_layouts(maverick, tmp_path):
    hf = maverick[0]
    src, deq_model = save_fp8(hf, tmp_path / "fp8")
    ref = hf_logits(deq_model, IDS)  # transformers with the dequantized weights
    raw = header(src / "model.safetensors")
    assert raw["model.layers.1.feed_forward.experts.0.gate_proj.weight"]["dtype"] == "F8_E4M3"
    assert raw["model.layers.1.feed_forward.experts.0.gate_proj.weight_scale"]["shape"] == [64, 1]
    assert rel_err(logits(src), ref) <= PARITY  # load() dequantizes on the fly
    out = run_convert(src, tmp_path / "float32", dtype="float32").path
    assert rel_err(logits(out), ref) <= PARITY
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    float_logits = logits(out)
    out = run_convert(src, tmp_path / "bf16").path  # default: the source's bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert argmax_agreement(logits(out), float_logits) == 1.0
    out = run_convert(src, tmp_path / "q8", quantize=True, q_bits=8).path
    assert argmax_agreement(logits(out), float_logits) >= AGREEMENT
    out = run_convert(src, tmp_path / "q4", quantize=True, q_bits=4).path
    assert argmax_agreement(logits(out), float_logits) >= AGREEMENT
    # transformers' fbgemm FP8 layout: fused experts with per-column scales
    src, deq_model = save_fp8_fbgemm(hf, tmp_path / "fbgemm")
    assert rel_err(logits(src), hf_logits(deq_model, IDS)) <= PARITY


def test_sharded_source_and_output_shards(maverick, tmp_path):
    hf, _, ref = maverick
    src = save_hf(hf, tmp_path / "sharded", max_shard_size="100KB")
    assert len(list(src.glob("*.safetensors"))) > 3
    result = run_convert(src, tmp_path / "out", max_shard_size="64KB")
    assert len(result.shards) > 3
    index = json.loads((result.path / "model.safetensors.index.json").read_text())
    for name in result.shards:
        f = mx.load(str(result.path / name))
        size = (result.path / name).stat().st_size
        assert size <= 64_000 + 4096 or len(f) == 1, (name, size, len(f))  # header overhead; lone big tensors
        assert all(index["weight_map"][k] == name for k in f)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors(result.path).values())
    assert rel_err(logits(result.path), ref) <= PARITY


# -- checkpoints written by mlx-vlm and mlx-lm ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_style_scout(tmp_path_factory):
    """float32 multimodal checkpoint with the Hub's transformers-4 config spellings (which mlx-vlm needs)."""
    hf = build_wide_hf("scout", seed=4)
    make_confident(hf, IDS)
    return hub_style_config(save_hf(hf, tmp_path_factory.mktemp("hub_style") / "hf")), hf_logits(hf, IDS)


@pytest.mark.parametrize("recipe", [None, "q4", "mixed_3_6"])
def test_mlx_vlm_checkpoint(hub_style_scout, tmp_path, recipe):
    """load() reads what mlx-vlm's converter writes (separate SwitchGLU gate/up, quantized router, per-layer
    quantization entries keyed by mlx-vlm's module names) with mlx-vlm's logits on text.

    mlx-vlm's qk-norm uses eps 1e-6 instead of rms_norm_eps (1e-5), so the two differ by ~1e-4 even in float32;
    ours matches transformers on the float checkpoint."""
    from mlx_vlm.convert import convert as vlm_convert
    from mlx_vlm.utils import load_model as vlm_load

    src, ref = hub_style_scout
    out = tmp_path / "vlm"
    kwargs = {None: dict(), "q4": dict(quantize=True, q_bits=4, q_group_size=64),
              "mixed_3_6": dict(quantize=True, quant_predicate="mixed_3_6")}[recipe]
    vlm_convert(str(src), str(out), **kwargs)
    names = set(mx.load(str(out / "model.safetensors")))
    assert f"{SCOUT_LAYER0}.feed_forward.experts.gate_proj.weight" in names
    theirs = np.array(vlm_load(out).language_model(mx.array(IDS)).logits)
    ours = logits(out)
    assert rel_err(ours, theirs) <= 5e-4 and argmax_agreement(ours, theirs) == 1.0
    if recipe is None:
        assert rel_err(ours, ref) <= PARITY
        return
    # older mlx-lm / mlx-vlm files name the SwitchGLU ``switch_mlp``
    renamed = copy_folder(out, tmp_path / "switch_mlp")
    t = mx.load(str(renamed / "model.safetensors"))
    mx.save_safetensors(str(renamed / "model.safetensors"),
                        {k.replace(".experts.", ".switch_mlp."): v for k, v in t.items()})
    index = renamed / "model.safetensors.index.json"  # the strict reader refuses an index naming absent tensors
    index.write_text(index.read_text().replace(".experts.", ".switch_mlp."))
    assert rel_err(logits(renamed), ours) <= 1e-6
    # the converter reads it too: kept packed (re-laid out, gate|up fused) or dequantized
    kept = run_convert(out, tmp_path / "kept").path
    assert rel_err(logits(kept), ours) <= 1e-5
    assert json.loads((kept / "config.json").read_text())["quantization"]["bits"] == (4 if recipe == "q4" else 3)
    deq = run_convert(out, tmp_path / "deq", dequantize=True, dtype="float32").path
    assert "quantization" not in json.loads((deq / "config.json").read_text())
    assert rel_err(logits(deq), ours) <= PARITY


def test_mlx_lm_checkpoint(hub_style_scout, tmp_path):
    """mlx-lm writes text-only MLX checkpoints (vision tensors and vision_config dropped)."""
    from mlx_lm.convert import convert as lm_convert
    from mlx_lm.utils import load_model as lm_load

    src, _ = hub_style_scout
    out = tmp_path / "lm"
    lm_convert(str(src), str(out), quantize=True, q_bits=4, q_group_size=64)
    theirs = np.array(lm_load(out)[0](mx.array(IDS)))
    model = load_model(out, dtype=mx.float32)
    assert model.config.vision is None
    ours = np.array(model(mx.array(IDS)))
    assert rel_err(ours, theirs) <= 5e-4 and argmax_agreement(ours, theirs) == 1.0


def test_text_only_checkpoint_with_vision_config_loads_text_model(hub_style_scout, tmp_path):
    src = copy_folder(hub_style_scout[0], tmp_path / "src")
    t = mx.load(str(src / "model.safetensors"))
    mx.save_safetensors(str(src / "model.safetensors"),
                        {k: v for k, v in t.items() if not k.startswith(("vision_model.", "multi_modal_projector."))})
    with pytest.warns(UserWarning, match="no vision tensors"):
        model = load_model(src, dtype=mx.float32)
    assert model.config.vision is None
    assert rel_err(np.array(model(mx.array(IDS))), hub_style_scout[1]) <= PARITY


# -- the Hub -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_repo(maverick, tmp_path_factory):
    """A Hub repo: a sharded checkpoint, plus files a conversion must not download."""
    root = tmp_path_factory.mktemp("hub")
    repo = save_hf(maverick[0], root / "repo", max_shard_size="100KB")
    (repo / "original").mkdir()
    (repo / "original" / "consolidated.00.pth").write_bytes(b"\0" * 4096)
    (repo / "README.md").write_text("---\nlicense: other\n---\n")
    (repo / "LICENSE").write_text("license text")
    (repo / "stale-00001-of-00001.safetensors").write_bytes(b"\0" * 4096)  # not in the index
    return repo


def test_cli_converts_from_hub_with_only_the_needed_files(hub_repo, maverick, tmp_path):
    with HubStub({"org/tiny": hub_repo}) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
                   HF_HUB_DISABLE_XET="1")
        env.pop("HF_HUB_OFFLINE", None)
        cmd = [sys.executable, "-m", "mlx_llama4.convert", "--hf-path", "org/tiny", "--mlx-path",
               str(tmp_path / "out"), "--quiet"]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        fetched = set(hub.fetched("GET"))
    needed = {p.name for p in hub_repo.iterdir() if p.is_file()} - {"stale-00001-of-00001.safetensors"}
    assert fetched == needed
    assert rel_err(logits(tmp_path / "out"), maverick[2]) <= PARITY
    assert "base_model: org/tiny" in (tmp_path / "out" / "README.md").read_text()

    # an unknown repo: a clear error, no output
    with HubStub({}) as hub:
        env["HF_ENDPOINT"] = hub.url
        cmd[cmd.index("org/tiny")] = "org/missing"
        result = subprocess.run(cmd[:-2] + [str(tmp_path / "out2")], env=env, capture_output=True, text=True,
                                timeout=120)
    assert result.returncode == 2 and "org/missing: not found on the Hugging Face Hub" in result.stderr
    assert not (tmp_path / "out2").exists()


def test_hub_download_resumes_after_a_dropped_connection(hub_repo, maverick, tmp_path, monkeypatch):
    from huggingface_hub import constants

    shard = next(hub_repo.glob("model-00001-of-*.safetensors")).name
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16384)  # so that part of the file is on disk when dropped
    with HubStub({"org/tiny": hub_repo}, drop_once={shard: 0.6}) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)  # what HF_ENDPOINT sets when the client is imported
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        out = run_convert("org/tiny", tmp_path / "out").path
        resumed = [r for m, p, r in hub.requests if m == "GET" and p.endswith(shard) and r]
    assert resumed and resumed[0].startswith("bytes=") and int(resumed[0][6:-1]) > 0
    cached = next((tmp_path / "cache").rglob(shard))
    assert cached.read_bytes() == (hub_repo / shard).read_bytes()
    assert rel_err(logits(out), maverick[2]) <= PARITY


@pytest.mark.parametrize("large_folder_api", [False, True])
def test_upload_creates_the_repo_then_uploads_the_folder(maverick, tmp_path, monkeypatch, large_folder_api):
    """huggingface_hub 2 has only ``upload_folder`` (resumable through hf_xet); older versions' resumable
    ``upload_large_folder`` is preferred where it exists (given to HfApi here, as those versions had it)."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, **kw: calls.append(("create_repo", kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload_folder", kw)))
    if large_folder_api:
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_large_folder",
                            lambda self, **kw: calls.append(("upload_large_folder", kw)), raising=False)
    else:
        monkeypatch.delattr(huggingface_hub.HfApi, "upload_large_folder", raising=False)
    out = run_convert(maverick[1], tmp_path / "out", upload_repo="me/tiny-mlx").path
    assert [name for name, _ in calls] == ["create_repo",
                                           "upload_large_folder" if large_folder_api else "upload_folder"]
    assert calls[0][1] == dict(repo_id="me/tiny-mlx", repo_type="model", exist_ok=True)
    upload = calls[1][1]
    assert (upload["repo_id"], upload["folder_path"], upload["repo_type"]) == ("me/tiny-mlx", str(out), "model")


# -- bad inputs, existing output, interruption ---------------------------------------------------------------------


@pytest.fixture
def sharded_copy(hub_repo, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in hub_repo.iterdir():
        if f.is_file() and not f.name.startswith("stale"):
            (src / f.name).write_bytes(f.read_bytes())
    return src


def _assert_no_output(tmp_path):
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / ".out.partial").exists()


def test_truncated_shard(sharded_copy, tmp_path):
    f = sharded_copy / "model-00002-of-00012.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00012.safetensors: truncated"):
        run_convert(sharded_copy, tmp_path / "out")
    _assert_no_output(tmp_path)


def test_index_and_shards_disagree(sharded_copy, tmp_path):
    index, shard = sharded_copy / "model.safetensors.index.json", sharded_copy / "model-00003-of-00012.safetensors"
    data, content = json.loads(index.read_text()), shard.read_bytes()
    shard.unlink()
    with pytest.raises(CheckpointError, match="lists shards that are missing: model-00003-of-00012.safetensors"):
        run_convert(sharded_copy, tmp_path / "out")
    # a shard that is present but not in the index: its tensors are missing, and the error says why
    shard.write_bytes(content)
    moved = sorted(k for k, v in data["weight_map"].items() if v == shard.name)
    index.write_text(json.dumps({**data, "weight_map": {k: v for k, v in data["weight_map"].items() if k not in moved}}))
    with pytest.raises(CheckpointError, match="missing tensor") as e:
        run_convert(sharded_copy, tmp_path / "out")
    assert f"files not in its index, not read: {shard.name}" in str(e.value) and moved[0] in str(e.value)
    # the index places a tensor in the wrong shard
    index.write_text(json.dumps({**data, "weight_map": {**data["weight_map"], moved[0]: "model-00001-of-00012.safetensors"}}))
    with pytest.raises(CheckpointError, match=f"says '{moved[0]}' is in model-00001-of-00012.safetensors, but it is in "
                                              f"{shard.name}"):
        run_convert(sharded_copy, tmp_path / "out")
    _assert_no_output(tmp_path)


def test_shape_mismatch_and_unknown_architecture(sharded_copy, tmp_path):
    cfg_file = sharded_copy / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match="mis-shaped") as e:
        run_convert(sharded_copy, tmp_path / "out")
    assert "layers.1.feed_forward.experts.gate_up_proj.weight: checkpoint (4, 128, 64), model (4, 256, 64)" in str(e.value)
    cfg_file.write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(ConfigError, match="unknown architecture LlamaForCausalLM"):
        run_convert(sharded_copy, tmp_path / "out")
    assert main(["--hf-path", str(sharded_copy), "--mlx-path", str(tmp_path / "out"), "--quiet"]) == 2
    _assert_no_output(tmp_path)


def test_existing_output_folder(maverick, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="already exists and is not empty; pass --force"):
        run_convert(maverick[1], out)
    assert (out / "keep.txt").read_text() == "mine"
    run_convert(maverick[1], out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert not list(tmp_path.glob(".out*"))
    assert rel_err(logits(out), maverick[2]) <= PARITY
    (tmp_path / "empty").mkdir()
    assert run_convert(maverick[1], tmp_path / "empty").path == (tmp_path / "empty").absolute()


def test_interruption_resumes_from_finished_shards(maverick, tmp_path, monkeypatch):
    src, out, partial = maverick[1], tmp_path / "out", tmp_path / ".out.partial"
    real = convert_core._write_shard
    calls = []

    def interrupted(shard, *args):
        calls.append(shard.name)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(shard, *args)

    monkeypatch.setattr(convert_core, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_convert(src, out, quantize=True, max_shard_size="40KB")
    monkeypatch.setattr(convert_core, "_write_shard", real)
    assert not out.exists()  # nothing that looks like a result
    assert not (partial / "config.json").exists()
    finished = sorted(p.name for p in partial.glob("model-*.safetensors"))
    assert finished == calls[:3]

    # corrupt one finished shard (same size): it is detected by its hash and written again
    f = partial / finished[1]
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    result = run_convert(src, out, quantize=True, max_shard_size="40KB")
    assert result.shards_reused == 2 and len(result.shards) > 4
    assert not partial.exists()
    reference = run_convert(src, tmp_path / "fresh", quantize=True, max_shard_size="40KB").path
    for name in result.shards:
        assert (out / name).read_bytes() == (reference / name).read_bytes()

    # a partial folder left by other options is discarded, not mixed in
    monkeypatch.setattr(convert_core, "_write_shard", interrupted)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run_convert(src, tmp_path / "other", max_shard_size="40KB")
    monkeypatch.setattr(convert_core, "_write_shard", real)
    result = run_convert(src, tmp_path / "other", quantize=True, q_bits=8, max_shard_size="40KB")
    assert result.shards_reused == 0


def test_cli_main(maverick, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--hf-path", str(maverick[1]), "--mlx-path", str(out), "-q", "--q-bits", "8", "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert main(["--hf-path", str(maverick[1]), "--mlx-path", str(out), "--quiet"]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["--hf-path", str(maverick[1]), "--mlx-path", str(tmp_path / "o2"), "-q", "--q-mode", "mxfp4",
                 "--q-bits", "8", "--quiet"]) == 2
    assert "mxfp4 quantization uses 4 bits" in capsys.readouterr().err
