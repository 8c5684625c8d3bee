"""Image loading and tiling (mlx_llama4.images) against Meta's and transformers' image preprocessing.

Independent checks: a table of published sizes (canvas, grid, resized size, tiles, <|patch|> and prompt token
counts; the token counts also from transformers' Llama4Processor), pixels computed by hand with PIL + numpy,
Meta's own VariableSizeImageTransform (run with thin torchvision stand-ins, see tokenizer_util.meta_reference),
and transformers' Llama4ImageProcessor when torchvision is importable (it is not on the CI machine).
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

sys.path.insert(0, str(Path(__file__).parent))

from mlx_llama4.images import (  # noqa: E402
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageSettings,
    best_fit_canvas,
    candidate_canvases,
    load_image,
    preprocess_image,
    preprocess_images,
    resized_size,
    tile_count,
    tile_grid,
)
from mlx_llama4.processor import image_token_count  # noqa: E402

S = 336
N = 144  # <|patch|> tokens per tile


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def transformers_image_tokens(grid: tuple[int, int]) -> list[str]:
    """An image's prompt tokens as transformers' Llama4Processor writes them (its ``_prompt_split_image``)."""
    import re

    from transformers.models.llama4.processing_llama4 import Llama4Processor

    return re.findall(r"<\|[a-z_]+\|>", Llama4Processor._prompt_split_image(None, grid, N))


def by_hand(image: Image.Image, canvas_hw, resized_hw, grid) -> np.ndarray:
    """Expected pixel values, computed independently: PIL bilinear, numpy pad/normalise, tile by slicing."""
    rgb = np.asarray(image.convert("RGB").resize((resized_hw[1], resized_hw[0]), Image.BILINEAR))
    canvas = np.zeros((*canvas_hw, 3), np.float64)
    canvas[: resized_hw[0], : resized_hw[1]] = rgb
    canvas = (canvas / 255.0 - 0.5) / 0.5
    rows, cols = grid
    tiles = [
        canvas[r * S : (r + 1) * S, c * S : (c + 1) * S].transpose(2, 0, 1) for r in range(rows) for c in range(cols)
    ]
    if rows * cols > 1:
        glob = np.asarray(image.convert("RGB").resize((S, S), Image.BILINEAR), np.float64)
        tiles.append(((glob / 255.0 - 0.5) / 0.5).transpose(2, 0, 1))
    return np.stack(tiles)


# ---- canvases and the table of published sizes ------------------------------------------------------


def test_candidate_canvases():
    canvases = candidate_canvases(16, S)
    assert len(canvases) == 50 == len(set(canvases))
    grids = {(h // S, w // S) for h, w in canvases}
    assert all(h % S == 0 and w % S == 0 for h, w in canvases)
    assert all(rows * cols <= 16 for rows, cols in grids)
    assert {(1, 1), (16, 1), (1, 16), (4, 4), (3, 5), (5, 3)} <= grids
    assert (4, 5) not in grids and (17, 1) not in grids
    assert len(candidate_canvases(4, 224)) == 8  # the docstring example of the references


# W, H, resize_to_max_canvas, canvas (H, W), grid (rows, cols), resized (H, W), tiles fed, <|patch|>, prompt tokens
TABLE = [
    (200, 150, False, (336, 336), (1, 1), (252, 336), 1, 144, 147),
    (500, 500, False, (672, 672), (2, 2), (500, 500), 5, 720, 727),
    (640, 480, False, (672, 672), (2, 2), (480, 640), 5, 720, 727),
    (1024, 768, False, (1008, 1344), (3, 4), (768, 1024), 13, 1872, 1887),
    (1920, 1080, False, (1008, 1680), (3, 5), (945, 1680), 16, 2304, 2322),
    (300, 800, False, (1008, 336), (3, 1), (800, 300), 4, 576, 582),
    (4000, 500, False, (336, 2688), (1, 8), (336, 2688), 9, 1296, 1307),
    (100, 2000, False, (2016, 336), (6, 1), (2000, 100), 7, 1008, 1017),
    (640, 480, True, (1008, 1344), (3, 4), (1008, 1344), 13, 1872, 1887),
    (336, 336, True, (1344, 1344), (4, 4), (1344, 1344), 17, 2448, 2467),
    # extreme aspect ratios and sizes (worked out from the rules of Meta's preprocess.py)
    (1, 1, False, (336, 336), (1, 1), (336, 336), 1, 144, 147),
    (5000, 1, False, (336, 5040), (1, 15), (1, 5000), 16, 2304, 2322),  # 15 tiles are enough
    (1, 5000, False, (5040, 336), (15, 1), (5000, 1), 16, 2304, 2322),
    (20000, 1, False, (336, 5376), (1, 16), (1, 5376), 17, 2448, 2467),  # floor gives 0 rows: kept at 1
    (336, 336, False, (336, 336), (1, 1), (336, 336), 1, 144, 147),
    (337, 337, False, (672, 672), (2, 2), (337, 337), 5, 720, 727),
    (6000, 4000, False, (1008, 1680), (3, 5), (1008, 1512), 16, 2304, 2322),  # downscale as little as possible
]


@pytest.mark.parametrize("width,height,max_canvas,canvas,grid,resized,tiles,patches,prompt", TABLE)
def test_table(width, height, max_canvas, canvas, grid, resized, tiles, patches, prompt):
    settings = ImageSettings(resize_to_max_canvas=max_canvas)
    got_canvas = best_fit_canvas((height, width), candidate_canvases(16, S), max_canvas)
    assert got_canvas == canvas
    assert tile_grid((height, width), settings) == grid
    assert resized_size((height, width), canvas, S, max_canvas) == resized
    assert tile_count(grid) == tiles
    assert image_token_count(grid, N) == prompt
    hf_tokens = transformers_image_tokens(grid)
    assert (len(hf_tokens), hf_tokens.count("<|patch|>")) == (prompt, patches)
    if width * height <= 4_000_000:  # pixels for all but the largest (its grid is checked above)
        out = preprocess_image(Image.new("RGB", (width, height), (90, 160, 30)), settings)
        assert out.grid == grid and out.num_tiles == tiles
        assert out.pixel_values.shape == (tiles, 3, S, S) and out.pixel_values.dtype == np.float32


# ---- pixels -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("width,height", [(200, 150), (640, 480), (300, 800), (1000, 480), (37, 3000)])
def test_pixels_by_hand(width, height):
    image = noise_image(width, height, seed=width)
    out = preprocess_image(image)
    canvas = best_fit_canvas((height, width), candidate_canvases(16, S))
    expected = by_hand(image, canvas, resized_size((height, width), canvas, S), out.grid)
    assert out.pixel_values.shape == expected.shape
    assert np.abs(out.pixel_values - expected).max() <= 1e-6


def test_tile_order_row_major_and_global_tile_last():
    # 1008 x 672 fills a 2 x 3 grid exactly (no resize); each tile region gets its own grey level.
    rows, cols = 2, 3
    levels = np.arange(rows * cols, dtype=np.uint8).reshape(rows, cols) * 40 + 10
    pixels = np.kron(levels, np.ones((S, S), np.uint8))  # (672, 1008)
    out = preprocess_image(np.stack([pixels] * 3, axis=-1))
    assert out.grid == (rows, cols) and out.num_tiles == 7
    for k in range(rows * cols):
        want = levels[k // cols, k % cols] / 255.0 * 2 - 1
        assert np.allclose(out.pixel_values[k], want, atol=1e-6), k
    glob = np.asarray(Image.fromarray(pixels).convert("RGB").resize((S, S), Image.BILINEAR), np.float32)
    assert np.allclose(out.pixel_values[-1], (glob / 255.0 * 2 - 1).transpose(2, 0, 1), atol=1e-6)


def test_padding_is_minus_one_and_single_tile_has_no_global():
    out = preprocess_image(Image.new("RGB", (200, 150), (255, 255, 255)))  # resized to 252 x 336
    assert out.pixel_values.shape == (1, 3, S, S)
    assert np.all(out.pixel_values[0, :, :252, :] == 1.0)
    assert np.all(out.pixel_values[0, :, 252:, :] == -1.0)


def test_padding_right_in_multi_tile_grid():
    out = preprocess_image(Image.new("RGB", (500, 500), (255, 255, 255)))  # 2 x 2 canvas, 500 x 500 content
    tiles = out.pixel_values
    assert np.all(tiles[0] == 1.0)
    assert np.all(tiles[1][:, :, : 500 - S] == 1.0) and np.all(tiles[1][:, :, 500 - S :] == -1.0)
    assert np.all(tiles[2][:, 500 - S :, :] == -1.0)
    assert np.all(tiles[3][:, : 500 - S, : 500 - S] == 1.0) and np.all(tiles[3][:, 500 - S :, :] == -1.0)
    assert np.all(tiles[4] == 1.0)  # the global tile is the whole image, unpadded


def test_mean_std_and_rescale_from_settings():
    settings = ImageSettings(image_mean=(0.1, 0.2, 0.3), image_std=(0.5, 0.25, 2.0))
    out = preprocess_image(Image.new("RGB", (336, 336), (51, 102, 204)), settings)
    for c, value in enumerate((51, 102, 204)):
        want = (value / 255.0 - settings.image_mean[c]) / settings.image_std[c]
        assert np.allclose(out.pixel_values[0, c], want, atol=1e-6)


def test_preprocess_images_concatenates():
    pixel_values, grids = preprocess_images([Image.new("RGB", (200, 150)), Image.new("RGB", (1000, 480))])
    assert grids == [(1, 1), (2, 3)] and pixel_values.shape == (1 + 7, 3, S, S)
    assert preprocess_images([]) == (None, [])


@pytest.mark.parametrize("width,height", [(200, 150), (1000, 480), (300, 800), (640, 480), (4000, 500), (1, 1)])
def test_against_meta_variable_size_transform(width, height):
    """Meta's own canvas choice, resize, pad, normalise and split (torchvision replaced by PIL stand-ins)."""
    from tokenizer_util import meta_reference

    _, preprocess = meta_reference()
    image = noise_image(width, height, seed=7)
    tiles, aspect = preprocess.VariableSizeImageTransform(S)(image, max_num_chunks=16)
    if tiles.shape[0] > 1:
        glob = preprocess.ResizeNormalizeImageTransform(S, S)(image)[None]
        tiles = np.concatenate([tiles.numpy(), glob.numpy()])
    else:
        tiles = tiles.numpy()
    out = preprocess_image(image)
    assert out.grid == tuple(aspect)
    assert out.pixel_values.shape == tiles.shape
    assert np.abs(out.pixel_values - tiles).max() <= 1e-6


