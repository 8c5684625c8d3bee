"""Checkpoint tensor names -> module names, for every published Llama 4 layout.

All layouts map to one module tree. Routed experts are kept fused (gate | up) and stored ``[E, out, in]`` so that
quantization runs along the input and the fused gate+up stays one gather-matmul. The layouts:

- Hugging Face (the transformers state dict): ``experts.gate_up_proj`` ``[E, D, 2I]`` and ``experts.down_proj``
  ``[E, I, D]``, input-major and without a ``.weight`` suffix; everything else ``[out, in]``. Text-only
  ``Llama4ForCausalLM`` exports have ``model.*`` / ``lm_head.*`` without the ``language_model.`` prefix.
- per-expert (the compressed-tensors / ``OFFLINE_QUANT_COMPATIBLE`` export): ``experts.{i}.{gate,up,down}_proj.weight``
  ``[out, in]``, stacked here.
- FP8: float8 e4m3 ``weight`` (read as uint8) with a per-row ``weight_scale`` ``[out, 1]`` (compressed-tensors, per
  expert), or fbgemm's fused ``experts.gate_up_proj`` + ``gate_up_proj_scale`` ``[E, 1, 2I]`` and ``down_proj`` +
  ``down_proj_scale`` ``[E, D, 1]``; dequantized on the fly (activation ``input_scale`` tensors are dropped).
- mlx-lm / mlx-vlm (mlx-community): SwitchGLU ``experts.{gate,up,down}_proj.{weight,scales,biases}`` ``[E, out, in]``
  (``switch_mlp`` in older files), float or quantized. Gate and up are concatenated along the output rows, which is
  exact for quantized tensors too, since quantization groups run along the input.
- ours (written by ``mlx_llama4.convert``): ``experts.gate_up_proj.{weight,scales,biases}``, ``experts.down_proj.*``.

Planning (``plan_layout``) looks at names, shapes and dtypes only: one planner per layout (``_plan_*``), run in
turn on the tensors that no earlier planner claimed. Each planned ``Entry`` reads rows ``[a:b]`` of its
outputs (along axis 0: output rows, or experts) through a getter, so the converter can stream one block of rows at a
time from files while ``sanitize`` reads whole tensors from a dict of (lazy) arrays.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping, NamedTuple, Optional

import mlx.core as mx


class CheckpointError(ValueError):
    """A checkpoint whose files or tensors do not match its config; the message names the file or tensor."""


class TensorInfo(NamedTuple):
    shape: tuple[int, ...]
    dtype: mx.Dtype


# get(source tensor name, a, b) -> rows [a:b] along axis 0 (the whole tensor when a is None)
Getter = Callable[[str, Optional[int], Optional[int]], mx.array]

# Non-persistent buffers some exporters still write (recomputed from the config) and FP8 activation scales.
_DROPPED = re.compile(
    r"(rotary_emb\.inv_freq|rotary_embedding\.freqs_ci|\.position_ids|\.input_scale|\.input_scale_ub)$"
)
_HF_EXPERTS = re.compile(r"^(?P<p>.+\.feed_forward\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(?P<p>.+\.feed_forward\.experts)\.(?P<i>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")
_SPLIT = re.compile(r"^(?P<p>.+\.feed_forward\.experts)\.(?P<proj>gate|up)_proj\.(?P<part>weight|scales|biases)$")
_QUANT_PARTS = ("weight", "scales", "biases")


def canonical_name(name: str) -> Optional[str]:
    """A checkpoint tensor name in our spelling (before expert restructuring); None for tensors that are dropped."""
    if _DROPPED.search(name):
        return None
    if name.startswith(("model.", "lm_head.")):  # text-only export
        name = "language_model." + name
    return name.replace(".feed_forward.switch_mlp.", ".feed_forward.experts.")


def canonical_module(path: str) -> str:
    """A module path from another layout (e.g. a key of an mlx-vlm ``quantization`` block) in our spelling."""
    name = canonical_name(path + ".weight") or path + ".weight"
    name = re.sub(r"\.feed_forward\.experts\.(gate|up)_proj\.weight$", ".feed_forward.experts.gate_up_proj.weight", name)
    return name[: -len(".weight")]


@dataclass
class Entry:
    """One parameter of our module tree (for quantized layers: the packed weight with its scales and biases).

    ``outputs`` maps every tensor the entry yields to its shape and dtype; all share axis 0 (``rows``).
    ``read(get, a, b)`` returns those tensors' rows ``[a:b]`` (everything when ``a`` is None).
    """

    name: str
    outputs: dict[str, TensorInfo]
    read: Callable[[Getter, Optional[int], Optional[int]], dict[str, mx.array]]
    sources: tuple[str, ...]
    kind: str = "copy"
    quantized: bool = False
    fp8: bool = False

    @property
    def rows(self) -> int:
        shape = self.outputs[self.name].shape
        return shape[0] if shape else 1

    @property
    def module(self) -> Optional[str]:
        """The owning module's path for a weight (``x.weight`` -> ``x``), else None."""
        return self.name[: -len(".weight")] if self.name.endswith(".weight") else None


