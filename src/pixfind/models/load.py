"""The one place that picks a model runtime, from the settings.

Indexing (:func:`load_encoder`): ONNX Runtime on the CPU when the export exists or can be made
and passes its checks (images then on OpenVINO where it matches), torch on a GPU or as the
fallback, with the reason logged. Queries (:func:`load_query_encoder`): the exported towers
without torch or open_clip, so a cold ``pixfind search`` skips their imports and the model build.

Importing this module imports nothing heavy; the work happens in the calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import ModelSpec, Settings
from ..errors import ModelLoadError
from .onnx_runtime import OnnxClipEncoder, export_dir

if TYPE_CHECKING:
    from .base import Encoder

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnx", "torch")
#: What a first run tells the user to expect for the export of a model (docs/speed.md); other
#: models get no estimate (larger ones take longer), the progress line shows the time elapsed.
EXPORT_ESTIMATES = {"ViT-B-32": "~15-40 s"}


def load_encoder(
    spec: ModelSpec,
    settings: Settings,
    status: Callable[[str], None] | None = None,
    int8: bool = False,
) -> Encoder:
    """The encoder for indexing ``spec`` with ``settings`` (backend, device, threads, precision,
    OpenVINO, spinning). ``status`` hears what takes the time, for a progress display. ``int8``:
    ONNX Runtime's dynamic quantisation (the Python API's opt-in; vectors drift from fp32)."""
    from .torch_clip import check_device

    say = status or _silent
    backend = settings.backend.strip().lower()
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {settings.backend!r}: choose auto, onnx or torch")
    device = check_device(settings.device)
    if backend == "auto" and (device not in ("auto", "cpu") or (device == "auto" and _gpu_present())):
        backend = "torch"
    if backend != "torch":
        encoder = OnnxClipEncoder.open(spec, **_onnx_options(settings, int8))
        if encoder is not None:
            return encoder
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            reason = f"onnxruntime not installed ({exc}); pip install onnxruntime"
            if backend == "onnx":
                raise ModelLoadError(reason) from exc
            log.info("using torch: %s", reason)
            backend = "torch"
    if backend == "torch" or device not in ("auto", "cpu"):
        return _torch_encoder(spec, device, settings, say)
    return _exported_or_torch(spec, settings, say, int8, required=backend == "onnx")


def load_query_encoder(spec: ModelSpec, settings: Settings) -> OnnxClipEncoder | None:
    """The torch-free query encoder for ``spec``, or None when the export cache lacks it (or its
    tokenizer is not the plain CLIP BPE one, or onnxruntime is missing): then the indexing
    encoder answers queries. Never exports.

    Its text session is created here, so the first query pays no set-up cost; its image tower
    loads only if a query image comes, on one OpenVINO stream (one image at a time)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    options = {**_onnx_options(settings, int8=False), "spinning": False, "image_streams": 1}
    encoder = OnnxClipEncoder.open(spec, **options)
    if encoder is None or not encoder.meta.get("tokenizer"):
        return None
    encoder.session("text")
    _ = encoder.tokenizer
    return encoder


def planned_image_precision(spec: ModelSpec, settings: Settings) -> tuple[str, str]:
    """What an index run on this machine's CPU would embed images in, and why, without loading
    anything (for ``pixfind info``): the precision setting and CPU (see
    :func:`~pixfind.models.openvino_runtime.choose_precision`), unless the torch backend is
    forced, OpenVINO is off or missing, or bf16 failed its check for this model's export before."""
    from . import openvino_runtime

    if settings.backend.strip().lower() == "torch":
        return "f32", "PIXFIND_BACKEND=torch"
    if not settings.openvino or openvino_runtime.version() is None:
        return "f32", "OpenVINO is off or not installed: ONNX Runtime computes f32"
    choice = openvino_runtime.choose_precision(settings.precision)
    failure = openvino_runtime.recorded_failure(export_dir(spec), choice.precision)
    if choice.precision == "bf16" and failure:
        return "f32", f"bf16 failed its check: {failure}"
    return choice.precision, choice.reason


def _onnx_options(settings: Settings, int8: bool) -> dict[str, object]:
    return {
        "threads": settings.threads,
        "int8": int8,
        "spinning": settings.ort_spin,
        "openvino": settings.openvino,
        "precision": settings.precision,
    }


def _torch_encoder(spec: ModelSpec, device: str, settings: Settings, say: Callable[[str], None]) -> Encoder:
    from .torch_clip import ClipEncoder, configure_threads

    configure_threads(settings.threads)
    say(f"loading {spec.describe()}")
    return ClipEncoder(spec, device, status=say)


def _exported_or_torch(
    spec: ModelSpec, settings: Settings, say: Callable[[str], None], int8: bool, required: bool
) -> Encoder:
    """Export ``spec`` for ONNX Runtime (once; a failure is recorded and not retried with the same
    libraries), else torch on the CPU, or one error line when ONNX was ``required``."""
    from .export import export, previous_failure, record_failure
    from .messages import failure_text
    from .torch_clip import ClipEncoder, configure_threads

    failure = previous_failure(spec)
    estimate = EXPORT_ESTIMATES.get(spec.name)
    preparing = f"preparing {spec.name} for this CPU, once" + (f" ({estimate})" if estimate else "")
    say(preparing if failure is None else f"loading {spec.describe()}")
    torch_encoder = ClipEncoder(spec, "cpu", status=say)
    if failure is None:
        say(preparing)  # again, after any download
        try:
            return OnnxClipEncoder(export(torch_encoder), **_onnx_options(settings, int8))
        except Exception as exc:  # any export failure means: use torch
            failure = failure_text(exc)
            record_failure(spec, failure)
    if required:
        raise ModelLoadError(f"ONNX export of {spec.describe()} failed: {failure}")
    log.warning("ONNX export of %s unusable, using torch: %s", spec.describe(), failure)
    configure_threads(settings.threads)
    return torch_encoder


def _gpu_present() -> bool:
    """CUDA usable? Only imports torch when an NVIDIA driver is there at all."""
    from .torch_clip import pick_device

    return pick_device("auto") != "cpu"


def _silent(text: str) -> None:
    pass
