"""JPEG decoding on the GPU, beside the CPU decode threads (``--decode auto|cpu|gpu``).

On a GPU machine the model is no longer the limit: the CPU's decode threads are (benchmarks/gpu.py,
docs/speed.md). Here the decode threads still read each file once and hash those bytes (the row
records exactly what was embedded), but for a JPEG the GPU can take they stop there and pass the
compressed bytes on; the batch is then decoded by torchvision's batched ``decode_jpeg`` (nvJPEG),
oriented, resized (antialiased bicubic, shorter side to the model input, centre crop: the CPU
path's :func:`~pixfind.models.pixels.resize_crop`) and handed to the model as uint8 pixels that never
leave the device; the model normalises them there, as it does the CPU path's pixels.

What stays on the CPU path, decided per file from its header (:func:`gpu_header`): anything not a
JPEG, CMYK/YCCK and Adobe-RGB JPEGs (the GPU decoder's colour conversion is YCbCr), files with no
end-of-image marker after their last scan (truncated: the CPU path names the failure, where a GPU
decoder may return half a picture), and JPEGs above :data:`GPU_MAX_PIXELS`, which the GPU must
decode at full size while Pillow's ``draft()`` decodes them at 1/2 to 1/8 scale. A GPU decode that
fails for one file of a batch is retried for that file alone, then decoded on the CPU path, so one
bad file costs a retry and never fails its neighbours.

The device is a parameter: torchvision's ``decode_jpeg`` also runs on the CPU, so the routing,
orientation, resizing and fallbacks are tested on machines without a GPU.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..config import decode_mode_from
from ..errors import PixfindError
from ..models.pixels import resize_crop
from .decode import MAX_PIXELS, ImageLoadError, load_image
from .facts import Header, header_of
from .pipeline import Compressed, Decoded, Failed

if TYPE_CHECKING:
    from ..models.base import Encoder
    from ..store import Row

#: JPEGs with more pixels than this are decoded on the CPU, where ``draft()`` reduces them while
#: decoding, while the GPU decoder works at full size: the largest files keep the CPU threads
#: busy beside the GPU (docs/speed.md, "GPU decoding": why this limit; benchmarks/gpu.py
#: ``--gpu-max-mp`` measures others).
GPU_MAX_PIXELS = 8_000_000

#: How many JPEGs one ``decode_jpeg`` call takes: their full-size pixels are on the device at once.
DECODE_CHUNK = 64

_ORIENTATION = 0x0112
_EOI, _SOS = b"\xff\xd9", b"\xff\xda"

# torchvision 0.29 marks its image codecs deprecated (in favour of TorchCodec) on every call; and
# torch warns that the bytes object it wraps (never written to) is read-only.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
warnings.filterwarnings("ignore", message="The given buffer is not writable")


@dataclass(frozen=True, slots=True)
class JpegHeader:
    """What the GPU path needs from a JPEG's header: its stored size and EXIF orientation."""

    width: int  # as stored, before orientation
    height: int
    orientation: int  # EXIF 1-8 (1: as stored)
    exif: Header  # date taken, camera and format, for the row's facts (:mod:`.facts`)

    @property
    def displayed(self) -> tuple[int, int]:
        """Width and height as shown, after the EXIF rotation (as the CPU path records them)."""
        swapped = self.orientation in (5, 6, 7, 8)
        return (self.height, self.width) if swapped else (self.width, self.height)


def gpu_header(data: bytes, max_pixels: int = GPU_MAX_PIXELS) -> JpegHeader | None:
    """The header of ``data`` when the GPU decoder should take it, else None (the CPU path).

    Pillow reads the markers up to the first scan only (no pixel is decoded)."""
    if not data.startswith(b"\xff\xd8"):
        return None  # not a JPEG
    if not ends_complete(data):
        return None  # truncated: the CPU path names the failure
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:
            if img.mode not in ("RGB", "L"):
                return None  # CMYK / YCCK
            if img.mode == "RGB" and img.info.get("adobe_transform") == 0:
                return None  # colour stored as RGB, not YCbCr (greyscale has no transform to mark)
            width, height = img.size
            orientation = int(img.getexif().get(_ORIENTATION, 1))
            exif = header_of(img)
    except Exception:
        return None  # the CPU path decodes it, or reports why it cannot
    if width * height > min(max_pixels, MAX_PIXELS):
        return None
    return JpegHeader(width, height, orientation, exif)