def _dequant_fp8(w: mx.array, scale: mx.array, dtype: mx.Dtype) -> mx.array:
    """float8 e4m3 bytes (uint8) times a per-row (or per-tensor) scale."""
    s = scale.astype(mx.float32)
    if s.ndim == 1 and s.size == w.shape[0] and s.size > 1:
        s = s[:, None]
    return (mx.from_fp8(w, dtype=mx.float32) * s).astype(dtype)


def _check_fp8(name: str, info: TensorInfo) -> None:
    if info.dtype != mx.uint8:
        raise CheckpointError(f"{name}: has a weight_scale, so float8 data is expected, but its dtype is {info.dtype}")


# canonical name -> (the tensor's name in the checkpoint, its shape and dtype)
Tensors = Mapping[str, tuple[str, TensorInfo]]
# A planner takes the tensors no earlier planner claimed and returns its entries and the names it claimed.
Planner = Callable[[Tensors, mx.Dtype], tuple[list[Entry], set[str]]]


def _read_rows(get: Getter, a, b, *, names: Mapping[str, str]) -> dict[str, mx.array]:
    """Our tensors as they are in the checkpoint: ``names`` maps each output to its source tensor."""
    return {out: get(src, a, b) for out, src in names.items()}


def _read_fp8(get: Getter, a, b, *, name: str, weight: str, scale: str, per_row: bool, dtype: mx.Dtype):
    return {name: _dequant_fp8(get(weight, a, b), get(scale, a, b) if per_row else get(scale, None, None), dtype)}


def _read_hf_experts(get: Getter, a, b, *, name: str, weight: str, scale: Optional[str], n_out: int,
                     dtype: mx.Dtype):
    w = get(weight, a, b)  # (e, in, out)
    if scale is not None:
        w = _dequant_fp8(w, get(scale, a, b).reshape(w.shape[0], 1, n_out), dtype)
    return {name: w.swapaxes(-1, -2)}  # (e, out, in)


def _read_stacked_experts(get: Getter, a, b, *, name: str, projections: tuple, n: int, dtype: mx.Dtype):
    """Experts ``[a:b]``, each the concatenation along its rows of one tensor per projection (gate | up, or
    down); ``projections`` holds, per projection, one ``(weight, scale or None)`` per expert."""

    def load(weight: str, scale: Optional[str]) -> mx.array:
        w = get(weight, None, None)
        return w if scale is None else _dequant_fp8(w, get(scale, None, None), dtype)

    experts = range(a or 0, n if b is None else b)
    return {name: mx.stack([mx.concatenate([load(*proj[i]) for proj in projections]) for i in experts])}


def _read_split_experts(get: Getter, a, b, *, names: Mapping[str, tuple[str, str]]):
    """SwitchGLU: each fused output is its gate tensor and its up tensor concatenated along the output rows."""
    return {out: mx.concatenate([get(gate, a, b), get(up, a, b)], axis=-2) for out, (gate, up) in names.items()}


def _plan_hf_experts(tensors: Tensors, fp8_dtype: mx.Dtype) -> tuple[list[Entry], set[str]]:
    """Hugging Face fused experts, input-major, optionally fbgemm FP8 with a per-output-column scale."""
    entries, claimed = [], set()
    for c in sorted(c for c in tensors if _HF_EXPERTS.match(c)):
        src, info = tensors[c]
        if len(info.shape) != 3:
            raise CheckpointError(f"{src}: expected a 3-d expert tensor [experts, in, out], got shape {info.shape}")
        E, n_in, n_out = info.shape
        scale = tensors[c + "_scale"][0] if c + "_scale" in tensors else None
        claimed.add(c)
        if scale is not None:
            claimed.add(c + "_scale")
            _check_fp8(src, info)
        name = c + ".weight"
        read = partial(_read_hf_experts, name=name, weight=src, scale=scale, n_out=n_out, dtype=fp8_dtype)
        dtype = fp8_dtype if scale is not None else info.dtype
        entries.append(Entry(name, {name: TensorInfo((E, n_out, n_in), dtype)}, read,
                             (src,) + ((scale,) if scale else ()), "hf-experts", fp8=scale is not None))
    return entries, claimed


