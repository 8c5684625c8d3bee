"""Image loading and tiling for Llama 4 (Pillow + numpy only).

Llama 4 sees an image as a grid of 336x336 tiles plus, when there is more than one tile, a distorted
336x336 thumbnail of the whole image (the "global tile"). The steps and their order are those of Meta's
``VariableSizeImageTransform`` (llama_models/llama4/preprocess.py) and transformers' ``Llama4ImageProcessor``
(image_processing_llama4.py), spelled out in docs/architecture.md, "Image tiling":

1. decode, apply the EXIF orientation, convert to RGB (transparency composited onto white);
2. pick the best-fit canvas among all tile grids with at most ``max_patches`` tiles;
3. resize without distortion (bilinear, antialiased), never upscaling a side past one tile unless
   ``resize_to_max_canvas``;
4. pad right and bottom with black, rescale to [0, 1] and normalise with mean/std (so padding becomes -1);
5. split into row-major tiles and append the global tile.

The result is float32 ``(tiles, 3, S, S)`` pixel values and the grid ``(rows, cols)``; the prompt needs
the grid to lay out its image tokens.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import threading
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[str, Path, bytes, bytearray, memoryview, Image.Image, np.ndarray]

# Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS with its default): about 179 megapixels, i.e. more
# than any camera produces, while a decoded image of that size already takes ~540 MB.
DEFAULT_MAX_PIXELS = 178_956_970
# How to change the pixel limit, for error messages (apps that set the limit with a flag say so themselves).
_RAISE_LIMIT = (
    " (a guard against decompression bombs; to accept larger images, load the processor with "
    "load_processor(path, max_pixels=N), None for no limit, or set processor.image_settings = "
    "dataclasses.replace(processor.image_settings, max_pixels=N))"
)
# Remote images are read into memory before decoding; this caps the download.
DEFAULT_MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024


class ImageError(ValueError):
    """An image that cannot be used: unreadable, corrupt, truncated, empty, too large or of an unknown kind.

    The message names the source (the file path where there is one) and the problem.
    """


@dataclass(frozen=True)
class ImageSettings:
    """How images are tiled and normalised; the defaults are those of the published Llama 4 checkpoints."""

    size: int = 336  # tile side in pixels
    max_patches: int = 16  # most tiles per image (the global tile not counted)
    resize_to_max_canvas: bool = False
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # decompression-bomb guard; None disables it

    def __post_init__(self) -> None:
        if self.size <= 0 or self.max_patches <= 0:
            raise ValueError(f"size and max_patches must be positive, got {self.size} and {self.max_patches}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need one value per RGB channel")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")


@dataclass(frozen=True)
class ProcessedImage:
    """One image ready for the vision encoder."""

    pixel_values: np.ndarray  # (tiles, 3, S, S) float32; row-major grid tiles, then the global tile if any
    grid: tuple[int, int]  # (rows, cols) of the tile grid, without the global tile

    @property
    def num_tiles(self) -> int:
        """Tiles fed to the vision encoder, global tile included."""
        return int(self.pixel_values.shape[0])


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def describe_source(source: object) -> str:
    """A short human-readable name for an image source, used in error messages."""
    if isinstance(source, Path):
        return str(source)
    if isinstance(source, str):
        return source if len(source) <= 200 else source[:80] + "..." + f" ({len(source)} characters)"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes of image data>"
    if isinstance(source, Image.Image):
        return f"<PIL image mode={source.mode} size={source.size[0]}x{source.size[1]}>"
    if isinstance(source, np.ndarray):
        return f"<array shape={source.shape} dtype={source.dtype}>"
    return f"<{type(source).__name__}>"


_PIL_LIMIT_LOCK = threading.Lock()
_PIL_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _open_pil(fp, name: str, max_pixels: int | None) -> Image.Image:
    """Image.open with our pixel limit instead of Pillow's.

    Pillow warns above ``Image.MAX_IMAGE_PIXELS`` and refuses twice that. We enforce ``max_pixels`` ourselves
    (after the header is read, before any pixel is decoded); only a caller who asks for more than Pillow
    allows makes us lift Pillow's global limit, under a lock, for the duration of the header read.
    """
    pil_hard_limit = None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS
    lift = pil_hard_limit is not None and (max_pixels is None or max_pixels > pil_hard_limit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            if not lift:
                image = Image.open(fp)
            else:
                with _PIL_LIMIT_LOCK:
                    old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                    try:
                        image = Image.open(fp)
                    finally:
                        Image.MAX_IMAGE_PIXELS = old
        except Image.DecompressionBombError as exc:  # only reachable when max_pixels <= Pillow's limit
            match = _PIL_BOMB_PIXELS.search(str(exc))
            count = f"{int(match.group(1)):,} pixels" if match else "more pixels than Pillow allows"
            raise ImageError(
                f"{name}: image has {count}, above the limit of {max_pixels:,} pixels{_RAISE_LIMIT}"
            ) from None
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not a recognised image file (unknown format, empty or corrupt)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(f"{name}: cannot read image header ({exc})") from None
    _check_pixels(image.size, name, max_pixels)
    return image


def _check_pixels(size: tuple[int, int], name: str, max_pixels: int | None) -> None:
    """Refuse empty images and images over the pixel limit, naming the counts."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: image has zero size ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"{name}: image is {width}x{height} = {width * height:,} pixels, above the limit of "
            f"{max_pixels:,} pixels{_RAISE_LIMIT}"
        )


