"""The Llama 4 vision tower: patchify, ViT encoder with 2-D RoPE, pixel shuffle, adapter, and the projector
into the text model's hidden size. The rules and their sources (transformers' modeling_llama4.py, Meta's
llama_models/llama4/vision/) are in docs/architecture.md, "Vision tower".

Shapes for the published models: tiles of S = 336 pixels, patch p = 14, P = 24 patches per side, N = 576 patches
(+1 CLS), hidden D = 1408, 16 heads of Dh = 88, MLP width 5632, pixel-shuffle ratio 0.5 -> 144 tokens of 5632,
adapter -> 4096, projector -> 5120 (text hidden). Module attribute names mirror the Hugging Face tensor names
(``vision_model.patch_embedding.linear``, ``vision_model.model.layers.N.self_attn.q_proj``, ...).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import VisionConfig

# Hugging Face builds every vision LayerNorm with torch's default eps (``norm_eps`` in the config is not read).
_LN_EPS = 1e-5


def patchify(pixel_values: mx.array, patch_size: int) -> mx.array:
    """(T, C, S, S) -> (T, N, C*p*p) with N = (S/p)^2 row-major patches and features in (c, kh, kw) order,
    exactly ``torch.nn.Unfold(p, stride=p)`` followed by ``permute(0, 2, 1)``. One reshape, no loop."""
    T, C, H, W = pixel_values.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"tile size {H}x{W} is not a multiple of the patch size {p}")
    x = pixel_values.reshape(T, C, H // p, p, W // p, p)  # (T, C, Py, kh, Px, kw)
    x = x.transpose(0, 2, 4, 1, 3, 5)  # (T, Py, Px, C, kh, kw)
    return x.reshape(T, (H // p) * (W // p), C * p * p)


def vision_rope_angles(cfg: VisionConfig) -> mx.array:
    """Rotation angles (N+1, Dh/2) in float32 for the interleaved complex pairs of one head.

    Patch t sits at x = t % P, y = t // P (P patches per side). With F = Dh/4 frequencies
    f_k = 1 / theta^(2k / (Dh/2)), k = 0..F-1: pairs 0..F-1 turn by (x+1)*f_k and pairs F..2F-1 by (y+1)*f_k
    (1-based coordinates). The CLS token (last row) is not rotated."""
    P = cfg.patches_per_side
    half = cfg.head_dim // 2  # complex pairs per head (HF's freq_dim)
    F = half // 2
    f = 1.0 / (cfg.rope_theta ** (mx.arange(0, half, 2, dtype=mx.float32)[:F] / half))  # (F,)
    t = mx.arange(P * P)
    x = (t % P + 1).astype(mx.float32)[:, None]  # (N, 1)
    y = (t // P + 1).astype(mx.float32)[:, None]
    angles = mx.concatenate([x * f, y * f], axis=-1)  # (N, 2F) = (N, Dh/2)
    cls = mx.zeros((1, half), dtype=mx.float32)
    return mx.concatenate([angles, cls], axis=0)  # (N+1, Dh/2)


def apply_vision_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x (T, H, N+1, Dh) by the angles behind cos/sin (N+1, Dh/2),
    in float32, returning x's dtype."""
    shape = x.shape
    xf = x.astype(mx.float32).reshape(*shape[:-1], shape[-1] // 2, 2)  # (T, H, N+1, Dh/2, 2)
    a, b = xf[..., 0], xf[..., 1]
    out = mx.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.reshape(shape).astype(x.dtype)


def pixel_shuffle(x: mx.array, ratio: float) -> mx.array:
    """(T, N, C) on a P x P grid -> (T, N*r^2, C/r^2) with s = 1/r: output token (Y, X) (row-major on the
    (P/s) x (P/s) grid) concatenates input patches (s*Y+dy, s*X+dx) with channel blocks dy-major:
    [dy=0,dx=0 | dy=0,dx=1 | ... | dy=s-1,dx=s-1], each C wide (HF ``pixel_shuffle``)."""
    T, N, C = x.shape
    P = int(round(N**0.5))
    s = int(round(1 / ratio))
    if P * P != N or P % s or abs(s * ratio - 1) > 1e-6:
        raise ValueError(f"pixel shuffle needs a square grid divisible by 1/ratio; got {N} patches, ratio {ratio}")
    x = x.reshape(T, P // s, s, P // s, s, C)  # (T, Y, dy, X, dx, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (T, Y, X, dy, dx, C)
    return x.reshape(T, (P // s) ** 2, s * s * C)


class PatchEmbedding(nn.Module):
    """HF ``Llama4UnfoldConvolution``: Unfold(p, stride p) + Linear(C*p*p -> D, no bias)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.linear = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size, bias=False)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        # (T, C, S, S) -> (T, N, C*p*p) -> (T, N, D)
        return self.linear(patchify(pixel_values, self.patch_size))


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biases and 2-D RoPE on q and k."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, d, bias=True)
        self.v_proj = nn.Linear(d, d, bias=True)
        self.o_proj = nn.Linear(d, d, bias=True)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        T, L, _ = x.shape  # (T, N+1, D)
        q = self.q_proj(x).reshape(T, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)  # (T, H, N+1, Dh)
        k = self.k_proj(x).reshape(T, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(T, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        q, k = apply_vision_rope(q, cos, sin), apply_vision_rope(k, cos, sin)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)  # no mask: bidirectional
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(T, L, -1))  # (T, N+1, D)


class VisionMLP(nn.Module):
    """fc2(gelu(fc1 x)) with biases and exact (erf) GELU; D -> intermediate -> D."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    """Pre-LN block: x + Attn(LN1 x), then x + MLP(LN2 x); LayerNorms with bias, eps 1e-5."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=_LN_EPS)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=_LN_EPS)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = [VisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x


class AdapterMLP(nn.Module):
    """gelu(fc2(gelu(fc1 x))): GELU after BOTH layers, no biases."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        shuffled = int(round(cfg.hidden_size / cfg.pixel_shuffle_ratio**2))
        self.fc1 = nn.Linear(shuffled, cfg.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(cfg.projector_input_dim, cfg.projector_output_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return nn.gelu(self.fc2(nn.gelu(self.fc1(x))))


class VisionAdapter(nn.Module):
    """HF ``Llama4VisionPixelShuffleMLP``: pixel shuffle then the adapter MLP."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.pixel_shuffle_ratio = cfg.pixel_shuffle_ratio
        self.mlp = AdapterMLP(cfg)

    def __call__(self, x: mx.array) -> mx.array:
        # (T, N, D) -> (T, N*r^2, D/r^2) -> (T, N*r^2, projector_output_dim)
        return self.mlp(pixel_shuffle(x, self.pixel_shuffle_ratio))


class VisionModel(nn.Module):
    """HF ``Llama4VisionModel``: tiles (T, C, S, S) -> adapter features (T, tokens_per_tile, vision_output_dim)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        n = cfg.patches_per_side**2
        self.patch_embedding = PatchEmbedding(cfg)
        self.class_embedding = mx.zeros((cfg.hidden_size,))  # (D,)
        self.positional_embedding_vlm = mx.zeros((n + 1, cfg.hidden_size))  # (N+1, D), CLS row last
        self.layernorm_pre = nn.LayerNorm(cfg.hidden_size, eps=_LN_EPS)
        self.layernorm_post = nn.LayerNorm(cfg.hidden_size, eps=_LN_EPS)
        self.model = VisionEncoder(cfg)
        self.vision_adapter = VisionAdapter(cfg)
        # Not parameters (leading underscore): recomputed here, never read from a checkpoint.
        angles = vision_rope_angles(cfg)  # (N+1, Dh/2) float32
        self._rope_cos, self._rope_sin = mx.cos(angles), mx.sin(angles)
        mx.eval(self._rope_cos, self._rope_sin)  # usable from any thread (see TextRoPE)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        cfg = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"pixel_values must be (tiles, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}), "
                f"got {tuple(pixel_values.shape)}"
            )
        dtype = self.positional_embedding_vlm.dtype  # compute dtype (never quantized, unlike linear weights)
        x = self.patch_embedding(pixel_values.astype(dtype))  # (T, N, D)
        T, _, D = x.shape
        cls = mx.broadcast_to(self.class_embedding.astype(x.dtype), (T, 1, D))
        x = mx.concatenate([x, cls], axis=1)  # (T, N+1, D): CLS appended LAST
        x = x + self.positional_embedding_vlm.astype(x.dtype)
        x = self.layernorm_pre(x)
        x = self.model(x, self._rope_cos, self._rope_sin)  # (T, N+1, D)
        x = self.layernorm_post(x)
        x = x[:, :-1]  # drop CLS -> (T, N, D)
        return self.vision_adapter(x)  # (T, tokens_per_tile, vision_output_dim)


class MultiModalProjector(nn.Module):
    """vision_output_dim -> text hidden size, no bias."""

    def __init__(self, vision_output_dim: int, text_hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_output_dim, text_hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_1(x)
