"""Tiny checkpoints in every layout the converter reads, built from transformers models.

The models are wide enough (64) for quantization groups of 32 and 64, and otherwise keep every structural
feature of ``checkpoints.py`` (MoE and dense layers, NoPE layers, chunked attention, qk-norm, the vision tower).
Writers produce the layouts of published repos from a transformers model:

- ``save_hf``: ``save_pretrained`` (bf16 or float32, optionally sharded);
- ``save_per_expert``: routed experts as ``experts.{i}.{gate,up,down}_proj.weight`` ``[out, in]``;
- ``save_fp8``: compressed-tensors-style FP8: per-expert float8 e4m3 weights with a per-row ``weight_scale``
  (router, embeddings, lm_head, norms and the vision tower stay bf16, as in the FP8 Maverick repo's ignore list);
- ``save_fp8_fbgemm``: transformers' fbgemm FP8 layout (fused experts with per-column scales);
plus a small word-level tokenizer and the processor files, so that other converters can load the folders.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np

from checkpoints import SMALL_VOCAB, SMALL_VOCAB_SPECIAL, VISION, build_hf, text_config

WIDE_TEXT = dict(hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                 intermediate_size_mlp=128)
WIDE_VISION = dict(VISION, hidden_size=64, num_attention_heads=2, intermediate_size=256, projector_input_dim=64,
                   projector_output_dim=64, vision_output_dim=64)
FP8_MAX = 448.0

SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad|>", "<|header_start|>", "<|header_end|>",
    "<|eom|>", "<|eot|>", "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>",
    "<|tile_y_separator|>",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|header_start|>{{ m['role'] }}<|header_end|>\n\n"
    "{{ m['content'] if m['content'] is string else m['content'][0]['text'] }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)


def wide_text_config(variant: str) -> dict:
    cfg = text_config(variant)
    cfg.update(WIDE_TEXT)
    return cfg


def build_wide_hf(variant: str = "scout", seed: int = 0, vision: bool = True):
    """A float32 transformers Llama 4 (multimodal, or text-only ``Llama4ForCausalLM``) with width 64."""
    return build_hf(wide_text_config(variant), WIDE_VISION if vision else None, seed)


def write_tokenizer(path: Path) -> None:
    """A word-level tokenizer over the 1024-token test vocabulary, with Llama 4's special tokens, a chat
    template and processor configs (enough for AutoTokenizer / AutoProcessor / mlx-vlm to load the folder)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(SMALL_VOCAB["vocab_size"])}
    specials = {
        "<|begin_of_text|>": SMALL_VOCAB["bos_token_id"], "<|eot|>": SMALL_VOCAB["eos_token_id"][0],
        "<|finetune_right_pad|>": SMALL_VOCAB["pad_token_id"], "<|image_start|>": SMALL_VOCAB_SPECIAL["boi_token_index"],
        "<|image_end|>": SMALL_VOCAB_SPECIAL["eoi_token_index"], "<|patch|>": SMALL_VOCAB_SPECIAL["image_token_index"],
    }
    free = iter(i for i in range(1003, 1024) if i not in specials.values())
    for tok in SPECIAL_TOKENS:
        specials.setdefault(tok, next(free))
    inv = {i: t for t, i in specials.items()}
    vocab = {inv.get(i, f"w{i}"): i for i in range(SMALL_VOCAB["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot|>", pad_token="<|finetune_right_pad|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|begin_of_text|>", "<|eot|>",
                                                                          "<|finetune_right_pad|>")],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Llama4ImageProcessorFast", "processor_class": "Llama4Processor",
        "size": {"height": VISION["image_size"], "width": VISION["image_size"]}, "max_patches": 4,
        "resize_to_max_canvas": False, "resample": 2, "do_resize": True, "do_rescale": True, "do_normalize": True,
        "do_convert_rgb": True, "rescale_factor": 1 / 255, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
    }, indent=2))
    (path / "processor_config.json").write_text(json.dumps({
        "processor_class": "Llama4Processor", "patch_size": VISION["patch_size"], "pixel_shuffle_ratio": 0.5,
    }, indent=2))