def _plan_per_expert(tensors: Tensors, fp8_dtype: mx.Dtype) -> tuple[list[Entry], set[str]]:
    """Per-expert Linear weights (bf16 or FP8), stacked into our fused layout."""
    found: dict[str, dict[tuple[str, int], str]] = defaultdict(dict)  # experts prefix -> (proj, i) -> name
    for c in tensors:
        m = _PER_EXPERT.match(c)
        if m:
            found[m["p"]][(m["proj"], int(m["i"]))] = c
    entries, claimed = [], set()
    for p, names in sorted(found.items()):
        n = 1 + max(i for _, i in names)
        missing = [f"{p}.{i}.{proj}_proj.weight" for i in range(n) for proj in ("gate", "up", "down")
                   if (proj, i) not in names]
        if missing:
            raise CheckpointError(f"per-expert layout of {p}: {len(missing)} tensor(s) missing, e.g. {missing[0]}")
        projections, shapes = {}, {}
        for proj in ("gate", "up", "down"):
            weights = [names[(proj, i)] for i in range(n)]
            proj_shapes = {tensors[w][1].shape for w in weights}
            if len(proj_shapes) != 1 or len(next(iter(proj_shapes))) != 2:
                raise CheckpointError(f"per-expert layout of {p}: {proj}_proj shapes differ or are not 2-d: "
                                      f"{proj_shapes}")
            scales = [w + "_scale" if w + "_scale" in tensors else None for w in weights]
            if any(scales) and not all(scales):
                raise CheckpointError(f"per-expert layout of {p}: some {proj}_proj experts have a weight_scale, "
                                      "others do not")
            for w, s in zip(weights, scales):
                if s:
                    _check_fp8(tensors[w][0], tensors[w][1])
            claimed.update(weights + [s for s in scales if s])
            projections[proj] = [(tensors[w][0], tensors[s][0] if s else None) for w, s in zip(weights, scales)]
            shapes[proj] = next(iter(proj_shapes))
        (I, D), up, down = shapes["gate"], shapes["up"], shapes["down"]
        if up != (I, D) or down != (D, I):
            raise CheckpointError(f"per-expert layout of {p}: gate {shapes['gate']}, up {up} and down {down} do not "
                                  "fit together")
        fp8 = projections["gate"][0][1] is not None
        dtype = fp8_dtype if fp8 else tensors[names[("gate", 0)]][1].dtype
        for name, projs, shape in ((p + ".gate_up_proj.weight", ("gate", "up"), (n, 2 * I, D)),
                                   (p + ".down_proj.weight", ("down",), (n, D, I))):
            read = partial(_read_stacked_experts, name=name, projections=tuple(projections[x] for x in projs), n=n,
                           dtype=fp8_dtype)
            sources = tuple(t for x in projs
                            for t in [w for w, _ in projections[x]] + [s for _, s in projections[x] if s])
            entries.append(Entry(name, {name: TensorInfo(shape, dtype)}, read, sources, "per-expert", fp8=fp8))
    return entries, claimed


def _plan_split_experts(tensors: Tensors, fp8_dtype: mx.Dtype) -> tuple[list[Entry], set[str]]:
    """mlx-lm / mlx-vlm SwitchGLU: separate gate and up (float or quantized) -> fused gate_up."""
    found: dict[str, dict[tuple[str, str], str]] = defaultdict(dict)  # experts prefix -> (proj, part) -> name
    for c in tensors:
        m = _SPLIT.match(c)
        if m:
            found[m["p"]][(m["proj"], m["part"])] = c
    entries, claimed = [], set()
    for p, names in sorted(found.items()):
        parts = [part for part in _QUANT_PARTS if ("gate", part) in names or ("up", part) in names]
        for part in parts:
            g, u = names.get(("gate", part)), names.get(("up", part))
            if g is None or u is None:
                raise CheckpointError(f"{p}: has {(g or u)!r} but not its {'up' if u is None else 'gate'} "
                                      "counterpart; gate and up projections must come together")
            (_, gi), (_, ui) = tensors[g], tensors[u]
            if gi.shape != ui.shape or len(gi.shape) != 3 or gi.dtype != ui.dtype:
                raise CheckpointError(f"{p}: gate_proj.{part} {gi.shape} and up_proj.{part} {ui.shape} "
                                      "differ (both must be [experts, out, in] with the same quantization)")
            claimed.update((g, u))
        if "weight" not in parts:
            raise CheckpointError(f"{p}: gate_proj/up_proj scales without weights")
        outputs, sources = {}, {}
        for part in parts:
            (gate, info), (up, _) = tensors[names[("gate", part)]], tensors[names[("up", part)]]
            E, rows, cols = info.shape
            outputs[f"{p}.gate_up_proj.{part}"] = TensorInfo((E, 2 * rows, cols), info.dtype)
            sources[f"{p}.gate_up_proj.{part}"] = (gate, up)
        read = partial(_read_split_experts, names=sources)
        entries.append(Entry(f"{p}.gate_up_proj.weight", outputs, read, tuple(s for gu in sources.values() for s in gu),
                             "split-experts", quantized="scales" in parts))
    return entries, claimed


