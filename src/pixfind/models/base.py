"""The one contract between the models and everything that uses them (index, search, web).

Pixels cross it as uint8 ``(N, 3, S, S)`` RGB, already resized and centre-cropped by the
encoder's own ``preprocess``; each runtime applies CLIP's normalisation its own way. Vectors come
back as float32 unit rows ``(N, dim)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from ..config import ModelSpec


class Encoder(Protocol):
    """A loaded CLIP model on one runtime (torch, ONNX Runtime, OpenVINO)."""

    spec: ModelSpec
    dim: int
    image_size: int
    device: str
    """"cpu", "cuda", "cuda:1", "mps": where images are embedded."""
    fills_cpu: bool
    """Whether inference already uses every core, so decoding must take turns with it."""

    @property
    def draft_side(self) -> int:
        """The smallest side a JPEG may be decoded at (draft mode) without changing the vector."""

    @property
    def image_precision(self) -> str | None:
        """What images are computed in ("f32", "bf16", "fp16"), None where the runtime does not say."""

    @property
    def precision_reason(self) -> str:
        """Why that precision was chosen (empty when there was no choice)."""

    @property
    def image_runtime(self) -> str | None:
        """ "openvino", "onnxruntime", or None for torch."""

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One RGB image to uint8 pixels ``(3, S, S)``."""

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 ``(N, 3, S, S)`` pixels to float32 unit rows ``(N, dim)``."""

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts to float32 unit rows ``(N, dim)``."""