def _decode(fp, name: str, max_pixels: int | None) -> Image.Image:
    """Decode the first frame fully, apply the EXIF orientation and return an RGB image detached from fp."""
    with _open_pil(fp, name, max_pixels) as image:
        try:
            image.seek(0)  # animated GIF/WebP/APNG, multi-page TIFF: the first frame
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            raise ImageError(f"{name}: cannot decode image, the file is corrupt or truncated ({exc})") from None
        upright = _exif_upright(image)
        rgb = to_rgb(upright, name)
        return rgb if rgb is not image else rgb.copy()


def _exif_upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF Orientation tag says (cameras store sensor order plus a tag).

    A damaged EXIF block should not make an otherwise good image unusable: it is then left as it is.
    """
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - Pillow raises many kinds of errors on malformed EXIF
        return image


def _read_url(url: str, name: str, max_bytes: int) -> bytes:
    """Bytes of an http(s) image, capped at max_bytes."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - http(s) only, checked by caller
            data = response.read(max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"{name}: cannot download image ({exc})") from None
    if len(data) > max_bytes:
        raise ImageError(f"{name}: download is larger than {max_bytes:,} bytes")
    return data


def _data_url_bytes(url: str, name: str) -> bytes:
    """Payload of a ``data:`` URL (base64 or percent-encoded)."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageError(f"{name}: malformed data URL (no comma)")
    try:
        if header.endswith(";base64"):
            return base64.b64decode(payload, validate=False)
        return urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"{name}: malformed data URL ({exc})") from None


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    """A PIL image from an HWC (C = 1, 3 or 4) or HW uint8 array."""
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise ImageError(f"{name}: expected a uint8 array (0..255), got dtype {array.dtype}; scale and cast it first")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        mode = "L"
    elif array.ndim == 3 and array.shape[2] in (3, 4):
        mode = "RGB" if array.shape[2] == 3 else "RGBA"
    else:
        raise ImageError(
            f"{name}: expected an array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{name}: image has zero size ({array.shape[1]}x{array.shape[0]})")
    image = Image.fromarray(np.ascontiguousarray(array))  # L, RGB or RGBA from the shape
    assert image.mode == mode, (image.mode, mode)
    return image


def load_image(
    source: ImageInput,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
) -> Image.Image:
    """Any supported image source as an RGB PIL image.

    Accepts a file path (str or Path; also ``file://``, ``data:`` and ``http(s)://`` URLs), encoded bytes,
    a PIL image, or a uint8 numpy array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4). Encoded images are
    decoded with their EXIF orientation applied and their first frame only; already-decoded images
    (PIL, numpy) are taken as they are. Raises ``ImageError`` naming the source for anything unusable.
    """
    name = describe_source(source)
    if isinstance(source, Image.Image):
        _check_pixels(source.size, name, None)  # already in memory: no bomb check, but refuse empty images
        try:
            source.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(f"{name}: cannot decode image ({exc})") from None
        return to_rgb(source, name)
    if isinstance(source, np.ndarray):
        return to_rgb(_from_array(source, name), name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError(f"{name}: empty image data")
        return _decode(io.BytesIO(bytes(source)), name, max_pixels)
    if isinstance(source, str):
        lowered = source[:16].lower()
        if lowered.startswith("data:"):
            return _decode(io.BytesIO(_data_url_bytes(source, name)), name, max_pixels)
        if lowered.startswith(("http://", "https://")):
            return _decode(io.BytesIO(_read_url(source, name, max_download_bytes)), name, max_pixels)
        if lowered.startswith("file://"):
            source = urllib.request.url2pathname(urllib.parse.urlparse(source).path)
        source = Path(source)
    if isinstance(source, Path):
        path = source.expanduser()
        if not path.is_file():
            raise ImageError(f"{source}: no such image file" if not path.exists() else f"{source}: not a file")
        if path.stat().st_size == 0:
            raise ImageError(f"{source}: empty file (0 bytes)")
        try:
            with open(path, "rb") as fp:
                return _decode(fp, str(source), max_pixels)
        except PermissionError as exc:
            raise ImageError(f"{source}: cannot open image ({exc})") from None
    raise ImageError(
        f"unsupported image source {name}: expected a path, URL, bytes, PIL image or uint8 numpy array"
    )


# --------------------------------------------------------------------------------------------------
# Colour conversion
# --------------------------------------------------------------------------------------------------

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale to 8-bit 'L' by scaling, not by clipping.

    Pillow's own conversion clips everything above 255, which turns a 16-bit image white. We map 16-bit
    data (and 'I' data that exceeds 8 bits) from 0..65535, and float data from 0..1 when it stays there.
    """
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        peak = float(np.nanmax(values)) if values.size else 0.0
        scale = 255.0 if peak <= 1.0 else 1.0
    elif image.mode.startswith("I;16") or float(values.max(initial=0)) > 255:
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    values = np.nan_to_num(values * scale, nan=0.0)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))  # mode L


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """RGB version of any PIL image; transparency is composited onto white.

    Llama 4 was trained on RGB; transparent pixels are usually background, and Meta's and transformers' code put
    them on white (Meta's ``convert_image_to_rgb``, transformers' ``convert_to_rgb``). Palette images with a
    transparency entry, LA and PA count as transparent too.
    """
    if image.mode == "RGB":
        return image
    try:
        if image.mode in _HIGH_DEPTH_MODES:
            return _high_depth_to_l(image).convert("RGB")
        if image.mode in _ALPHA_MODES or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"{name}: cannot convert image mode {image.mode!r} to RGB ({exc})") from None


