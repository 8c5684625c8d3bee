"""Long contexts in numbers: the automatic KV quantization rule, and the KV cache's size and a prompt's prefill
work as functions of the config (no MLX here: the CLI's help quotes the rule, the README's table and the
benchmark use the formulas, and ``tests/test_long_context_cache.py`` checks them against real caches).

Only the global (NoPE) layers keep every position; a chunked RoPE layer keeps at most one chunk of
``attention_chunk_size`` positions (``cache.py``). Per position, a layer holds K and V: ``2 * kv_heads *
head_dim`` values, in ``float_bytes`` each, or quantized in ``bits / 8`` bytes plus a scale and a bias (in
``float_bytes``) per group of ``group_size`` values.
"""

from __future__ import annotations

from .config import TextConfig

# kv_bits="auto" (the default of generate / stream_generate / the CLI): float KV, except that a context of
# at least LONG_CONTEXT_TOKENS positions (prompt and reply) keeps its global layers' KV in
# LONG_CONTEXT_KV_BITS bits. The global layers hold all of a long context's KV; Scout's are 48 KiB per token
# in bfloat16, 1.5 GiB at the threshold, and 8 bits halves that with greedy tokens that agree (README, "Long
# context"). The chunked layers stay float: one chunk each, whatever the context.
LONG_CONTEXT_TOKENS = 32768
LONG_CONTEXT_KV_BITS = 8


def kv_layers(cfg: TextConfig) -> tuple[int, int]:
    """(global layers, chunked layers): RoPE layers without a chunk size attend globally too."""
    chunked = sum(1 for rope in cfg.uses_rope if rope and cfg.attention_chunk_size)
    return cfg.num_hidden_layers - chunked, chunked


def kv_bytes_per_position(cfg: TextConfig, bits: int | None = None, group_size: int = 64,
                          float_bytes: int = 2) -> float:
    """Bytes of K and V that one layer keeps per position."""
    values = 2 * cfg.num_key_value_heads * cfg.head_dim
    if bits is None:
        return values * float_bytes
    return values * (bits / 8 + 2 * float_bytes / group_size)


def kv_cache_bytes(cfg: TextConfig, tokens: int, global_bits: int | None = None, chunk_bits: int | None = None,
                   group_size: int = 64, float_bytes: int = 2) -> float:
    """Bytes of the whole KV cache at ``tokens`` positions: every position in each global layer, at most one
    chunk in each chunked layer."""
    n_global, n_chunked = kv_layers(cfg)
    chunk = min(tokens, cfg.attention_chunk_size or 0)
    return (n_global * tokens * kv_bytes_per_position(cfg, global_bits, group_size, float_bytes)
            + n_chunked * chunk * kv_bytes_per_position(cfg, chunk_bits, group_size, float_bytes))


def prefill_flops(cfg: TextConfig, tokens: int, active_params: float) -> float:
    """Floating-point operations to prefill ``tokens`` positions: 2 per active weight per token, and per
    query-key pair and attention head 4 * head_dim (q . k and p * v). Query p sees p + 1 keys in a global
    layer, and (p mod chunk) + 1 in a chunked one."""
    n_global, n_chunked = kv_layers(cfg)
    per_pair = 4 * cfg.num_attention_heads * cfg.head_dim
    pairs_global = tokens * (tokens + 1) / 2
    chunk = cfg.attention_chunk_size or tokens
    full, rest = divmod(tokens, chunk)
    pairs_chunked = full * chunk * (chunk + 1) / 2 + rest * (rest + 1) / 2
    return 2 * active_params * tokens + per_pair * (n_global * pairs_global + n_chunked * pairs_chunked)
