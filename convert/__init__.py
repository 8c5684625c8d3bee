"""Convert Llama 4 checkpoints to MLX: fetch, sanitize, quantize, write shards.

    from mlx_llama4.convert import convert
    convert("meta-llama/Llama-4-Scout-17B-16E-Instruct", "scout-4bit", quantize=True, q_bits=4)

or ``python -m mlx_llama4.convert --hf-path ... --mlx-path ... -q`` (see ``cli.py``).
"""

from .cli import main
from .core import ConvertError, ConvertResult, convert
from .policy import QuantizationOptionError, QuantPolicy, QuantSpec, make_policy

__all__ = ["ConvertError", "ConvertResult", "QuantPolicy", "QuantSpec", "QuantizationOptionError", "convert",
           "main", "make_policy"]