def ends_complete(data: bytes) -> bool:
    """An end-of-image marker follows the last scan. Searched from the end (a complete file's is
    there, before any trailer): entropy-coded data never holds FFD9 or FFDA, so a scan marker
    after the last end marker means the file stops inside that scan (an EXIF thumbnail's end
    marker comes before the image's first scan)."""
    end = data.rfind(_EOI)
    return end >= 0 and data.find(_SOS, end) < 0


def orient(image: Any, orientation: int) -> Any:
    """Apply an EXIF orientation to a (C, H, W) tensor, as ``ImageOps.exif_transpose`` does."""
    import torch

    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(image, -1, (-2, -1))
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(image, 1, (-2, -1))
    return image  # 1, or a value no camera writes: as stored, like exif_transpose


def resize_crop_tensor(image: Any, size: int) -> Any:
    """:func:`~pixfind.models.pixels.resize_crop` for a uint8 (3, H, W) tensor, where it lies:
    shorter side to ``size`` (bicubic, antialiased), centre crop; uint8 (3, size, size)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    height, width = image.shape[-2:]
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        image = F.resize(image, [new_h, new_w], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return F.center_crop(image, [size, size])


@dataclass
class DecodeCounts:
    """Where a run's files were decoded (benchmarks print it; tests check the routing)."""

    on_device: int = 0  # JPEGs decoded by the GPU decoder
    cpu_path: int = 0  # files the decode threads decoded (not JPEG, CMYK, too large, truncated...)
    fallback: int = 0  # JPEGs the GPU decoder refused, then decoded on the CPU path
    failed: int = 0  # JPEGs neither could decode
    batch_retries: int = 0  # decode calls that failed as a whole and were retried file by file


class GpuDecoder:
    """Decodes a batch's JPEG bytes on ``device`` into the model's uint8 pixels, there."""

    def __init__(self, device: str, image_size: int, min_side: int | None, max_pixels: int = GPU_MAX_PIXELS) -> None:
        """``min_side``: the CPU path's draft side, for the files that fall back to it."""
        self.device = device
        self.image_size = image_size
        self.min_side = min_side
        self.max_pixels = max_pixels
        self.counts = DecodeCounts()

    def route(self, data: bytes) -> JpegHeader | None:
        """The decode threads' question: does the GPU take these bytes (their header), or not."""
        return gpu_header(data, self.max_pixels)

    def pixels(self, batch: Sequence[Decoded | Compressed]) -> tuple[Any, list[int], list[Failed]]:
        """uint8 (N, 3, S, S) on the device for the files of ``batch`` that could be decoded, the
        positions in ``batch`` of those N files, and the files that could not (with the CPU
        path's reason)."""
        import torch

        tensors: dict[int, Any] = {}
        failed: list[Failed] = []
        jpegs = [i for i, entry in enumerate(batch) if isinstance(entry, Compressed)]
        for start in range(0, len(jpegs), DECODE_CHUNK):
            chunk = jpegs[start : start + DECODE_CHUNK]
            decoded = self._decode_jpegs([batch[i] for i in chunk])  # type: ignore[misc]
            for i, image in zip(chunk, decoded, strict=True):
                entry = batch[i]
                assert isinstance(entry, Compressed)
                if image is None:
                    image = self._on_cpu(entry)
                    if isinstance(image, Failed):
                        self.counts.failed += 1
                        failed.append(image)
                        continue
                    self.counts.fallback += 1
                    tensors[i] = image
                else:
                    self.counts.on_device += 1
                    tensors[i] = resize_crop_tensor(orient(image, entry.header.orientation), self.image_size)
        on_cpu = [i for i, entry in enumerate(batch) if isinstance(entry, Decoded)]
        if on_cpu:  # the decode threads' pixels cross to the device in one copy
            self.counts.cpu_path += len(on_cpu)
            stacked = np.stack([batch[i].pixels for i in on_cpu])  # type: ignore[union-attr]
            for i, pixels in zip(on_cpu, torch.from_numpy(stacked).to(self.device), strict=True):
                tensors[i] = pixels
        kept = sorted(tensors)
        if not kept:
            return torch.empty((0, 3, self.image_size, self.image_size), dtype=torch.uint8), kept, failed
        return torch.stack([tensors[i] for i in kept]), kept, failed

    def _decode_jpegs(self, files: Sequence[Compressed]) -> list[Any | None]:
        """Full-size RGB tensors on the device, None where a file would not decode: the whole
        list in one call, and file by file only when that call fails (it fails as a whole)."""
        import torch

        data = [torch.frombuffer(f.data, dtype=torch.uint8) for f in files]
        try:
            return list(self._decode(data))
        except Exception:
            self.counts.batch_retries += 1
        images: list[Any | None] = []
        for one in data:
            try:
                images.append(self._decode([one])[0])
            except Exception:
                images.append(None)
        return images

    def _decode(self, data: list[Any]) -> list[Any]:
        """torchvision's batched decode of a list of byte tensors into RGB tensors on the device."""
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)

    def _on_cpu(self, entry: Compressed) -> Any:
        """The CPU path for a JPEG the GPU decoder refused: its pixels on the device, or the
        CPU path's own :class:`Failed` (the reason a run reports for it without a GPU)."""
        import torch

        try:
            loaded = load_image(entry.item.entry.path, min_side=self.min_side, data=entry.data)
        except ImageLoadError as exc:
            return Failed(entry.item.entry.path, exc.reason)
        pixels = resize_crop(loaded.image, self.image_size)
        return torch.from_numpy(pixels).to(self.device)


