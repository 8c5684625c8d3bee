"""The files next to the weights: run-time files copied as they are, and the model card."""

from __future__ import annotations

from pathlib import Path

# Files a Llama 4 checkpoint needs at run time (copied as they are).
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
    "generation_config.json",
)


def model_card(source: str, is_hub: bool, quant_text: str, dtype_name: str, has_vision: bool) -> str:
    try:
        from importlib.metadata import version

        ver = version("mlx-llama4")
    except Exception:
        ver = "unknown"
    base = f"[{source}](https://huggingface.co/{source})" if is_hub else f"`{source}`"
    lines = [
        "---",
        "library_name: mlx",
        "tags:", "- mlx", "- llama4", "- mlx-llama4",
        f"pipeline_tag: {'image-text-to-text' if has_vision else 'text-generation'}",
    ]
    if is_hub:
        lines.append(f"base_model: {source}")
    lines += [
        "---",
        "",
        f"# {Path(source).name}",
        "",
        f"Converted to MLX from {base} with mlx-llama4 {ver} (`mlx-llama4 convert`).",
        "",
        f"- Weights: {dtype_name}; {quant_text}.",
        "- Layout: routed experts fused gate|up as `feed_forward.experts.gate_up_proj` [experts, out, in],",
        "  quantized along the input, read with one gather-matmul. Loads with `mlx_llama4`, not with mlx-lm/mlx-vlm.",
        "",
        "```python",
        "from mlx_llama4 import load, generate",
        "",
        'model, processor = load("<this folder or repo>")',
        'print(generate(model, processor, "Describe the picture.", images=["cat.jpg"], max_tokens=200))',
        "```",
        "",
    ]
    return "\n".join(lines)
