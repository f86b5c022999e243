"""Where a file is decoded: open, check, orient and convert an image to RGB.

Everything that can go wrong with one file becomes an :class:`ImageLoadError` with a short reason
("truncated image", "permission denied", ...) so the indexer can skip the file, count it and list
it at the end while every other file is stored.
"""

from __future__ import annotations

import errno
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .facts import Header, header_of

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})

#: Images with more pixels than this are refused before decoding (decompression-bomb guard).
#: 180 MP covers every camera sold today; a header claiming 100000x100000 is refused at once.
MAX_PIXELS = 180_000_000

# Pillow's own guard warns at 89 MP and raises at twice that; ours is explicit, so silence it and
# set Pillow's hard limit just above ours as a second line of defence.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS * 2
ImageFile.LOAD_TRUNCATED_IMAGES = False
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

_WHITE = (255, 255, 255)


class ImageLoadError(Exception):
    """One file could not be turned into an image; ``reason`` says why, in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class LoadedImage:
    image: Image.Image  # RGB, orientation applied, possibly reduced in size
    width: int  # size of the original, as displayed (after EXIF rotation)
    height: int
    header: Header | None = None  # its EXIF date and camera, and format (load_image only)


def has_image_extension(name: str) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def load_image(path: str | Path, min_side: int | None = None, data: bytes | None = None) -> LoadedImage:
    """Decode ``path`` (or ``data``, its bytes already read) to an RGB image.

    ``min_side``: when given, the image may be decoded at reduced size (JPEG DCT scaling via
    ``Image.draft``, an integer box reduction for other formats) as long as its shorter side stays
    at least ``min_side`` pixels. The CLIP transform then resizes it the rest of the way; this
    changes pixels far less than the model notices, and decodes large JPEGs several times faster.
    """
    if data is not None and not data:
        raise ImageLoadError("empty file")
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            return _decode(img, min_side)
    except ImageLoadError:
        raise
    except Exception as exc:
        raise ImageLoadError(describe_failure(exc, path)) from exc


def _decode(img: Image.Image, min_side: int | None) -> LoadedImage:
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise ImageLoadError(f"too large: {width}x{height} px (limit {MAX_PIXELS // 1_000_000} MP)")
    if getattr(img, "is_animated", False):  # not n_frames: that walks every frame of the file
        img.seek(0)  # animated GIF/WebP/TIFF: the first frame stands for the file
    if min_side and img.format == "JPEG":
        img.draft(img.mode, (min_side, min_side))
    img.load()
    header = header_of(img, loaded=True)  # from the bytes already in memory: the file is not read again
    if _rotated(img):
        width, height = height, width
    oriented = ImageOps.exif_transpose(img)
    rgb = to_rgb(oriented)
    if min_side:
        rgb = _reduce(rgb, min_side)
    return LoadedImage(rgb, width, height, header)


def load_reduced(
    source: str | Path | BinaryIO, min_side: int, max_pixels: int = MAX_PIXELS, max_jpeg_pixels: int | None = None
) -> LoadedImage:
    """Decode ``source`` (a path or an open binary file) for a query or a thumbnail, in as little
    memory as the format allows.

    Unlike :func:`load_image`, the image is reduced (an integer box reduction, shorter side kept at
    least ``min_side``) *before* it is converted to RGB, so an alpha, palette or 16-bit image is
    never converted at full size. The pixel
    limit is checked from the header, before decoding; ``max_jpeg_pixels`` (default: the same)
    applies to JPEGs, which the codec decodes at 1/2 to 1/8 scale.
    """
    try:
        with Image.open(source) as img:
            limit = max_jpeg_pixels if img.format == "JPEG" and max_jpeg_pixels else max_pixels
            return _decode_reduced(img, min_side, limit)
    except ImageLoadError:
        raise
    except Exception as exc:
        raise ImageLoadError(describe_failure(exc, source if isinstance(source, (str, Path)) else "")) from exc


def _decode_reduced(img: Image.Image, min_side: int, max_pixels: int) -> LoadedImage:
    width, height = img.size
    if width * height > max_pixels:
        raise ImageLoadError(f"too large: {width}x{height} px (limit {max_pixels / 1_000_000:g} MP)")
    if getattr(img, "is_animated", False):
        img.seek(0)
    if img.format == "JPEG":
        img.draft(img.mode, (min_side, min_side))
    img.load()
    if _rotated(img):
        width, height = height, width
    oriented = ImageOps.exif_transpose(img)  # a copy only when rotated (JPEGs are small by now)
    return LoadedImage(to_rgb(_shrink(oriented, min_side)), width, height)


#: Modes whose channels can be averaged as they are (``reduce`` premultiplies alpha itself).
_AVERAGEABLE = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "I", "F"})


def _shrink(img: Image.Image, min_side: int) -> Image.Image:
    factor = min(img.size) // min_side
    if factor < 2:
        return img
    if img.mode in ("P", "PA"):  # palette indices cannot be averaged
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    elif img.mode.startswith("I;16"):
        img = img.convert("I")
    elif img.mode not in _AVERAGEABLE:
        img = to_rgb(img)
    return img.reduce(factor)


def _rotated(img: Image.Image) -> bool:
    """True when the EXIF orientation swaps width and height (5-8)."""
    try:
        return img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:
        return False


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha over white, 16-bit scaled, CMYK/palette mapped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _high_depth_to_rgb(img)
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit and float grayscale: scale to 0-255 instead of clipping (Pillow clips)."""
    array = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        top = 1.0 if array.size and float(array.max()) <= 1.0 else 255.0
    else:
        top = 65535.0 if array.size and float(array.max()) > 255 else 255.0
    scaled = np.clip(array * (255.0 / top), 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled, mode="L").convert("RGB")


def _reduce(img: Image.Image, min_side: int) -> Image.Image:
    factor = min(img.size) // min_side
    return img.reduce(factor) if factor >= 2 else img


def describe_failure(exc: BaseException, path: str | Path = "") -> str:
    """A few words for why one file could not be loaded."""
    if isinstance(exc, FileNotFoundError):
        return "file vanished before it could be read"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, Image.DecompressionBombError):
        return "too large (decompression bomb guard)"
    if isinstance(exc, UnidentifiedImageError):
        try:
            if path and Path(path).stat().st_size == 0:
                return "empty file"
        except OSError:
            pass
        return "not an image (unknown or corrupt format)"
    text = str(exc)
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return "truncated image"
    if isinstance(exc, OSError) and exc.errno in (errno.EIO, errno.ENXIO):
        return f"I/O error: {exc.strerror}"
    if isinstance(exc, MemoryError):
        return "out of memory while decoding"
    first_line = text.splitlines()[0] if text else type(exc).__name__
    return f"cannot decode: {first_line[:120]}"