# --------------------------------------------------------------------------------------------------
# Canvas choice (docs/architecture.md, "Image tiling", steps 2-4)
# --------------------------------------------------------------------------------------------------


def candidate_canvases(max_patches: int = 16, size: int = 336) -> list[tuple[int, int]]:
    """Every canvas (height, width) in pixels whose tile grid has at most max_patches tiles.

    For n = max_patches..1 and each factor pair h*w = n, grouped by aspect ratio in first-seen order,
    as Meta's and transformers' ``find_supported_resolutions`` enumerate them (the order only matters for exact
    ties, which then go to the first).
    With 16 tiles there are 50 canvases.
    """
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_patches, 0, -1):
        for rows in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio.setdefault(rows / (n // rows), []).append((rows, n // rows))
    return [(rows * size, cols * size) for group in by_ratio.values() for rows, cols in group]


def best_fit_canvas(
    image_hw: tuple[int, int], canvases: Sequence[tuple[int, int]], resize_to_max_canvas: bool = False
) -> tuple[int, int]:
    """The canvas (height, width) an image of image_hw pixels is fitted into.

    Each canvas allows the scale min(Wc/W, Hc/H) without distortion. If some canvas allows scale >= 1, take
    the smallest such scale (the largest with resize_to_max_canvas): no more upscaling than needed. Otherwise
    take the largest scale < 1: as little downscaling as possible. Among canvases with that scale, the
    smallest area (least padding). Scales are computed in float32 like Meta's and transformers' ``get_best_fit``
    (torch default dtype), so that near-equal scales compare exactly as they do there.
    """
    height, width = image_hw
    canvas = np.asarray(canvases, dtype=np.int64)  # (N, 2) rows of (height, width)
    scale_h = canvas[:, 0].astype(np.float32) / np.float32(height)
    scale_w = canvas[:, 1].astype(np.float32) / np.float32(width)
    scales = np.minimum(scale_h, scale_w)  # (N,) the limiting side
    upscaling = scales[scales >= 1]
    if upscaling.size:
        selected = upscaling.max() if resize_to_max_canvas else upscaling.min()
    else:
        selected = scales.max()
    candidates = np.flatnonzero(scales == selected)
    areas = canvas[candidates, 0] * canvas[candidates, 1]
    best = candidates[int(np.argmin(areas))]  # argmin: first of equal areas
    return int(canvas[best, 0]), int(canvas[best, 1])


def fit_without_distortion(image_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """Largest (height, width) with the image's aspect ratio inside target_hw (floor on the free side).

    Same float64 arithmetic as Meta's and transformers' ``get_max_res_without_distortion``; at least 1 pixel per
    side.
    """
    height, width = image_hw
    target_h, target_w = target_hw
    scale_w = target_w / width
    scale_h = target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.floor(height * scale_w), target_h)
    else:
        new_h, new_w = target_h, min(math.floor(width * scale_h), target_w)
    return max(new_h, 1), max(new_w, 1)


def resized_size(
    image_hw: tuple[int, int], canvas_hw: tuple[int, int], size: int = 336, resize_to_max_canvas: bool = False
) -> tuple[int, int]:
    """(height, width) the image is resized to before padding to canvas_hw.

    Without resize_to_max_canvas the target is clamped per side to [min(side, tile), canvas side], so small
    images are upscaled only until a side reaches one tile and never stretched to fill a larger canvas.
    """
    height, width = image_hw
    if resize_to_max_canvas:
        target = canvas_hw
    else:
        target = (min(max(height, size), canvas_hw[0]), min(max(width, size), canvas_hw[1]))
    return fit_without_distortion(image_hw, target)


def tile_grid(image_hw: tuple[int, int], settings: ImageSettings = ImageSettings()) -> tuple[int, int]:
    """(rows, cols) of the tile grid for an image of image_hw pixels, without decoding anything."""
    canvases = candidate_canvases(settings.max_patches, settings.size)
    canvas_h, canvas_w = best_fit_canvas(image_hw, canvases, settings.resize_to_max_canvas)
    return canvas_h // settings.size, canvas_w // settings.size


def tile_count(grid: tuple[int, int]) -> int:
    """Tiles fed to the vision encoder for a (rows, cols) grid: the grid's, plus the global tile if several."""
    rows, cols = grid
    return rows * cols + (rows * cols > 1)


# --------------------------------------------------------------------------------------------------
# Pixels (docs/architecture.md, "Image tiling", steps 4-7)
# --------------------------------------------------------------------------------------------------


def _resize(image: Image.Image, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear, antialiased resize of an RGB image (Meta's PIL path); (H, W, 3) uint8."""
    if image.size != (hw[1], hw[0]):
        image = image.resize((hw[1], hw[0]), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def normalize(pixels: np.ndarray, settings: ImageSettings = ImageSettings()) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32: rescale then (x - mean) / std per channel, in float32."""
    x = pixels.astype(np.float32) * np.float32(settings.rescale_factor)  # (H, W, 3)
    mean = np.asarray(settings.image_mean, dtype=np.float32)
    std = np.asarray(settings.image_std, dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, H, W)


def split_tiles(canvas: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(C, rows*S, cols*S) -> (rows*cols, C, S, S), row-major (tile row outer, tile column inner)."""
    channels, height, width = canvas.shape
    tile_h, tile_w = height // rows, width // cols
    tiles = canvas.reshape(channels, rows, tile_h, cols, tile_w).transpose(1, 3, 0, 2, 4)  # (R, C', ch, S, S)
    return np.ascontiguousarray(tiles).reshape(rows * cols, channels, tile_h, tile_w)


def tile_image(image: Image.Image, settings: ImageSettings = ImageSettings()) -> ProcessedImage:
    """An RGB PIL image as tiles: best-fit canvas, resize, black padding, normalise, split, global tile."""
    image = to_rgb(image)
    size = settings.size
    image_hw = (image.size[1], image.size[0])
    canvas_hw = best_fit_canvas(
        image_hw, candidate_canvases(settings.max_patches, size), settings.resize_to_max_canvas
    )
    rows, cols = canvas_hw[0] // size, canvas_hw[1] // size
    resized = _resize(image, resized_size(image_hw, canvas_hw, size, settings.resize_to_max_canvas))  # (h, w, 3)
    padded = np.zeros((canvas_hw[0], canvas_hw[1], 3), dtype=np.uint8)  # black: -1 after normalisation
    padded[: resized.shape[0], : resized.shape[1]] = resized
    tiles = split_tiles(normalize(padded, settings), rows, cols)  # (rows*cols, 3, S, S)
    if rows * cols > 1:
        # The global tile: the whole original image squeezed to one tile (aspect ratio not kept).
        global_tile = normalize(_resize(image, (size, size)), settings)[None]  # (1, 3, S, S)
        tiles = np.concatenate([tiles, global_tile], axis=0)
    return ProcessedImage(pixel_values=tiles, grid=(rows, cols))


def preprocess_image(source: ImageInput, settings: ImageSettings = ImageSettings()) -> ProcessedImage:
    """Load any supported image source and tile it; see ``load_image`` and ``tile_image``."""
    return tile_image(load_image(source, max_pixels=settings.max_pixels), settings)


def preprocess_images(
    sources: Iterable[ImageInput], settings: ImageSettings = ImageSettings()
) -> tuple[np.ndarray | None, list[tuple[int, int]]]:
    """Several images: pixel values concatenated on the tile axis, and one grid per image.

    Returns (pixel_values (total_tiles, 3, S, S) float32 or None when there is no image, grids).
    """
    processed = [preprocess_image(source, settings) for source in sources]
    if not processed:
        return None, []
    pixel_values = np.concatenate([p.pixel_values for p in processed], axis=0)
    return pixel_values, [p.grid for p in processed]
