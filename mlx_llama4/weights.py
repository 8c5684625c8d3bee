"""Checkpoint tensor names -> module names.

Hugging Face Llama 4 checkpoints mostly match our module tree already (it mirrors them); the exceptions are
the routed experts, stored input-major ``[E, in, out]`` without a ``.weight`` suffix, which we keep fused
(gate | up) and store ``[E, out, in]`` so that quantization runs along the input dimension.
"""

from __future__ import annotations

import re

import mlx.core as mx

# Non-persistent buffers some exporters still write; they are recomputed from the config.
_DROPPED = re.compile(r"(rotary_emb\.inv_freq|rotary_embedding\.freqs_ci)$")
_EXPERT_INPUT_MAJOR = re.compile(r"\.feed_forward\.experts\.(gate_up_proj|down_proj)$")


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Map a checkpoint's tensors (multimodal or text-only ``Llama4ForCausalLM`` export) to our names."""
    out = {}
    for name, w in weights.items():
        if _DROPPED.search(name):
            continue
        if name.startswith("model."):  # text-only export: model.* / lm_head.*
            name = "language_model." + name
        elif name.startswith("lm_head."):
            name = "language_model." + name
        if _EXPERT_INPUT_MAJOR.search(name):
            name, w = name + ".weight", w.swapaxes(-1, -2)  # (E, in, out) -> (E, out, in)
        out[name] = w
    return out