def save_hf(model, path: Path, dtype=None, tokenizer: bool = True, **kwargs) -> Path:
    """``save_pretrained`` (optionally in ``dtype``, e.g. torch.bfloat16), plus tokenizer / processor files."""
    path = Path(path)
    model = copy.deepcopy(model).to(dtype) if dtype is not None else model
    model.save_pretrained(path, **kwargs)
    if tokenizer:
        write_tokenizer(path)
    return path


def rounded(model, dtype):
    """A float32 copy of ``model`` whose weights (not its RoPE buffers, which are not saved) went through
    ``dtype``: the reference for a checkpoint saved in ``dtype``."""
    import torch

    ref = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(dtype).float())
    return ref


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rewrite(model, path: Path, tensors: dict, extra_config: dict | None = None) -> Path:
    """save_pretrained for config and side files, then replace the weights with ``tensors`` (one shard)."""
    from safetensors.torch import save_file

    path = save_hf(model, path)
    for f in list(path.glob("*.safetensors")) + list(path.glob("*.safetensors.index.json")):
        f.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors", metadata={"format": "pt"})
    if extra_config:
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(extra_config)
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def _per_expert(state: dict, quant=None) -> dict:
    """Split fused ``experts.gate_up_proj`` [E, D, 2I] / ``down_proj`` [E, I, D] into per-expert [out, in]."""
    out = {}
    for k, v in state.items():
        if k.endswith("feed_forward.experts.gate_up_proj"):
            half = v.shape[-1] // 2
            for i in range(v.shape[0]):
                out[f"{k[:-len('gate_up_proj')]}{i}.gate_proj.weight"] = v[i, :, :half].T
                out[f"{k[:-len('gate_up_proj')]}{i}.up_proj.weight"] = v[i, :, half:].T
        elif k.endswith("feed_forward.experts.down_proj"):
            for i in range(v.shape[0]):
                out[f"{k[:-len('down_proj')]}{i}.down_proj.weight"] = v[i].T
        else:
            out[k] = v
    return out


def save_per_expert(model, path: Path) -> Path:
    return _rewrite(model, path, _per_expert(_state(model)))


