"""Checkpoint layouts -> our tensor names (mlx_llama4.weights): each layout's planner on small synthetic tensors.

The converter and loader tests run whole checkpoints through these planners; here each layout's edge cases are
checked directly: the names and values produced, reading a block of rows, and the errors for broken layouts.
"""

from __future__ import annotations

import numpy as np
import mlx.core as mx
import pytest

from mlx_llama4.weights import CheckpointError, TensorInfo, plan_layout, sanitize

E, D, I = 3, 8, 4  # experts, hidden, expert width
P = "language_model.model.layers.0.feed_forward.experts"


def rand(*shape, seed=0) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def fp8(x: mx.array) -> mx.array:
    return mx.to_fp8(x)  # float8 e4m3 bytes, as safetensors stores them (read as uint8)


def infos(weights: dict) -> dict:
    return {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in weights.items()}


def getter(weights: dict):
    return lambda name, a, b: weights[name] if a is None else weights[name][a:b]


def assert_rows_match_whole(weights: dict):
    """Every planned entry returns the same rows when read block by block as when read whole, and together the
    entries read each kept checkpoint tensor exactly once."""
    get = getter(weights)
    entries = plan_layout(infos(weights))
    sources = [s for e in entries for s in e.sources]
    assert sorted(sources) == sorted(k for k in weights if not k.endswith(".input_scale"))
    for entry in entries:
        whole = entry.read(get, None, None)
        assert set(whole) == set(entry.outputs), entry.name
        for name, value in whole.items():
            assert tuple(value.shape) == entry.outputs[name].shape and value.dtype == entry.outputs[name].dtype, name
        if entry.rows > 1:
            parts = [entry.read(get, a, min(a + 2, entry.rows)) for a in range(0, entry.rows, 2)]
            for name, value in whole.items():
                assert mx.array_equal(mx.concatenate([p[name] for p in parts]), value), name


def test_hugging_face_fused_experts_become_out_by_in():
    gate_up, down = rand(E, D, 2 * I), rand(E, I, D, seed=1)
    weights = {f"{P}.gate_up_proj": gate_up, f"{P}.down_proj": down}
    out = sanitize(weights)
    assert mx.array_equal(out[f"{P}.gate_up_proj.weight"], gate_up.swapaxes(1, 2))  # (E, 2I, D)
    assert mx.array_equal(out[f"{P}.down_proj.weight"], down.swapaxes(1, 2))  # (E, D, I)
    assert {e.kind for e in plan_layout(infos(weights))} == {"hf-experts"}
    assert_rows_match_whole(weights)


def test_hugging_face_experts_must_be_3d():
    with pytest.raises(CheckpointError, match=r"gate_up_proj: expected a 3-d expert tensor .* \(8, 8\)"):
        plan_layout({f"{P}.gate_up_proj": TensorInfo((D, 2 * I), mx.float32)})


def test_fbgemm_fp8_experts_dequantized_per_output_column():
    gate_up, down = rand(E, D, 2 * I), rand(E, I, D, seed=1)
    gu_scale, down_scale = mx.abs(rand(E, 1, 2 * I, seed=2)) + 0.5, mx.abs(rand(E, D, 1, seed=3)) + 0.5
    weights = {
        f"{P}.gate_up_proj": fp8(gate_up), f"{P}.gate_up_proj_scale": gu_scale,
        f"{P}.down_proj": fp8(down), f"{P}.down_proj_scale": down_scale,  # fbgemm writes the down scale [E, D, 1]
    }
    out = sanitize(weights, fp8_dtype=mx.float32)
    want_gu = mx.from_fp8(fp8(gate_up), dtype=mx.float32) * gu_scale
    want_down = mx.from_fp8(fp8(down), dtype=mx.float32) * down_scale.reshape(E, 1, D)
    assert mx.array_equal(out[f"{P}.gate_up_proj.weight"], want_gu.swapaxes(1, 2))
    assert mx.array_equal(out[f"{P}.down_proj.weight"], want_down.swapaxes(1, 2))
    assert sorted(out) == [f"{P}.down_proj.weight", f"{P}.gate_up_proj.weight"]  # scales consumed
    assert all(e.fp8 for e in plan_layout(infos(weights)))
    assert_rows_match_whole(weights)


