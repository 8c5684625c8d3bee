"""Meta's Llama 4 (Scout, Maverick) in MLX.

    from mlx_llama4 import load, generate, stream_generate
    model, processor = load("path/or/hub-repo")
    print(generate(model, processor, "Describe the picture.", images=["cat.jpg"]))

The names below are imported on first use: the model needs mlx-lm, whose package import pulls in
transformers (and torch where installed), seconds that ``import mlx_llama4`` and ``mlx-llama4 --help``
should not pay.
"""

from importlib import import_module
from typing import Any

# public name -> the module that defines it
_EXPORTS = {
    "ConfigError": "config",
    "ModelConfig": "config",
    "load_config": "config",
    "cache_document": "document_cache",
    "document_messages": "document_cache",
    "GenerationChunk": "generation",
    "PromptCache": "prompt_cache",
    "generate": "generation",
    "load_prompt_cache": "prompt_cache",
    "save_prompt_cache": "prompt_cache",
    "stream_generate": "generation",
    "CheckpointError": "loading",
    "load": "loading",
    "load_model": "loading",
    "Model": "model",
    "Processor": "processor",
    "load_processor": "processor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

