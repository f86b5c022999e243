"""OpenVINO for the exported image tower: the same ``visual.onnx``, ~10% faster than ONNX Runtime.

On this project's 2-core machine OpenVINO's CPU plugin runs ViT-B-32's image tower at 0.85 of the
fp32 matmul limit where ONNX Runtime reaches 0.78 (``benchmarks/ingest.py``), and 1.4x faster than
on one stream when another job shares the cores (see :class:`OpenVinoVisual`).
:class:`~pixfind.onnx_encoder.OnnxClipEncoder` uses it for images when the ``openvino`` package
imports and its vectors match ONNX Runtime's on a fixed sample; the match is checked once per
export folder and OpenVINO version and recorded in ``openvino.json`` beside the export, so later
runs skip the ONNX Runtime session. Text queries stay on ONNX Runtime (its session starts faster,
which is what a cold search needs).

``PIXFIND_OPENVINO=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .encoder import _first_line, normalise_rows

log = logging.getLogger(__name__)

RECORD = "openvino.json"
#: Largest allowed |OpenVINO - ONNX Runtime| on unit vectors (measured ~4e-6 in fp32).
PARITY_TOL = 1e-4
#: The fixed sample the check runs: seeded pixels, a batch that splits unevenly over two streams.
PARITY_BATCH = 3
#: Images per infer request at most: a batch of 16 runs as 8 + 8 on two streams (16 per request
#: was no faster on 2 cores, 4 was 4% slower).
CHUNK = 8
#: Bump when how the model is compiled or fed changes: checks recorded before are then redone.
RUNNER = 2


def enabled() -> bool:
    return os.environ.get("PIXFIND_OPENVINO", "1").strip().lower() not in ("0", "false", "no", "off")


def version() -> str | None:
    try:
        return metadata.version("openvino")
    except metadata.PackageNotFoundError:
        return None


class OpenVinoVisual:
    """``visual.onnx`` compiled for OpenVINO's CPU plugin: ``run(pixels) -> features``.

    It takes the pixels as :meth:`~pixfind.onnx_encoder.OnnxClipEncoder.preprocess` gives them
    (uint8): the scaling and normalisation are compiled into the model, so the decode threads
    skip them and a batch crosses as a quarter of the bytes. Float32 input (already normalised)
    is also accepted.

    A batch is split into parts of at most :data:`CHUNK` images that run on
    :func:`streams_for` streams at once, each stream on its share of the threads. With one
    stream all threads meet at a barrier after every operator, so one thread delayed by
    anything else on the machine (a decode, another process) stalls them all; streams do not
    wait for each other. Measured on 2 cores (ViT-B-32, batches of 16, ``benchmarks/ingest.py
    --busy``): one stream on 2 threads 31.4 images/s, two streams of one thread 32.7 (0.85 of the
    matmul limit); beside a busy loop 15.0 vs 21.1. A single image runs on one stream: 80 ms
    instead of 42 on a quiet machine (the same beside a busy one), so a query encoder asks for
    ``streams=1``.

    Threads are not pinned to cores (pinning loses to another process that holds a core: measured
    -10% beside a busy loop), and one ``run`` at a time (the web server may embed an uploaded
    image beside a query).
    """

    def __init__(self, path: Path, threads: int, mean: np.ndarray, std: np.ndarray, streams: int | None = None) -> None:
        """``streams``: None picks :func:`streams_for` ``threads`` (benchmarks compare others)."""
        import openvino

        self._mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.streams = streams or streams_for(threads)
        core = openvino.Core()
        compiled = core.compile_model(
            _taking_pixels(core.read_model(str(path)), self._mean, self._std),
            "CPU",
            {
                "INFERENCE_NUM_THREADS": threads,
                "NUM_STREAMS": self.streams,
                "PERFORMANCE_HINT": "THROUGHPUT" if self.streams > 1 else "LATENCY",
                "INFERENCE_PRECISION_HINT": "f32",  # no bf16/fp16 downcast where the CPU has it
                "ENABLE_CPU_PINNING": False,
            },
        )
        self._queue = openvino.AsyncInferQueue(compiled, self.streams)
        self._queue.set_callback(_keep_output)
        self._lock = threading.Lock()

    def run(self, pixels: np.ndarray) -> np.ndarray:
        values = self._pixel_values(pixels)
        parts = np.array_split(values, min(len(values), max(self.streams, -(-len(values) // CHUNK))))
        outputs: list[np.ndarray] = [np.empty(0, np.float32)] * len(parts)
        with self._lock:
            for i, part in enumerate(parts):
                self._queue.start_async({0: part}, (outputs, i))
            self._queue.wait_all()
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def _pixel_values(self, pixels: np.ndarray) -> np.ndarray:
        """float32 0-255 pixel values, what the compiled model takes."""
        if pixels.dtype == np.uint8:
            return pixels.astype(np.float32)
        return (np.asarray(pixels, dtype=np.float32) * self._std + self._mean) * np.float32(255)


def streams_for(threads: int) -> int:
    """Two streams when there are two threads or more, sharing them (see :class:`OpenVinoVisual`)."""
    return 2 if threads >= 2 else 1


def _taking_pixels(model: Any, mean: np.ndarray, std: np.ndarray) -> Any:
    """``model`` with CLIP's normalisation put in front: it takes 0-255 pixel values."""
    from openvino import Layout
    from openvino.preprocess import PrePostProcessor

    steps = PrePostProcessor(model)
    steps.input().tensor().set_layout(Layout("NCHW"))
    steps.input().model().set_layout(Layout("NCHW"))
    steps.input().preprocess().scale(255.0).mean(mean.ravel().tolist()).scale(std.ravel().tolist())
    return steps.build()


