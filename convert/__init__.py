"""Convert Llama 4 checkpoints to MLX: fetch, sanitize, quantize, write shards."""
