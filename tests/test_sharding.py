"""Splitting the model across processes, the parts that need no communication (one process's share is loaded
here with a stand-in group): which slice of each tensor a process holds, in every checkpoint layout (float,
per-expert, FP8, quantized); the memory that loading a share takes; clear errors for models that cannot be
split; the pipeline's layer split. The sharded model's outputs under ``mlx.launch`` are checked by
test_sharding_launch.py."""

import re

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_llama4 import CheckpointError, load_model
from mlx_llama4.pipeline import split_layers
from mlx_llama4.sharding import ShardingError
from sharding_checkpoints import FakeGroup, write_checkpoints

# How the shares of each text-layer tensor fit together (README.md, "Several Macs"): stacked along the rows
# (q/k/v heads, MLP widths, routed experts) or side by side along the input (o_proj, down_proj).
ROWS, COLUMNS = 0, -1
EXPECTED = (
    (r"self_attn\.[qkv]_proj\.", ROWS),
    (r"self_attn\.o_proj\.", COLUMNS),
    (r"feed_forward\.experts\.", ROWS),
    (r"feed_forward\.(shared_expert\.)?(gate|up)_proj\.", ROWS),
    (r"feed_forward\.(shared_expert\.)?down_proj\.", COLUMNS),
)


def expected_axis(name: str):
    if not name.startswith("language_model.model.layers."):
        return None
    return next((axis for pattern, axis in EXPECTED if re.search(pattern, name)), None)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("sharding"), layouts=True)


def parameters(model) -> dict:
    return dict(tree_flatten(model.parameters()))


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("layout", ["float", "per-expert", "fp8", "fp8-fbgemm", "q4", "mxfp4"])
def test_shares_put_together_are_the_whole_model(checkpoints, layout, n):
    whole = parameters(load_model(checkpoints[layout], dtype=mx.float32))
    shares = [parameters(load_model(checkpoints[layout], dtype=mx.float32, group=FakeGroup(r, n)))
              for r in range(n)]
    for share in shares:
        assert set(share) == set(whole)
    split = 0
    for name, full in whole.items():
        parts = [share[name] for share in shares]
        axis = expected_axis(name)
        if axis is None:  # held whole by every process
            assert all(mx.array_equal(p, full) for p in parts), name
            continue
        shape = list(full.shape)
        shape[axis] //= n
        assert all(list(p.shape) == shape for p in parts), (name, full.shape, [p.shape for p in parts])
        assert mx.array_equal(mx.concatenate(parts, axis=axis), full), name
        split += 1
    assert split >= 4 * 4  # q, k, v, o of every layer at least


@pytest.mark.parametrize("layout", ["float", "q4"])
def test_loading_a_share_holds_the_share_and_one_tensor(checkpoints, layout):
    """MLX's peak memory while one process of 4 loads: its share plus at most one whole tensor (an input-axis
    split reads the tensor, then keeps its columns); far below loading the whole model."""

    def load_peak(**kw):
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        model = load_model(checkpoints[layout], dtype=mx.float32, **kw)
        return model, mx.get_peak_memory() - base

    whole, whole_peak = load_peak()
    largest = max(a.nbytes for a in parameters(whole).values())
    del whole
    share, peak = load_peak(group=FakeGroup(1, 4))
    share_bytes = sum(a.nbytes for a in parameters(share).values())
    assert peak <= share_bytes + largest, (peak, share_bytes, largest)
    assert peak < 0.5 * whole_peak, (peak, whole_peak)


def test_model_that_cannot_be_split_is_refused_naming_the_numbers(checkpoints):
    with pytest.raises(ShardingError, match=re.escape(
            "cannot split this model across 3 processes by tensor parallelism: num_attention_heads = 8, "
            "num_key_value_heads = 4, num_local_experts = 16, intermediate_size (the shared expert's width) = 128, "
            "intermediate_size_mlp (the dense layers' width) = 128 are not a multiple of 3")):
        load_model(checkpoints["float"], group=FakeGroup(0, 3))
    with pytest.raises(ShardingError, match=r"8 processes .*: num_key_value_heads = 4 is not a multiple of 8\."):
        load_model(checkpoints["float"], group=FakeGroup(0, 8))


def test_quantization_groups_are_never_split(checkpoints, tmp_path):
    """Groups of 64 along the 128 inputs of o_proj and down_proj (2 groups) cannot go to 4 processes."""
    from mlx_llama4.convert import convert

    path = convert(checkpoints["float"], tmp_path / "g64", quantize=True, q_group_size=64, verbose=False).path
    with pytest.raises(CheckpointError, match=r"(o|down)_proj\.scales: its 2 quantization groups along the "
                                              r"input cannot be split evenly across 4 processes"):
        load_model(path, group=FakeGroup(0, 4))
    assert load_model(path, group=FakeGroup(1, 2)).sharding.size == 2  # 2 processes: whole groups


def test_pipeline_share_holds_only_its_layers(checkpoints):
    whole = parameters(load_model(checkpoints["q4"], dtype=mx.float32))
    model = load_model(checkpoints["q4"], dtype=mx.float32, group=FakeGroup(1, 2), parallel="pipeline",
                       layers_per_rank=[1, 3])
    assert [layer is None for layer in model.language_model.model.layers] == [True, False, False, False]
    assert len(model.make_cache()) == 3
    share = parameters(model)
    assert set(share) == {k for k in whole if not k.startswith("language_model.model.layers.0.")}
    assert all(mx.array_equal(share[k], whole[k]) for k in share)
    with pytest.raises(ShardingError, match=r"layers_per_rank \[2, 3\] must give each of the 2 processes at least "
                                            "one layer and add up to the model's 4 layers"):
        load_model(checkpoints["q4"], group=FakeGroup(0, 2), parallel="pipeline", layers_per_rank=[2, 3])


def test_bad_parallel_mode_is_refused(checkpoints):
    with pytest.raises(ValueError, match="parallel must be one of tensor, pipeline, got 'layers'"):
        load_model(checkpoints["float"], group=FakeGroup(0, 2), parallel="layers")
    with pytest.raises(ValueError, match="layers_per_rank splits layers: it needs parallel='pipeline'"):
        load_model(checkpoints["float"], group=FakeGroup(0, 2), layers_per_rank=[2, 2])


@pytest.mark.parametrize("layer_bytes,budgets,expected", [
    ([10] * 8, [1, 1], [4, 4]),
    ([10] * 8, [3, 1], [6, 2]),
    ([10] * 8, [1, 1, 1, 1], [2, 2, 2, 2]),
    ([10, 30, 10, 30, 10, 30], [1, 1], [3, 3]),  # Maverick-like: dense and MoE layers alternate
    ([10] * 3, [100, 1, 1], [1, 1, 1]),  # at least one layer each
])
def test_layers_split_in_proportion_to_memory(layer_bytes, budgets, expected):
    assert split_layers(layer_bytes, budgets) == expected


def test_fewer_layers_than_processes_is_refused():
    with pytest.raises(ShardingError, match="cannot split 2 layers across 3 processes"):
        split_layers([1, 1], [1, 1, 1])