def _plan_linear(tensors: Tensors, fp8_dtype: mx.Dtype) -> tuple[list[Entry], set[str]]:
    """Everything else: FP8 Linear weights (with their ``weight_scale``), quantized layers (``weight`` with its
    ``scales`` and ``biases``), and plain tensors."""
    entries, claimed = [], set()
    for c in sorted(c for c in tensors if c.endswith(".weight")):
        x = c[: -len(".weight")]
        src, info = tensors[c]
        if x + ".weight_scale" in tensors:
            scale, scale_info = tensors[x + ".weight_scale"]
            _check_fp8(src, info)
            per_row = bool(scale_info.shape) and scale_info.shape[0] == info.shape[0] > 1
            read = partial(_read_fp8, name=c, weight=src, scale=scale, per_row=per_row, dtype=fp8_dtype)
            entries.append(Entry(c, {c: TensorInfo(info.shape, fp8_dtype)}, read, (src, scale), "fp8", fp8=True))
            claimed.update((c, x + ".weight_scale"))
        elif x + ".scales" in tensors:
            names = [f"{x}.{part}" for part in _QUANT_PARTS if f"{x}.{part}" in tensors]
            read = partial(_read_rows, names={n: tensors[n][0] for n in names})
            entries.append(Entry(c, {n: tensors[n][1] for n in names}, read, tuple(tensors[n][0] for n in names),
                                 "quantized", quantized=True))
            claimed.update(names)
    for c in sorted(set(tensors) - claimed):
        src, info = tensors[c]
        entries.append(Entry(c, {c: info}, partial(_read_rows, names={c: src}), (src,)))
        claimed.add(c)
    return entries, claimed


# In this order: the expert planners claim disjoint name patterns; the last one takes all that is left.
_PLANNERS: tuple[Planner, ...] = (_plan_hf_experts, _plan_per_expert, _plan_split_experts, _plan_linear)


def plan_layout(info: Mapping[str, TensorInfo], fp8_dtype: mx.Dtype = mx.float32) -> list[Entry]:
    """Plan how to produce our tensors from a checkpoint's tensors (given by name -> shape, dtype).

    FP8 weights are dequantized to ``fp8_dtype``. Tensors that fit no known pattern are passed through under
    their canonical name; the caller's check against the model then names them as unexpected.
    """
    tensors: dict[str, tuple[str, TensorInfo]] = {}
    for src, src_info in info.items():
        c = canonical_name(src)
        if c is None:
            continue
        if c in tensors:
            raise CheckpointError(f"tensors {tensors[c][0]!r} and {src!r} both map to {c!r}")
        tensors[c] = (src, src_info)
    entries: list[Entry] = []
    for planner in _PLANNERS:
        planned, claimed = planner(tensors, fp8_dtype)
        entries += planned
        tensors = {c: t for c, t in tensors.items() if c not in claimed}
    return entries


def sanitize(weights: dict[str, mx.array], fp8_dtype: mx.Dtype = mx.float32) -> dict[str, mx.array]:
    """Map a checkpoint's tensors (any layout above; multimodal or text-only) to our names. Lazy arrays stay lazy."""
    info = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in weights.items()}

    def get(name, a, b):
        return weights[name] if a is None else weights[name][a:b]

    out: dict[str, mx.array] = {}
    for entry in plan_layout(info, fp8_dtype):
        out.update(entry.read(get, None, None))
    return out
