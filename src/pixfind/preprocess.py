"""CLIP's standard image preprocessing without torch: Pillow resizes and crops, numpy normalises.

open_clip's transform for the CLIP models is: shorter side to ``size`` (bicubic), centre crop to
``size`` x ``size``, scale to [0, 1], normalise by a per-channel mean and std. Split in two here:
:func:`resize_crop` (the costly part, done where the image is decoded) gives uint8 pixels, and
the normalisation is done by whoever runs the model: numpy for the exported towers
(:func:`normalise`), the GPU itself for a CUDA model (a quarter of the bytes to copy, and no torch
work in the decode threads). :func:`clip_normalisation` says whether a transform is this pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

Normalisation = tuple[tuple[float, float, float], tuple[float, float, float]]


def resize_crop(image: Image.Image, size: int) -> np.ndarray:
    """Shorter side to ``size`` (bicubic), centre crop: uint8 (3, size, size), as torchvision does."""
    from PIL import Image

    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    left = round((new_w - size) / 2.0)
    top = round((new_h - size) / 2.0)
    if (new_w, new_h) != (size, size):
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def normalise(pixels: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 (…, 3, H, W) to the model's float32 input; ``mean``/``std`` shaped (3, 1, 1)."""
    return (pixels.astype(np.float32) / np.float32(255) - mean) / std


def clip_normalisation(transform: Any, image_size: int) -> Normalisation | None:
    """(mean, std) when ``transform`` is open_clip's standard CLIP pipeline at ``image_size``
    (what :func:`resize_crop` + normalising reproduce), else None."""
    from torchvision import transforms as T

    def kind(step: Any) -> str:  # open_clip's RGB conversion is a class or a plain function
        return getattr(step, "__name__", type(step).__name__)

    rgb = ("MaybeConvertMode", "_convert_to_rgb")  # resize_crop converts to RGB first
    steps = [s for s in getattr(transform, "transforms", []) if kind(s) not in rgb]
    if [kind(s) for s in steps] != ["Resize", "CenterCrop", "MaybeToTensor", "Normalize"]:
        return None
    resize, crop, _, normalize = steps
    size = resize.size if isinstance(resize.size, int) else None
    if isinstance(resize.size, (list, tuple)) and len(resize.size) == 1:
        size = resize.size[0]
    if (
        size != image_size
        or resize.interpolation != T.InterpolationMode.BICUBIC
        or resize.max_size is not None
        or tuple(crop.size) != (image_size, image_size)
    ):
        return None
    mean = tuple(float(v) for v in normalize.mean)
    std = tuple(float(v) for v in normalize.std)
    if len(mean) != 3 or len(std) != 3:
        return None
    return (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])