def _keep_output(request: Any, slot: tuple[list[np.ndarray], int]) -> None:
    """AsyncInferQueue callback: copy a finished part's features out before the request is reused."""
    outputs, index = slot
    outputs[index] = np.array(request.get_output_tensor(0).data, dtype=np.float32)


def load_checked(
    folder: Path,
    image_size: int,
    threads: int,
    normalisation: tuple[np.ndarray, np.ndarray],
    reference: Callable[[np.ndarray], np.ndarray],
    even_if_disabled: bool = False,
    streams: int | None = None,
) -> OpenVinoVisual | None:
    """OpenVINO's image tower for the export in ``folder``, or None to stay on ONNX Runtime.

    ``normalisation``: the model's (mean, std), compiled in. ``reference`` runs ONNX Runtime's
    image tower on uint8 pixels; it is only called when this export has not been checked against
    this OpenVINO version yet. ``even_if_disabled`` ignores ``PIXFIND_OPENVINO=0``. ``streams``:
    see :class:`OpenVinoVisual`.
    """
    if not (even_if_disabled or enabled()):
        return None
    ov_version = version()
    if ov_version is None:
        return None
    key = {"openvino": ov_version, "model": _model_stamp(folder), "runner": RUNNER}
    record = _read_record(folder)
    checked = all(record.get(k) == v for k, v in key.items())
    if checked and not record.get("ok"):
        log.info("OpenVINO %s failed its check for %s before: %s", ov_version, folder.name, record.get("reason"))
        return None
    try:
        runner = OpenVinoVisual(folder / "visual.onnx", threads, *normalisation, streams=streams)
    except Exception as exc:  # any compile failure means: ONNX Runtime
        _write_record(folder, key, False, f"compile: {type(exc).__name__}: {_first_line(exc)}")
        log.warning("OpenVINO cannot compile %s, using ONNX Runtime: %s", folder.name, _first_line(exc))
        return None
    if checked and record.get("ok"):
        return runner
    sample = parity_sample(image_size)
    diff = float(np.abs(normalise_rows(runner.run(sample)) - normalise_rows(reference(sample))).max())
    ok = bool(diff <= PARITY_TOL)
    _write_record(folder, key, ok, f"max |OpenVINO - ONNX Runtime| {diff:.2e} (tolerance {PARITY_TOL:.0e})")
    if not ok:
        log.warning("OpenVINO differs from ONNX Runtime on %s (%.2e), using ONNX Runtime", folder.name, diff)
        return None
    return runner


def parity_sample(image_size: int) -> np.ndarray:
    rng = np.random.default_rng(20261127)
    return rng.integers(0, 256, (PARITY_BATCH, 3, image_size, image_size), dtype=np.uint8)


def _read_record(folder: Path) -> dict[str, Any]:
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _model_stamp(folder: Path) -> list[int]:
    """Size and mtime of the exported files: a re-export invalidates the record."""
    stamp: list[int] = []
    for name in ("visual.onnx", "visual.onnx.data"):
        try:
            st = (folder / name).stat()
        except OSError:
            continue
        stamp += [st.st_size, st.st_mtime_ns]
    return stamp


def _write_record(folder: Path, key: dict[str, Any], ok: bool, reason: str) -> None:
    with contextlib.suppress(OSError):  # a read-only cache: the check simply runs again next time
        (folder / RECORD).write_text(json.dumps({**key, "ok": ok, "reason": reason}))
