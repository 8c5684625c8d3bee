"""Meta's Llama 4 (Scout, Maverick) in MLX.

    from mlx_llama4 import load, generate, stream_generate
    model, processor = load("path/or/hub-repo")
    print(generate(model, processor, "Describe the picture.", images=["cat.jpg"]))
"""

from .config import ConfigError, ModelConfig, load_config
from .generation import (
    GenerationChunk,
    PromptCache,
    generate,
    load_prompt_cache,
    save_prompt_cache,
    stream_generate,
)
from .loading import CheckpointError, load, load_model
from .model import Model

__all__ = [
    "CheckpointError",
    "ConfigError",
    "GenerationChunk",
    "Model",
    "ModelConfig",
    "PromptCache",
    "generate",
    "load",
    "load_config",
    "load_model",
    "load_prompt_cache",
    "save_prompt_cache",
    "stream_generate",
]
