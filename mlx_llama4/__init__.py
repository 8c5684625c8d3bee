"""Meta's Llama 4 (Scout, Maverick) in MLX."""

from .config import ConfigError, ModelConfig, load_config
from .loading import CheckpointError, load_model
from .model import Model

__all__ = ["CheckpointError", "ConfigError", "Model", "ModelConfig", "load_config", "load_model"]
