"""Query-time text encoding without torch or open_clip.

``pixfind search`` in a fresh process must not pay for ``import torch`` (~2 s here),
``import open_clip`` (~0.5 s more) and building the model (~1 s): it only needs the text tower.
When the ONNX export of the collection's model exists (it is made the first time the model is
loaded on CPU, e.g. by ``pixfind index``), :func:`load_text_encoder` returns an encoder that uses
only numpy, regex and onnxruntime: the exported text tower plus :mod:`pixfind.cliptokenizer`
(token ids equal to open_clip's, vectors equal to torch's within 1e-4, both checked at export).

    from pixfind.textquery import load_text_encoder
    encoder = load_text_encoder(spec)          # None: no usable export; use ClipEncoder
    vectors = encoder.encode_texts(["a dog on a beach"])   # (1, dim) float32, unit length

Importing this module imports nothing heavy; the work happens in the call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import ModelSpec

if TYPE_CHECKING:
    from .onnx_encoder import OnnxClipEncoder


def load_text_encoder(
    spec: ModelSpec, threads: int | None = None, precision: str | None = None
) -> OnnxClipEncoder | None:
    """The torch-free text encoder for ``spec``, or None when the export cache lacks it (or its
    tokenizer is not the plain CLIP BPE one, or onnxruntime is missing). Never exports.

    The returned object is an :class:`~pixfind.onnx_encoder.OnnxClipEncoder`: ``encode_texts``,
    ``tokenize``, ``dim``, ``spec``; its image tower is only loaded if ``encode_images`` is used.
    The text session is created here, so the first query pays no set-up cost. ``precision``: the
    image tower's (auto, f32, bf16; None: ``$PIXFIND_PRECISION``); text is always f32.
    """
    from .onnx_encoder import OnnxClipEncoder

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    # queries embed one image at a time: one OpenVINO stream, every thread on it
    encoder = OnnxClipEncoder.open(spec, threads=threads, spinning=False, image_streams=1, precision=precision)
    if encoder is None or not encoder.meta.get("tokenizer"):
        return None
    encoder.session("text")
    _ = encoder.tokenizer
    return encoder
