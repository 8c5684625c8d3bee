"""Benchmarks of mlx-llama4 against mlx-lm (text) and mlx-vlm (vision) on identical weights: ``python -m bench``."""