def per_expert(fp8_scales: bool = False) -> dict:
    weights = {}
    for i in range(E):
        for proj, shape in (("gate", (I, D)), ("up", (I, D)), ("down", (D, I))):
            w = rand(*shape, seed=10 * i + len(proj))
            name = f"{P}.{i}.{proj}_proj.weight"
            if fp8_scales:
                weights[name], weights[name + "_scale"] = fp8(w), mx.abs(rand(shape[0], 1, seed=i)) + 0.5
            else:
                weights[name] = w
    return weights


@pytest.mark.parametrize("fp8_scales", [False, True], ids=["bf16", "fp8"])
def test_per_expert_weights_are_stacked_and_fused(fp8_scales):
    weights = per_expert(fp8_scales)

    def expert(i, proj):
        w = weights[f"{P}.{i}.{proj}_proj.weight"]
        return mx.from_fp8(w, dtype=mx.float32) * weights[f"{P}.{i}.{proj}_proj.weight_scale"] if fp8_scales else w

    out = sanitize(weights)
    want_gu = mx.stack([mx.concatenate([expert(i, "gate"), expert(i, "up")]) for i in range(E)])  # (E, 2I, D)
    assert mx.array_equal(out[f"{P}.gate_up_proj.weight"], want_gu)
    assert mx.array_equal(out[f"{P}.down_proj.weight"], mx.stack([expert(i, "down") for i in range(E)]))
    assert sorted(out) == [f"{P}.down_proj.weight", f"{P}.gate_up_proj.weight"]
    entries = plan_layout(infos(weights))
    assert {e.kind for e in entries} == {"per-expert"} and all(e.fp8 == fp8_scales for e in entries)
    assert_rows_match_whole(weights)


def test_per_expert_errors_name_the_problem():
    weights = per_expert()
    missing = {k: v for k, v in weights.items() if k != f"{P}.1.up_proj.weight"}
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) missing, e\.g\. .*experts\.1\.up_proj\.weight"):
        plan_layout(infos(missing))
    odd = {**weights, f"{P}.2.gate_proj.weight": rand(I + 1, D)}
    with pytest.raises(CheckpointError, match="gate_proj shapes differ"):
        plan_layout(infos(odd))
    half = {**weights, f"{P}.0.down_proj.weight_scale": mx.ones((D, 1))}
    with pytest.raises(CheckpointError, match="some down_proj experts have a weight_scale, others do not"):
        plan_layout(infos(half))
    crossed = {k: (rand(D, D) if "down" in k else v) for k, v in weights.items()}
    with pytest.raises(CheckpointError, match="do not fit together"):
        plan_layout(infos(crossed))


def switch_glu(quantized: bool, prefix: str = P) -> dict:
    weights = {}
    for proj, (out_dim, in_dim) in (("gate", (I, D)), ("up", (I, D)), ("down", (D, I))):
        w = rand(E, out_dim, in_dim * 8, seed=len(proj))
        if quantized:
            packed, scales, biases = mx.quantize(w, group_size=32, bits=4)
            weights.update({f"{prefix}.{proj}_proj.weight": packed, f"{prefix}.{proj}_proj.scales": scales,
                            f"{prefix}.{proj}_proj.biases": biases})
        else:
            weights[f"{prefix}.{proj}_proj.weight"] = w
    return weights


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4-bit"])
def test_mlx_lm_switch_glu_gate_and_up_are_fused(quantized):
    weights = switch_glu(quantized)
    out = sanitize(weights)
    parts = ("weight", "scales", "biases") if quantized else ("weight",)
    for part in parts:
        want = mx.concatenate([weights[f"{P}.gate_proj.{part}"], weights[f"{P}.up_proj.{part}"]], axis=1)
        assert mx.array_equal(out[f"{P}.gate_up_proj.{part}"], want)
        assert mx.array_equal(out[f"{P}.down_proj.{part}"], weights[f"{P}.down_proj.{part}"])
    assert len(out) == 2 * len(parts)
    kinds = {e.name: (e.kind, e.quantized) for e in plan_layout(infos(weights))}
    assert kinds[f"{P}.gate_up_proj.weight"] == ("split-experts", quantized)
    assert kinds[f"{P}.down_proj.weight"] == (("quantized", True) if quantized else ("copy", False))
    assert_rows_match_whole(weights)


def test_older_switch_mlp_name_is_read_as_experts():
    old = switch_glu(True, prefix=P.replace(".experts", ".switch_mlp"))
    assert sanitize(old).keys() == sanitize(switch_glu(True)).keys()


