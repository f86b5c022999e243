"""The one pixel contract between decoding and the models: CLIP's resize and centre crop to uint8.

open_clip's transform for the CLIP models is: shorter side to ``size`` (bicubic), centre crop to
``size`` x ``size``, scale to [0, 1], normalise by a per-channel mean and std. It is split in two
here. :func:`resize_crop` (the costly part, done where the image is decoded) gives uint8 pixels;
the scaling and normalisation, one :class:`Normalisation` value, are applied by whichever runtime
runs the model, its own way: numpy for ONNX Runtime, torch on the device, OpenVINO compiled into
the model. Decode threads then do no float work, and a batch crosses as a quarter of the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class Normalisation:
    """CLIP's per-channel ``mean`` and ``std`` for pixel values scaled to [0, 1]."""

    mean: Triple
    std: Triple

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (…, 3, H, W) to the model's float32 input, in numpy (for ONNX Runtime)."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        return (pixels.astype(np.float32) / np.float32(255) - mean) / std


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


def draft_side_for(image_size: int) -> int:
    """Shortest side to decode images at: 1.5x the model's input keeps the embedding what full
    decoding gives (docs/speed.md) while decoding far less."""
    return 3 * image_size // 2


def clip_normalisation(transform: Any, image_size: int) -> Normalisation | None:
    """The :class:`Normalisation` when ``transform`` is open_clip's standard CLIP pipeline at
    ``image_size`` (what :func:`resize_crop` + normalising reproduce), else None."""
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
    return Normalisation((mean[0], mean[1], mean[2]), (std[0], std[1], std[2]))