def takes_device_pixels(encoder: Encoder) -> bool:
    """The encoder embeds uint8 pixels given as a tensor on its device (the torch runtime when it
    normalises there); the GPU path hands it nothing else."""
    return bool(getattr(encoder, "takes_device_pixels", False))


def cuda_decode_works(device: str) -> bool:
    """torchvision's decoder runs on ``device`` here: one tiny JPEG decoded (a build without
    nvJPEG, or a driver too old for it, fails this)."""
    try:
        import torch
        from torchvision.io import decode_jpeg

        probe = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(probe, "JPEG")
        image = decode_jpeg([torch.frombuffer(probe.getvalue(), dtype=torch.uint8)], device=device)[0]
        return tuple(image.shape) == (3, 16, 16)
    except Exception:
        return False


def decoder_for(
    encoder: Encoder,
    mode: str,
    device: str | None = None,
    min_side: int | None = None,
    max_pixels: int = GPU_MAX_PIXELS,
) -> GpuDecoder | None:
    """The GPU decoder a run uses, or None for the CPU path alone.

    ``auto``: the GPU path when the model runs on CUDA, takes device pixels and torchvision's CUDA
    decoder works. ``gpu``: the same, refused with one line when it cannot be. ``device``: decode
    on this device instead of the model's (tests and benchmarks run the GPU path on the CPU)."""
    mode = decode_mode_from(mode)
    if mode == "cpu":
        return None
    target = device or encoder.device
    usable = takes_device_pixels(encoder) and (device is not None or target.startswith("cuda"))
    if usable and cuda_decode_works(target):
        return GpuDecoder(target, encoder.image_size, min_side, max_pixels)
    if mode == "gpu":
        raise PixfindError(gpu_refusal(encoder.device))
    return None


def gpu_refusal(model_device: str) -> str:
    """Why ``--decode gpu`` cannot be: one line naming the fix."""
    asked = "--decode gpu (or PIXFIND_DECODE=gpu)"
    if not model_device.startswith("cuda"):
        return f"{asked}: the model runs on {model_device}, not a CUDA GPU; use --decode auto or cpu"
    return f"{asked}: torchvision cannot decode JPEGs on {model_device} here; use --decode auto or cpu"


def check_decode_request(mode: str, device: str) -> None:
    """Refuse ``--decode gpu`` at once (before scanning) where no CUDA device can be: an explicit
    CPU model, or no NVIDIA driver. Cheap: torch is not imported."""
    from ..models.torch_clip import nvidia_driver_present

    if decode_mode_from(mode) != "gpu":
        return
    if device.strip().lower() == "cpu":
        raise PixfindError(gpu_refusal("cpu"))
    if not nvidia_driver_present():
        raise PixfindError(
            "--decode gpu (or PIXFIND_DECODE=gpu): CUDA is not available on this machine (no NVIDIA driver); "
            "use --decode auto or cpu"
        )


def embed_on_device(
    encoder: Encoder, decoder: GpuDecoder, batch: Sequence[Decoded | Compressed]
) -> tuple[list[Row], list[Decoded | Compressed], list[Failed]]:
    """One model call for a batch whose JPEGs the GPU decodes: the rows, the files they are of,
    and the files that could not be decoded by either path."""
    from .pipeline import rows_of

    pixels, kept, failed = decoder.pixels(batch)
    embedded = [batch[i] for i in kept]
    if not embedded:
        return [], embedded, failed
    vectors = encoder.encode_images(pixels)
    return rows_of(embedded, vectors), embedded, failed