def test_switch_glu_errors_name_the_problem():
    weights = switch_glu(True)
    with pytest.raises(CheckpointError, match="has .*gate_proj.scales.* but not its up counterpart"):
        plan_layout(infos({k: v for k, v in weights.items() if k != f"{P}.up_proj.scales"}))
    with pytest.raises(CheckpointError, match="gate_proj.weight .* and up_proj.weight .* differ"):
        plan_layout(infos({**weights, f"{P}.up_proj.weight": weights[f"{P}.up_proj.weight"][:, :2]}))
    scales_only = {k: v for k, v in weights.items() if not k.endswith(("gate_proj.weight", "up_proj.weight"))}
    with pytest.raises(CheckpointError, match="scales without weights"):
        plan_layout(infos(scales_only))


def test_fp8_linear_with_per_row_and_per_tensor_scale():
    q = "language_model.model.layers.0.self_attn.q_proj"
    k = "language_model.model.layers.0.self_attn.k_proj"
    wq, wk = rand(6, D), rand(4, D, seed=1)
    row_scale, tensor_scale = mx.abs(rand(6, 1, seed=2)) + 0.5, mx.array([0.25])
    weights = {f"{q}.weight": fp8(wq), f"{q}.weight_scale": row_scale, f"{q}.input_scale": mx.array([1.0]),
               f"{k}.weight": fp8(wk), f"{k}.weight_scale": tensor_scale}
    out = sanitize(weights, fp8_dtype=mx.bfloat16)
    assert sorted(out) == [f"{k}.weight", f"{q}.weight"]  # scales consumed, activation scale dropped
    assert out[f"{q}.weight"].dtype == mx.bfloat16
    want_q = (mx.from_fp8(fp8(wq), dtype=mx.float32) * row_scale).astype(mx.bfloat16)
    assert mx.array_equal(out[f"{q}.weight"], want_q)
    assert mx.array_equal(out[f"{k}.weight"], (mx.from_fp8(fp8(wk), dtype=mx.float32) * 0.25).astype(mx.bfloat16))
    assert_rows_match_whole(weights)
    with pytest.raises(CheckpointError, match=r"q_proj.weight: has a weight_scale, so float8 data is expected"):
        plan_layout(infos({f"{q}.weight": wq, f"{q}.weight_scale": row_scale}))


def test_quantized_linear_and_plain_tensors():
    q = "language_model.model.layers.0.self_attn.q_proj"
    packed, scales, biases = mx.quantize(rand(8, 64), group_size=32, bits=4)
    norm = "language_model.model.layers.0.input_layernorm.weight"
    weights = {f"{q}.weight": packed, f"{q}.scales": scales, f"{q}.biases": biases, norm: rand(D)}
    entries = {e.name: e for e in plan_layout(infos(weights))}
    assert set(entries) == {f"{q}.weight", norm}
    assert entries[f"{q}.weight"].quantized and set(entries[f"{q}.weight"].outputs) == {
        f"{q}.weight", f"{q}.scales", f"{q}.biases"}
    assert entries[norm].kind == "copy" and entries[norm].module == "language_model.model.layers.0.input_layernorm"
    out = sanitize(weights)
    assert all(mx.array_equal(out[n], weights[n]) for n in weights)
    assert_rows_match_whole(weights)


def test_text_only_names_dropped_buffers_and_collisions():
    weights = {
        "model.embed_tokens.weight": rand(10, D),
        "lm_head.weight": rand(10, D, seed=1),
        "model.layers.0.self_attn.rotary_emb.inv_freq": rand(I),
        "vision_model.rotary_embedding.freqs_ci": rand(4),
        "model.layers.0.position_ids": mx.arange(4),
    }
    out = sanitize(weights)
    assert sorted(out) == ["language_model.lm_head.weight", "language_model.model.embed_tokens.weight"]
    assert mx.array_equal(out["language_model.lm_head.weight"], weights["lm_head.weight"])
    both = {"model.norm.weight": rand(D), "language_model.model.norm.weight": rand(D)}
    with pytest.raises(CheckpointError, match="both map to 'language_model.model.norm.weight'"):
        plan_layout(infos(both))


def test_unknown_tensors_pass_through_for_the_shape_check():
    weights = {"something.else": rand(3), "x.scales": rand(2, 2)}  # companions without a weight stay as they are
    assert {e.name: e.kind for e in plan_layout(infos(weights))} == {"something.else": "copy", "x.scales": "copy"}