EXTREME_SIZES = [(1, 1), (2, 1), (1, 2), (5000, 1), (1, 5000), (20000, 1), (1, 20000), (6000, 4000), (5376, 336),
                 (5377, 336), (1344, 1344), (1345, 1343), (335, 337), (4032, 3024), (999, 1), (3, 1001)]


@pytest.mark.parametrize("width,height", EXTREME_SIZES)
def test_canvas_and_size_against_meta(width, height):
    """Grid and resized size from Meta's get_best_fit / resize_without_distortion, for extreme shapes."""
    from tokenizer_util import meta_reference

    import torch

    _, preprocess = meta_reference()
    meta = preprocess.VariableSizeImageTransform(S)
    canvases = torch.tensor(meta.find_supported_resolutions(max_num_chunks=16, patch_size=S))
    best = meta.get_best_fit((width, height), canvases)  # Meta's (width, height) convention
    image = Image.new("RGB", (width, height), (10, 20, 30))
    resized = meta.resize_without_distortion(image, best, max_upscaling_size=S)
    grid = tile_grid((height, width))
    assert grid == (best[1] // S, best[0] // S)
    canvas = (grid[0] * S, grid[1] * S)
    assert resized_size((height, width), canvas, S) == (resized.size[1], resized.size[0])


def test_against_transformers_image_processor():
    """transformers' Llama4ImageProcessor (bf16, torchvision antialias): needs torchvision, else skipped."""
    pytest.importorskip("torchvision", reason="torchvision is optional (not installable beside torch 2.13)")
    try:
        from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor
    except Exception as exc:  # a torchvision that does not load next to this torch
        pytest.skip(f"Llama4ImageProcessor unavailable: {exc}")
    processor = Llama4ImageProcessor()
    for width, height in [(200, 150), (1000, 480), (300, 800)]:
        image = noise_image(width, height, seed=3)
        ref = processor(images=[image], return_tensors="pt")
        out = preprocess_image(image)
        assert tuple(ref["aspect_ratios"][0].tolist()) == out.grid
        ref_pixels = ref["pixel_values"].float().numpy()
        assert ref_pixels.shape == out.pixel_values.shape
        assert np.abs(ref_pixels - out.pixel_values).max() <= 0.04


# ---- decoding and colour --------------------------------------------------------------------------


def test_sources_path_bytes_pil_array_agree(tmp_path):
    image = noise_image(120, 90)
    path = tmp_path / "noise.png"
    image.save(path)
    data = path.read_bytes()
    want = np.asarray(image)
    for source in (path, str(path), f"file://{path}", data, bytearray(data), image, want):
        assert np.array_equal(np.asarray(load_image(source)), want), type(source)
    import base64

    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert np.array_equal(np.asarray(load_image(url)), want)


def test_grayscale_arrays():
    gray = np.full((20, 30), 77, np.uint8)
    for array in (gray, gray[:, :, None]):
        rgb = load_image(array)
        assert rgb.mode == "RGB" and rgb.size == (30, 20) and np.all(np.asarray(rgb) == 77)


def test_exif_orientation_applied():
    # Left half red, right half blue, stored with Orientation 6 ("rotate 90 degrees clockwise to view").
    array = np.zeros((40, 80, 3), np.uint8)
    array[:, :40] = (255, 0, 0)
    array[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(Image.fromarray(array), "JPEG", exif=exif.tobytes(), quality=95)
    upright = np.asarray(load_image(data)).astype(int)
    assert upright.shape == (80, 40, 3)  # width and height swapped
    assert upright[10, 20, 0] > 200 and upright[10, 20, 2] < 60  # the red half is now on top
    assert upright[70, 20, 2] > 200 and upright[70, 20, 0] < 60
    # A PIL image passed in is taken as it is (already decoded by the caller).
    assert load_image(Image.open(io.BytesIO(data))).size == (80, 40)


def test_rgba_composited_onto_white():
    array = np.zeros((10, 10, 4), np.uint8)  # fully transparent black
    array[:5, :, :] = (255, 0, 0, 128)  # half-transparent red on top
    for source in (array, Image.fromarray(array), encoded(Image.fromarray(array), "PNG")):
        rgb = np.asarray(load_image(source)).astype(int)
        assert np.all(rgb[5:] == 255)
        assert np.all(np.abs(rgb[:5] - (255, 127, 127)) <= 1)


def test_la_and_palette_with_transparency():
    la = Image.fromarray(np.stack([np.full((8, 8), 0, np.uint8), np.zeros((8, 8), np.uint8)], -1), mode="LA")
    assert np.all(np.asarray(load_image(encoded(la, "PNG"))) == 255)
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    for fmt in ("PNG", "GIF"):
        rgb = np.asarray(load_image(encoded(palette, fmt, transparency=0)))
        assert tuple(rgb[0, 0]) == (255, 255, 255)  # the transparent index
        assert tuple(rgb[4, 4]) == (255, 0, 0)


def test_cmyk():
    cmyk = Image.new("CMYK", (50, 40), (0, 0, 0, 0))  # no ink: white
    for source in (cmyk, encoded(cmyk, "JPEG", quality=95), encoded(cmyk, "TIFF")):
        rgb = load_image(source)
        assert rgb.mode == "RGB" and np.all(np.asarray(rgb).astype(int) >= 250)
    assert preprocess_image(encoded(cmyk, "JPEG")).grid == (1, 1)


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 256).astype(np.uint16)[None].repeat(4, 0)  # (4, 256)
    data = encoded(Image.fromarray(ramp), "PNG")
    source_mode = Image.open(io.BytesIO(data)).mode
    assert source_mode.startswith("I")
    rgb = np.asarray(load_image(data)).astype(int)
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255
    assert abs(rgb[0, 128, 0] - 128) <= 1  # Pillow's plain convert would give 255 here
    # 32-bit integer and float greyscale
    assert np.asarray(load_image(Image.fromarray(ramp.astype(np.int32), mode="I")))[0, -1, 0] == 255
    assert np.asarray(load_image(Image.fromarray(np.full((4, 4), 0.5, np.float32), mode="F")))[0, 0, 0] == 128


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    rgb = np.asarray(load_image(buf.getvalue()))
    assert tuple(rgb[8, 8]) == (255, 0, 0)


# ---- errors -----------------------------------------------------------------------------------------


@pytest.fixture
def strict_truncation(monkeypatch):
    """Pillow decodes truncated files with grey fill when LOAD_TRUNCATED_IMAGES is set (Meta's preprocess
    sets it on import); these tests want the default, strict behaviour."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_names_path(tmp_path, fmt, strict_truncation):
    data = encoded(noise_image(300, 200), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated") as info:
        preprocess_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageError, match="bytes of image data"):
        load_image(data[: len(data) // 2])


def test_truncated_file_with_pillow_leniency_works_like_meta(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encoded(noise_image(300, 200), "JPEG")
    assert preprocess_image(data[: len(data) // 2]).grid == (1, 1)


def test_garbage_empty_missing(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageError, match="not a recognised image") as info:
        load_image(garbage)
    assert str(garbage) in str(info.value)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty") as info:
        load_image(str(empty))
    assert str(empty) in str(info.value)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)


def test_zero_size_and_bad_arrays():
    with pytest.raises(ImageError, match="zero size"):
        load_image(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match="unsupported image source"):
        load_image(12345)  # type: ignore[arg-type]
    assert issubclass(ImageError, ValueError)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR for width x height and no pixel data: a decompression bomb's header."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bomb(tmp_path, strict_truncation):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(30000, 30000))
    with pytest.raises(ImageError) as info:
        preprocess_image(bomb)
    message = str(info.value)
    assert str(bomb) in message and "900,000,000 pixels" in message and f"{DEFAULT_MAX_PIXELS:,}" in message
    # The limit is configurable, both ways.
    with pytest.raises(ImageError, match="10,000 pixels.*limit of 9,999"):
        preprocess_image(encoded(Image.new("RGB", (100, 100)), "PNG"), ImageSettings(max_pixels=9_999))
    assert preprocess_image(encoded(Image.new("RGB", (100, 100)), "PNG"), ImageSettings(max_pixels=10_000))
    # Past Pillow's own limit: the header is accepted, and the missing pixel data is then reported.
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(bomb, max_pixels=None)
    assert Image.MAX_IMAGE_PIXELS == limit
