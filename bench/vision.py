"""Item 5: one image prompt, preprocessing + vision encode time per tile, ours / mlx-vlm.

Both get the same decoded RGB image (a PIL image) and the same tower weights. Each side tiles it its own way
(ours: best-fit canvas up to 16 tiles plus a global tile; mlx-vlm: at most 4 tiles, stretched, no global
tile), so times are compared per tile. Encoding covers patchify, the ViT, pixel shuffle, the adapter and the
projector into the text width. Parity: both towers on *our* tiles, projected features compared.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any

import mlx.core as mx
import numpy as np

from . import checkpoints as ck
from .impls import load_mlx_vlm, load_ours
from .text import rel_err

# A 4:1 panorama: ours tiles it 1 x 4 plus a global tile (5 tiles), mlx-vlm 1 x 4 (4 tiles). (mlx-vlm picks its
# grid by aspect ratio alone, first match winning, so any square image gets a single tile there.)
IMAGE_SIZE = (1344, 336)  # width, height


def test_image(size=IMAGE_SIZE, seed: int = 0):
    """A smooth colour field with noise: resizing it is real work, unlike a constant image."""
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 200
    img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img, "RGB")


def _ours(model):
    from mlx_llama4.images import ImageSettings, preprocess_images

    settings = ImageSettings()

    def preprocess(img):
        pixels, _grids = preprocess_images([img], settings)
        return mx.array(pixels)

    def encode(pixels):
        return model.encode_images(pixels)

    return preprocess, encode


def _mlx_vlm(model):
    from mlx_vlm.models.llama4.processing_llama4 import Llama4ImageProcessor

    proc = Llama4ImageProcessor(size=336, max_patches=16)

    def preprocess(img):
        return mx.array(proc.preprocess([img])["pixel_values"])

    def encode(pixels):
        f = model.get_image_features(pixels, -1, "default")
        return model.multi_modal_projector(f.reshape(-1, f.shape[-1]))

    return preprocess, encode


def _run(preprocess, encode, img) -> dict:
    gc.collect()
    mx.clear_cache()
    t0 = time.perf_counter()
    pixels = preprocess(img)
    mx.eval(pixels)
    t1 = time.perf_counter()
    feats = encode(pixels)
    mx.eval(feats)
    t2 = time.perf_counter()
    tiles = int(pixels.shape[0])
    return {"tiles": tiles, "features": int(feats.shape[0]), "preprocess_s": t1 - t0, "encode_s": t2 - t1,
            "per_tile_s": (t2 - t0) / tiles, "preprocess_per_tile_s": (t1 - t0) / tiles,
            "encode_per_tile_s": (t2 - t1) / tiles}


def vision_speed(repeats: int = 3) -> dict:
    path = ck.checkpoint("vision")
    ours_model = load_ours(path)[0]
    try:
        vlm_model = load_mlx_vlm(path)
    except ImportError as e:  # mlx-vlm missing: our own timing only, and the report says so
        vlm_model, missing = None, f"mlx-vlm is not installed ({e}); ours only"
    img = test_image()
    sides = {"ours": _ours(ours_model)}
    out: dict[str, Any] = {"image_size": list(IMAGE_SIZE)}
    pixels = sides["ours"][0](img)
    if vlm_model is not None:
        sides["mlx-vlm"] = _mlx_vlm(vlm_model)
        # parity on the same tiles (ours)
        a, b = sides["ours"][1](pixels), sides["mlx-vlm"][1](pixels)
        mx.eval(a, b)
        out["parity_rel_err"] = rel_err(b, a)
    else:
        out["mlx_vlm_missing"] = missing
    # where the time goes: the patch embedding (patchify + linear) alone, on the same tiles
    embeds = {"ours": ours_model.vision_model.patch_embedding}
    if vlm_model is not None:
        embeds["mlx-vlm"] = vlm_model.vision_model.patch_embedding
    out["patch_embed_s"] = {}
    for k, emb in embeds.items():
        mx.eval(emb(pixels))
        t = time.perf_counter()
        mx.eval(emb(pixels))
        out["patch_embed_s"][k] = time.perf_counter() - t
    out["patch_embed_tiles"] = int(pixels.shape[0])

    for pre, enc in sides.values():  # warm-up
        _run(pre, enc, img)
    runs: dict[str, list] = {k: [] for k in sides}
    for r in range(repeats):
        for k in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            runs[k].append(_run(*sides[k], img))
    out["runs"] = runs
    out["median"] = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in runs.items()}
    if "mlx-vlm" in runs:
        # per-tile time ratios ours / mlx-vlm (below 1: ours is faster), each pair measured back to back
        for key, name in (("per_tile_s", "time_ratio"), ("preprocess_per_tile_s", "preprocess_time_ratio"),
                          ("encode_per_tile_s", "encode_time_ratio")):
            out[name] = statistics.median(o[key] / v[key] for o, v in zip(runs["ours"], runs["mlx-vlm"]))
    return out