def fp8_rows(w):
    """float8 e4m3 weight and per-row scale [out, 1] (``quantize_fp8_per_row``), and the dequantized weight."""
    import torch

    scale = (w.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12).to(torch.bfloat16)
    q = (w.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale, q.float() * scale.float()


def _fp8_target(name: str) -> bool:
    return (name.startswith(("language_model.model.layers.", "model.layers.")) and name.endswith("_proj.weight")
            and ".router." not in name)


def save_fp8(model, path: Path):
    """compressed-tensors FP8 (per-expert, per-row scales). Returns (path, float32 reference model whose
    weights are the dequantized ones)."""
    import torch

    tensors, deq = {}, {}
    for k, v in _per_expert(_state(model)).items():
        if _fp8_target(k):
            q, s, d = fp8_rows(v)
            tensors[k], tensors[k + "_scale"], deq[k] = q, s, d
        else:
            tensors[k] = v.to(torch.bfloat16) if v.is_floating_point() else v
            deq[k] = tensors[k].float()
    quant = {"quant_method": "compressed-tensors", "format": "float-quantized",
             "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                 "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
                 "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}},
             "ignore": ["re:.*router", "re:.*lm_head", "re:vision_model.*", "re:multi_modal_projector.*"]}
    path = _rewrite(model, path, tensors, {"quantization_config": quant, "torch_dtype": "bfloat16"})
    return path, _with_weights(model, _fuse(deq))


def save_fp8_fbgemm(model, path: Path):
    """transformers' fbgemm FP8 layout: fused experts with per-output-column scales, Linear weights per-row."""
    import torch

    tensors, deq = {}, {}
    for k, v in _state(model).items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            q, s, d = fp8_rows(v.transpose(1, 2))  # [E, out, in] rows -> one scale per output column
            tensors[k], tensors[k + "_scale"] = q.transpose(1, 2), s.transpose(1, 2).float()  # [E, 1, out]
            if k.endswith("down_proj"):
                tensors[k + "_scale"] = s.float()  # fbgemm stores the down scale as [E, D, 1]
            deq[k] = d.transpose(1, 2)
        elif _fp8_target(k):
            q, s, d = fp8_rows(v)
            tensors[k], tensors[k.replace(".weight", ".weight_scale")], deq[k] = q, s.float(), d
        else:
            tensors[k] = v.to(torch.bfloat16) if v.is_floating_point() else v
            deq[k] = tensors[k].float()
    path = _rewrite(model, path, tensors, {"quantization_config": {"quant_method": "fbgemm_fp8"},
                                           "torch_dtype": "bfloat16"})
    return path, _with_weights(model, deq)


def _fuse(state: dict) -> dict:
    """Inverse of ``_per_expert``."""
    import torch

    out, experts = {}, {}
    for k, v in state.items():
        parts = k.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            j = parts.index("experts")
            experts.setdefault(".".join(parts[: j + 1]), {})[(int(parts[j + 1]), parts[j + 2])] = v
        else:
            out[k] = v
    for prefix, d in experts.items():
        n = 1 + max(i for i, _ in d)
        out[prefix + ".gate_up_proj"] = torch.stack(
            [torch.cat([d[(i, "gate_proj")].T, d[(i, "up_proj")].T], dim=-1) for i in range(n)])
        out[prefix + ".down_proj"] = torch.stack([d[(i, "down_proj")].T for i in range(n)])
    return out


def _with_weights(model, state: dict):
    ref = copy.deepcopy(model).float().eval()
    ref.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return ref


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def argmax_agreement(a, b) -> float:
    return float((np.asarray(a).argmax(-1) == np.asarray(b).argmax(-1)).mean())


def make_confident(model, ids, strength: float = 8.0, seed: int = 0):
    """Give a random model a trained model's confident predictions on ``ids`` (1, L): each position's lm_head
    input (centred across positions) is added to the lm_head row of a distinct random target token, so that
    the target's logit leads by about ``strength`` standard deviations of the original logits.

    A randomly initialized model's logits are nearly flat, so any perturbation flips its argmax; quantization
    checks by argmax agreement need margins like a real model's. Returns the targets."""
    import torch

    head = model.get_output_embeddings()
    seen = {}
    hook = head.register_forward_hook(lambda m, inp, out: seen.setdefault("h", inp[0].detach()))
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids).long()).logits
    hook.remove()
    h = seen["h"][0].float()  # (L, D)
    h = h - h.mean(0, keepdim=True)
    targets = np.random.default_rng(seed).permutation(head.weight.shape[0])[: h.shape[0]]
    boost = strength * logits.float().std() * h / (h.norm(dim=-1, keepdim=True) ** 2)
    with torch.no_grad():
        head.weight[torch.as_tensor(targets)] += boost.to(head.weight.dtype)
    return targets


def hub_style_config(path: Path) -> Path:
    """Rewrite ``config.json`` with the transformers-4 spellings the published Hub configs use (``rope_theta``
    and ``rope_scaling`` instead of ``rope_parameters``; ``vision_feature_layer``), which mlx-vlm expects."""
    file = Path(path) / "config.json"
    cfg = json.loads(file.read_text())
    for key in ("text_config", "vision_config"):
        sub = cfg.get(key)
        if not sub:
            continue
        params = sub.pop("rope_parameters", None) or {}
        sub["rope_theta"] = params.get("rope_theta", sub.get("rope_theta", 10000))
        if key == "text_config":
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
            sub["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
        else:
            sub.setdefault("vision_feature_layer", -1)
    file.write_text(json.dumps(cfg, indent=2))
    return Path(path)
