"""Image settings to and from a checkpoint's image-processor config (Hub ``preprocessor_config.json`` spelling).

Hub checkpoints keep the image settings in ``preprocessor_config.json`` and a few prompt settings (``patch_size``)
at the top level of ``processor_config.json``; transformers 5 writes one ``processor_config.json`` with the image
settings nested under ``image_processor``.
"""

from __future__ import annotations

from typing import Any, Mapping

from .images import DEFAULT_MAX_PIXELS, ImageSettings
from .prompt import ProcessorError


def _size_from(value: Any) -> int | None:
    """Tile size from ``{"height": h, "width": w}`` (square only) or a plain number."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        height, width = value.get("height"), value.get("width")
        if height is None and width is None:
            return None
        if height is not None and width is not None and height != width:
            raise ProcessorError(f"Llama 4 tiles are square, got size {dict(value)}")
        return int(height if height is not None else width)
    return int(value)


def image_settings_from_config(config: Mapping, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageSettings:
    """ImageSettings from an image-processor config dict; what it does not say keeps the published defaults."""
    defaults = ImageSettings()
    size = _size_from(config.get("size")) or defaults.size
    mean = tuple(config.get("image_mean") or defaults.image_mean)
    std = tuple(config.get("image_std") or defaults.image_std)
    rescale = config.get("rescale_factor", defaults.rescale_factor)
    if config.get("do_rescale") is False:
        rescale = 1.0
    if config.get("do_normalize") is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if len(mean) == 1:
        mean = mean * 3
    if len(std) == 1:
        std = std * 3
    return ImageSettings(
        size=size,
        max_patches=int(config.get("max_patches", defaults.max_patches)),
        resize_to_max_canvas=bool(config.get("resize_to_max_canvas", defaults.resize_to_max_canvas)),
        image_mean=tuple(float(m) for m in mean),
        image_std=tuple(float(s) for s in std),
        rescale_factor=float(rescale),
        max_pixels=max_pixels,
    )


def image_processor_config(settings: ImageSettings) -> dict:
    """preprocessor_config.json for ``settings``, as transformers' ``Llama4ImageProcessorFast`` reads it."""
    return {
        "image_processor_type": "Llama4ImageProcessorFast",
        "processor_class": "Llama4Processor",
        "do_convert_rgb": True,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "resample": 2,  # bilinear
        "size": {"height": settings.size, "width": settings.size},
        "max_patches": settings.max_patches,
        "resize_to_max_canvas": settings.resize_to_max_canvas,
        "image_mean": list(settings.image_mean),
        "image_std": list(settings.image_std),
        "rescale_factor": settings.rescale_factor,
    }
