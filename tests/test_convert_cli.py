"""Converter options and what a converted folder keeps of its source: every affine bit width the installed MLX
accepts, the source's license files, and a model card that keeps the source card's metadata."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest

from convert_checkpoints import build_wide_hf, save_hf
from hub_stub import HubStub
from mlx_llama4 import load_model
from mlx_llama4.convert import convert, main
from mlx_llama4.convert import QuantizationOptionError, make_policy
from mlx_llama4.convert.policy import affine_bits

IDS = mx.array(np.arange(1, 20)[None])

CARD = """---
license: other
license_name: llama4
license_link: LICENSE
language:
- en
- de
base_model: meta-llama/Llama-4-Scout-17B-16E
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- facebook
- meta
- llama
extra_gated_prompt: |-
  **LLAMA 4 COMMUNITY LICENSE AGREEMENT**
  Llama 4 Version Effective Date: April 5, 2025
extra_gated_fields:
  First Name: text
  Date of birth: date_picker
  Country: country
extra_gated_heading: Please be sure to provide your full legal name.
---

# The source's own card text, which does not describe the MLX weights
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny text-only checkpoint (width 64: quantization groups fit) with a license and a Hub-style card."""
    path = save_hf(build_wide_hf("maverick", seed=3, vision=False), tmp_path_factory.mktemp("src") / "hf")
    (path / "LICENSE").write_text("LLAMA 4 COMMUNITY LICENSE AGREEMENT\n...\n")
    (path / "USE_POLICY.md").write_text("# Llama 4 Acceptable Use Policy\n")
    (path / "NOTICE.txt").write_text("Llama 4 is licensed under the Llama 4 Community License.\n")
    (path / "README.md").write_text(CARD)
    return path


def card_metadata(folder) -> dict:
    from huggingface_hub import metadata_load

    return metadata_load(folder / "README.md")


@pytest.mark.parametrize("bits", range(1, 9))
def test_accepted_widths_are_exactly_those_of_the_installed_mlx(bits):
    try:
        mx.quantize(mx.ones((2, 64)), group_size=64, bits=bits)
    except ValueError:
        with pytest.raises(QuantizationOptionError, match=f"got {bits}"):
            make_policy(q_bits=bits)
    else:
        assert make_policy(q_bits=bits).default.bits == bits


@pytest.mark.parametrize("bits", affine_bits())
def test_every_affine_width_converts_and_loads(source, tmp_path, bits):
    out = tmp_path / "out"
    assert main(["--hf-path", str(source), "--mlx-path", str(out), "-q", "--q-bits", str(bits), "--quiet"]) == 0
    model = load_model(out, dtype=mx.float32)
    experts = model.language_model.model.layers[1].feed_forward.experts.gate_up_proj
    assert experts.bits == bits and experts.group_size == 64
    assert np.isfinite(np.array(model(IDS))).all()


def test_unsupported_width_is_refused_naming_the_accepted_ones(source, tmp_path, capsys):
    assert main(["--hf-path", str(source), "--mlx-path", str(tmp_path / "out"), "-q", "--q-bits", "7"]) == 2
    err = capsys.readouterr().err
    assert f"supports {', '.join(map(str, affine_bits()))} bits" in err and "got 7" in err
    assert not (tmp_path / "out").exists()


def test_license_files_and_card_metadata_are_kept(source, tmp_path):
    out = convert(source, tmp_path / "out", verbose=False).path
    for name in ("LICENSE", "USE_POLICY.md", "NOTICE.txt"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    meta, src = card_metadata(out), card_metadata(source)
    for key in ("license", "license_name", "license_link", "language", "extra_gated_prompt", "extra_gated_fields",
                "extra_gated_heading"):
        assert meta[key] == src[key], key
    assert meta["library_name"] == "mlx" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["facebook", "meta", "llama", "mlx", "llama4", "mlx-llama4"]
    assert "base_model" not in meta  # a local folder names no repo (the source's own base model is not ours)
    text = (out / "README.md").read_text()
    assert "The source's own card text" not in text and "`LICENSE`, `NOTICE.txt`, `USE_POLICY.md`" in text


def test_from_the_hub_base_model_is_the_source_repo(source, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with HubStub({"org/tiny": source}) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        out = convert("org/tiny", tmp_path / "out", verbose=False).path
        fetched = set(hub.fetched("GET"))
    assert {"LICENSE", "USE_POLICY.md", "NOTICE.txt", "README.md"} <= fetched
    meta = card_metadata(out)
    assert meta["base_model"] == "org/tiny" and meta["license_name"] == "llama4"
    assert (out / "LICENSE").read_bytes() == (source / "LICENSE").read_bytes()


def test_uploaded_card_names_the_repo(source, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, **kw: None)
    name = "upload_large_folder" if hasattr(huggingface_hub.HfApi, "upload_large_folder") else "upload_folder"
    monkeypatch.setattr(huggingface_hub.HfApi, name, lambda self, **kw: None)
    out = convert(source, tmp_path / "out", upload_repo="me/tiny-mlx", verbose=False).path
    text = (out / "README.md").read_text()
    assert "# me/tiny-mlx" in text and 'load("me/tiny-mlx")' in text
    assert card_metadata(out)["license"] == "other"


def test_malformed_card_front_matter_warns_and_converts(source, tmp_path, capsys):
    src = shutil.copytree(source, tmp_path / "src")
    (src / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    out = convert(src, tmp_path / "out").path
    assert "README.md: cannot read the model card's YAML front matter" in capsys.readouterr().err
    assert card_metadata(out)["library_name"] == "mlx" and (out / "LICENSE").is_file()
