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

Planning (``plan_layout``) looks at names, shapes and dtypes only. Each planned ``Entry`` reads rows ``[a:b]`` of its
outputs (along axis 0: output rows, or experts) through a getter, so the converter can stream one block of rows at a
time from files while ``sanitize`` reads whole tensors from a dict of (lazy) arrays.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
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


def plan_layout(info: Mapping[str, TensorInfo], fp8_dtype: mx.Dtype = mx.float32) -> list[Entry]:
    """Plan how to produce our tensors from a checkpoint's tensors (given by name -> shape, dtype).

    FP8 weights are dequantized to ``fp8_dtype``. Tensors that fit no known pattern are passed through under
    their canonical name; the caller's check against the model then names them as unexpected.
    """
    canon: dict[str, str] = {}
    for src in info:
        c = canonical_name(src)
        if c is None:
            continue
        if c in canon:
            raise CheckpointError(f"tensors {canon[c]!r} and {src!r} both map to {c!r}")
        canon[c] = src
    inf = {c: info[s] for c, s in canon.items()}
    used: set[str] = set()
    entries: list[Entry] = []

    # 1. Hugging Face fused experts, input-major, optionally fbgemm FP8 with a per-output-column scale.
    for c in sorted(canon):
        m = _HF_EXPERTS.match(c)
        if not m:
            continue
        used.add(c)
        src, shape = canon[c], inf[c].shape
        if len(shape) != 3:
            raise CheckpointError(f"{src}: expected a 3-d expert tensor [experts, in, out], got shape {shape}")
        E, n_in, n_out = shape
        scale = canon.get(c + "_scale")
        if scale is not None:
            used.add(c + "_scale")
            _check_fp8(src, inf[c])

        def read(get, a, b, src=src, scale=scale, name=c + ".weight", n_out=n_out):
            w = get(src, a, b)  # (e, in, out)
            if scale is not None:
                s = get(scale, a, b).reshape(w.shape[0], 1, n_out)
                w = _dequant_fp8(w, s, fp8_dtype)
            return {name: w.swapaxes(-1, -2)}  # (e, out, in)

        dtype = fp8_dtype if scale is not None else inf[c].dtype
        entries.append(Entry(c + ".weight", {c + ".weight": TensorInfo((E, n_out, n_in), dtype)}, read,
                             (src,) + ((scale,) if scale else ()), "hf-experts", fp8=scale is not None))

    # 2. Per-expert Linear weights (bf16 or FP8), stacked into our fused layout.
    per_expert: dict[str, dict[tuple[str, int], str]] = defaultdict(dict)
    for c in canon:
        m = _PER_EXPERT.match(c)
        if m:
            per_expert[m["p"]][(m["proj"], int(m["i"]))] = c
    for p, found in sorted(per_expert.items()):
        n = 1 + max(i for _, i in found)
        missing = [f"{p}.{i}.{proj}_proj.weight" for i in range(n) for proj in ("gate", "up", "down")
                   if (proj, i) not in found]
        if missing:
            raise CheckpointError(f"per-expert layout of {p}: {len(missing)} tensor(s) missing, e.g. {missing[0]}")
        parts = {}
        for proj in ("gate", "up", "down"):
            names = [found[(proj, i)] for i in range(n)]
            shapes = {inf[x].shape for x in names}
            if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                raise CheckpointError(f"per-expert layout of {p}: {proj}_proj shapes differ or are not 2-d: {shapes}")
            scales = [canon.get(x + "_scale") for x in names]
            if any(scales) and not all(scales):
                raise CheckpointError(f"per-expert layout of {p}: some {proj}_proj experts have a weight_scale, "
                                      "others do not")
            for x, s in zip(names, scales):
                used.add(x)
                if s:
                    used.add(x + "_scale")
                    _check_fp8(canon[x], inf[x])
            parts[proj] = ([canon[x] for x in names], [canon[x + "_scale"] if s else None for x, s in
                                                         zip(names, scales)], next(iter(shapes)))
        fp8 = parts["gate"][1][0] is not None
        dtype = fp8_dtype if fp8 else inf[found[("gate", 0)]].dtype
        (I, D), (Iu, Du), (Dd, Id) = parts["gate"][2], parts["up"][2], parts["down"][2]
        if (I, D) != (Iu, Du) or (Dd, Id) != (D, I):
            raise CheckpointError(f"per-expert layout of {p}: gate {parts['gate'][2]}, up {parts['up'][2]} and "
                                  f"down {parts['down'][2]} do not fit together")

        def load(get, w, s):
            return get(w, None, None) if s is None else _dequant_fp8(get(w, None, None), get(s, None, None), fp8_dtype)

        def read_gate_up(get, a, b, parts=parts, name=p + ".gate_up_proj.weight", n=n):
            (gw, gs, _), (uw, us, _) = parts["gate"], parts["up"]
            rows = [mx.concatenate([load(get, gw[i], gs[i]), load(get, uw[i], us[i])], axis=0)
                    for i in range(a or 0, n if b is None else b)]
            return {name: mx.stack(rows)}  # (e, 2I, D)

        def read_down(get, a, b, parts=parts, name=p + ".down_proj.weight", n=n):
            dw, ds, _ = parts["down"]
            return {name: mx.stack([load(get, dw[i], ds[i]) for i in range(a or 0, n if b is None else b)])}

        srcs = tuple(x for proj in ("gate", "up") for x in parts[proj][0] + [s for s in parts[proj][1] if s])
        entries.append(Entry(p + ".gate_up_proj.weight", {p + ".gate_up_proj.weight": TensorInfo((n, 2 * I, D), dtype)},
                             read_gate_up, srcs, "per-expert", fp8=fp8))
        srcs = tuple(parts["down"][0] + [s for s in parts["down"][1] if s])
        entries.append(Entry(p + ".down_proj.weight", {p + ".down_proj.weight": TensorInfo((n, D, I), dtype)},
                             read_down, srcs, "per-expert", fp8=fp8))

    # 3. mlx-lm / mlx-vlm SwitchGLU: separate gate and up (float or quantized) -> fused gate_up.
    split: dict[str, dict[tuple[str, str], str]] = defaultdict(dict)
    for c in canon:
        m = _SPLIT.match(c)
        if m and c not in used:
            split[m["p"]][(m["proj"], m["part"])] = c
    for p, found in sorted(split.items()):
        parts = [part for part in _QUANT_PARTS if ("gate", part) in found or ("up", part) in found]
        for part in parts:
            g, u = found.get(("gate", part)), found.get(("up", part))
            if g is None or u is None:
                raise CheckpointError(f"{p}: has {(g or u)!r} but not its {'up' if u is None else 'gate'} "
                                      "counterpart; gate and up projections must come together")
            if inf[g].shape != inf[u].shape or len(inf[g].shape) != 3 or inf[g].dtype != inf[u].dtype:
                raise CheckpointError(f"{p}: gate_proj.{part} {inf[g].shape} and up_proj.{part} {inf[u].shape} "
                                      "differ (both must be [experts, out, in] with the same quantization)")
            used.update((g, u))
        if "weight" not in parts:
            raise CheckpointError(f"{p}: gate_proj/up_proj scales without weights")
        outputs = {}
        for part in parts:
            E, rows, cols = inf[found[("gate", part)]].shape
            outputs[f"{p}.gate_up_proj.{part}"] = TensorInfo((E, 2 * rows, cols), inf[found[("gate", part)]].dtype)

        def read(get, a, b, p=p, parts=parts, found=found):
            return {f"{p}.gate_up_proj.{part}": mx.concatenate(
                [get(canon[found[("gate", part)]], a, b), get(canon[found[("up", part)]], a, b)], axis=-2)
                for part in parts}

        srcs = tuple(canon[found[(proj, part)]] for part in parts for proj in ("gate", "up"))
        entries.append(Entry(f"{p}.gate_up_proj.weight", outputs, read, srcs, "split-experts",
                             quantized="scales" in parts))

    # 4. Everything else: quantized layers (weight + scales [+ biases]) and FP8 Linear weights first, so that
    #    their companions are claimed, then plain tensors.
    for c in sorted(canon, key=lambda n: not n.endswith(".weight")):
        if c in used:
            continue
        if c.endswith(".weight"):
            x = c[: -len(".weight")]
            if x + ".weight_scale" in canon:
                used.update((c, x + ".weight_scale"))
                _check_fp8(canon[c], inf[c])

                def read(get, a, b, w=canon[c], s=canon[x + ".weight_scale"], c=c, per_row=inf[x + ".weight_scale"]):
                    scale = get(s, a, b) if per_row.shape and per_row.shape[0] == inf[c].shape[0] > 1 else get(s, None, None)
                    return {c: _dequant_fp8(get(w, a, b), scale, fp8_dtype)}

                entries.append(Entry(c, {c: TensorInfo(inf[c].shape, fp8_dtype)}, read,
                                     (canon[c], canon[x + ".weight_scale"]), "fp8", fp8=True))
                continue
            if x + ".scales" in canon:
                names = [f"{x}.{part}" for part in _QUANT_PARTS if f"{x}.{part}" in canon]
                used.update(names)

                def read(get, a, b, names=names):
                    return {n: get(canon[n], a, b) for n in names}

                entries.append(Entry(c, {n: inf[n] for n in names}, read, tuple(canon[n] for n in names),
                                     "quantized", quantized=True))
                continue
        used.add(c)

        def read(get, a, b, c=c):
            return {c: get(canon[c], a, b)}

        entries.append(Entry(c, {c: inf[c]}, read, (canon[c],)))
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
