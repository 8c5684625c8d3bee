"""One strict reader of safetensors indexes and shards (mlx_llama4.safetensors_reader) for the loader and the
converter: each broken folder gives the same clear error through ``load_model`` and through ``convert``."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

from checkpoints import build_hf_model, save_hf_model
from mlx_llama4 import CheckpointError, load_model
from mlx_llama4.convert import convert

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny text-only checkpoint in several shards, with an index."""
    path = save_hf_model(build_hf_model("maverick", vision=False), tmp_path_factory.mktemp("sharded") / "hf",
                         max_shard_size="20KB")
    assert len(list(path.glob("*.safetensors"))) >= 3
    return path


@pytest.fixture
def folder(sharded, tmp_path):
    return shutil.copytree(sharded, tmp_path / "src")


def shards(folder) -> list:
    return sorted(folder.glob("*.safetensors"))


def weight_map(folder) -> dict:
    return json.loads((folder / INDEX).read_text())["weight_map"]


def write_index(folder, mapping) -> None:
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": mapping}))


def same_error(folder, tmp_path, match: str) -> str:
    """Load and convert ``folder``; both must refuse it with the same message, which matches ``match``."""
    with pytest.raises(CheckpointError, match=match) as loaded:
        load_model(folder)
    with pytest.raises(CheckpointError) as converted:
        convert(folder, tmp_path / "out", verbose=False)
    assert str(converted.value) == str(loaded.value)
    assert not (tmp_path / "out").exists()
    return str(loaded.value)


def test_index_not_json(folder, tmp_path):
    (folder / INDEX).write_text("{not json")
    same_error(folder, tmp_path, f"{INDEX}: not a valid safetensors index")


@pytest.mark.parametrize("content", [{"metadata": {}}, {"weight_map": ["a", "b"]}, {"weight_map": {"a": 1}}])
def test_index_without_a_weight_map_object(folder, tmp_path, content):
    (folder / INDEX).write_text(json.dumps(content))
    same_error(folder, tmp_path, f"{INDEX}: not a valid safetensors index")


def test_index_names_a_missing_shard(folder, tmp_path):
    gone = shards(folder)[1]
    gone.unlink()
    same_error(folder, tmp_path, f"lists shards that are missing: {gone.name}")


def test_index_points_to_the_wrong_shard(folder, tmp_path):
    mapping = weight_map(folder)
    first, second = shards(folder)[:2]
    name = next(k for k, v in mapping.items() if v == second.name)
    write_index(folder, {**mapping, name: first.name})
    same_error(folder, tmp_path, f"says '{name}' is in {first.name}, but it is in {second.name}")


def test_tensor_in_two_shards(folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    first, second = shards(folder)[:2]
    a, b = load_file(first), load_file(second)
    extra = next(iter(b))
    save_file({**a, extra: b[extra]}, first)
    same_error(folder, tmp_path, f"tensor '{extra}' is in both {first.name} and {second.name}")


def test_truncated_shard(folder, tmp_path):
    f = shards(folder)[-1]
    f.write_bytes(f.read_bytes()[:-10])
    same_error(folder, tmp_path, f"{f.name}: truncated: its header describes")


def test_header_not_json(folder, tmp_path):
    f = shards(folder)[0]
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    f.write_bytes(raw[:8] + b"!" + raw[9 : 8 + n] + raw[8 + n :])
    same_error(folder, tmp_path, f"{f.name}: safetensors header is not valid JSON")


def test_unsupported_dtype(folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    f = shards(folder)[0]
    tensors = load_file(f)
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name].astype(np.float64)}, f)
    same_error(folder, tmp_path, f"tensor '{name}' has unsupported dtype F64")


def test_no_shards_at_all(folder, tmp_path):
    (folder / INDEX).unlink()
    for f in shards(folder):
        f.unlink()
    same_error(folder, tmp_path, r"no \*\.safetensors files in")


def test_unlisted_shard_is_not_read_and_is_named(folder, tmp_path):
    """A shard that the index leaves out: its tensors are missing; both say which file was not read."""
    mapping, left_out = weight_map(folder), shards(folder)[-1]
    write_index(folder, {k: v for k, v in mapping.items() if v != left_out.name})
    with pytest.warns(UserWarning, match=f"does not name are not read: {left_out.name}"):
        with pytest.raises(CheckpointError, match="missing tensor"):
            load_model(folder)
    with pytest.raises(CheckpointError, match=f"files not in its index, not read: {left_out.name}"):
        convert(folder, tmp_path / "out", verbose=False)
