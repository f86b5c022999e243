"""OpenVINO for the exported image tower: the same ``visual.onnx``, ~7-9% faster than ONNX Runtime.

On this project's 2-core AVX2 machine OpenVINO's CPU plugin runs ViT-B-32's image tower at
0.84-0.85 of the fp32 matmul limit where ONNX Runtime reaches 0.78-0.79 (``benchmarks/ingest.py``;
oneDNN's GEMMs against MLAS'), and stays ahead when another job shares the cores.
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
#: The fixed sample the check runs: seeded noise, the shape of a small batch.
PARITY_BATCH = 2


def enabled() -> bool:
    return os.environ.get("PIXFIND_OPENVINO", "1").strip().lower() not in ("0", "false", "no", "off")


def version() -> str | None:
    try:
        return metadata.version("openvino")
    except metadata.PackageNotFoundError:
        return None


class OpenVinoVisual:
    """``visual.onnx`` compiled for OpenVINO's CPU plugin: ``run(pixels) -> features``.

    Threads are not pinned to cores (pinning loses to another process that holds a core: measured
    -10% beside a busy loop), and one inference runs at a time (an infer request is not
    thread-safe; the web server may embed an uploaded image beside a query).
    """

    def __init__(self, path: Path, threads: int) -> None:
        import openvino

        core = openvino.Core()
        self._compiled = core.compile_model(
            str(path),
            "CPU",
            {
                "INFERENCE_NUM_THREADS": threads,
                "PERFORMANCE_HINT": "LATENCY",  # one stream: the whole CPU on one batch
                "INFERENCE_PRECISION_HINT": "f32",  # no bf16/fp16 downcast where the CPU has it
                "ENABLE_CPU_PINNING": False,
            },
        )
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()

    def run(self, pixels: np.ndarray) -> np.ndarray:
        with self._lock:
            result = self._request.infer({0: pixels})
            return np.array(result[0], dtype=np.float32)


def load_checked(
    folder: Path,
    image_size: int,
    threads: int,
    reference: Callable[[np.ndarray], np.ndarray],
    even_if_disabled: bool = False,
) -> OpenVinoVisual | None:
    """OpenVINO's image tower for the export in ``folder``, or None to stay on ONNX Runtime.

    ``reference`` runs ONNX Runtime's image tower; it is only called when this export has not been
    checked against this OpenVINO version yet. ``even_if_disabled`` ignores ``PIXFIND_OPENVINO=0``.
    """
    if not (even_if_disabled or enabled()):
        return None
    ov_version = version()
    if ov_version is None:
        return None
    key = {"openvino": ov_version, "model": _model_stamp(folder)}
    record = _read_record(folder)
    checked = all(record.get(k) == v for k, v in key.items())
    if checked and not record.get("ok"):
        log.info("OpenVINO %s failed its check for %s before: %s", ov_version, folder.name, record.get("reason"))
        return None
    try:
        runner = OpenVinoVisual(folder / "visual.onnx", threads)
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
    return rng.standard_normal((PARITY_BATCH, 3, image_size, image_size)).astype(np.float32)


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
