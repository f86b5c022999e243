"""OpenVINO for the exported image tower: the same ``visual.onnx``, faster than ONNX Runtime
(~10% in f32; bf16, on CPUs that compute it, is twice as fast as f32).

On this project's 2-core machine OpenVINO's CPU plugin runs ViT-B-32's image tower at 0.85 of the
fp32 matmul limit where ONNX Runtime reaches 0.78 (``benchmarks/ingest.py``), and 1.4x faster than
on one stream when another job shares the cores (see :class:`OpenVinoVisual`).
:class:`~pixfind.onnx_encoder.OnnxClipEncoder` uses it for images when the ``openvino`` package
imports and its vectors match ONNX Runtime's on a fixed sample; the match is checked once per
export folder and OpenVINO version and recorded in ``openvino.json`` beside the export, so later
runs skip the ONNX Runtime session. Text queries stay on ONNX Runtime (its session starts faster,
which is what a cold search needs).

Precision: on CPUs with bf16 arithmetic in hardware (AVX512-BF16: AMD Zen 4/5, Intel Cooper Lake;
AMX: Intel Sapphire Rapids and later) the model computes in bfloat16, with vectors at cosine
>= 0.9999 to f32 ones on real photos; elsewhere in f32. OpenVINO's own default is not relied on
either way (2026.4 picks bf16 on this project's AVX512-BF16 machine, and by its source on any
AVX-512 CPU, emulated and slow where the instructions are missing): :func:`choose_precision`
decides and the model is compiled with that hint. Each precision is checked against ONNX
Runtime's f32 vectors once per export, OpenVINO version and CPU (bf16 by the cosine per image,
:data:`BF16_MIN_COSINE`), and a bf16 model that fails its check is replaced by the f32 one, with
one warning saying why.

``PIXFIND_OPENVINO=0`` turns it off; ``PIXFIND_PRECISION=f32|bf16`` forces a precision.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .encoder import _first_line
from .vectors import unit_rows

log = logging.getLogger(__name__)

RECORD = "openvino.json"
#: Largest allowed |OpenVINO - ONNX Runtime| on unit vectors (measured ~4e-6 in fp32).
PARITY_TOL = 1e-4
#: Smallest allowed cosine between a bf16 vector and ONNX Runtime's f32 one, per image of the
#: check's sample. Measured (ViT-B-32, docs/speed.md): 0.99994 at worst on 300 real photos and on
#: this sample alike, so this allows ~17x the drift bf16 showed, where search results still agree.
BF16_MIN_COSINE = 0.999
#: CPU flags (as Linux names them) for bf16 arithmetic in hardware.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: The fixed sample the check runs: seeded pixels, a batch that splits unevenly over two streams.
PARITY_BATCH = 3
#: Images per infer request at most: a batch of 16 runs as 8 + 8 on two streams (16 per request
#: was no faster on 2 cores, 4 was 4% slower).
CHUNK = 8
#: Bump when how the model is compiled or fed changes: checks recorded before are then redone.
RUNNER = 3


def enabled() -> bool:
    return os.environ.get("PIXFIND_OPENVINO", "1").strip().lower() not in ("0", "false", "no", "off")


def version() -> str | None:
    try:
        return metadata.version("openvino")
    except metadata.PackageNotFoundError:
        return None


# -- precision -------------------------------------------------------------------------------


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (``/proc/cpuinfo``); empty elsewhere, where
    nothing then counts as native bf16 (forcing it with ``PIXFIND_PRECISION=bf16`` still works)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(flags: Iterable[str]) -> list[str]:
    """Which of :data:`NATIVE_BF16_FLAGS` the CPU has (empty: bf16 would be emulated, or refused)."""
    present = set(flags)
    return [flag for flag in NATIVE_BF16_FLAGS if flag in present]


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision to ask OpenVINO for, and why (said by ``pixfind info`` and index summaries)."""

    precision: str  # "f32" or "bf16"
    reason: str


def choose_precision(setting: str, flags: Iterable[str] | None = None) -> PrecisionChoice:
    """``setting`` auto, f32 or bf16 (see :data:`pixfind.config.PRECISIONS`); ``flags``: the CPU's
    (None: :func:`cpu_flags`). auto means bf16 only where the CPU computes it in hardware: elsewhere
    OpenVINO would emulate it on AVX-512 (slower than f32) or ignore it."""
    native = native_bf16(cpu_flags() if flags is None else flags)
    if setting == "auto":
        if native:
            return PrecisionChoice("bf16", f"auto: the CPU has {'+'.join(native)}")
        return PrecisionChoice("f32", "auto: no bf16 arithmetic in this CPU")
    if setting == "bf16" and not native:
        return PrecisionChoice("bf16", "precision set to bf16, though the CPU has no bf16 arithmetic")
    return PrecisionChoice(setting, f"precision set to {setting}")


def cpu_description(flags: Iterable[str] | None = None) -> str:
    """The CPU's model name and its bf16 flags: a check recorded on another CPU is redone."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            name = next((line.partition(":")[2].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    native = native_bf16(cpu_flags() if flags is None else flags)
    return f"{name} ({'+'.join(native) or 'no bf16'})"


# -- the compiled model ----------------------------------------------------------------------


class OpenVinoVisual:
    """``visual.onnx`` compiled for OpenVINO's CPU plugin: ``run(pixels) -> features``.

    It takes the pixels as :meth:`~pixfind.onnx_encoder.OnnxClipEncoder.preprocess` gives them
    (uint8): the scaling and normalisation are compiled into the model, so the decode threads
    skip them and a batch crosses as a quarter of the bytes. Float32 input (already normalised)
    is also accepted.

    ``precision`` ("f32" or "bf16") is the inference precision asked for; :attr:`precision` is
    the one OpenVINO compiled (f32 where the CPU cannot do bf16 at all). Input, normalisation and
    output stay f32 either way.

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

    def __init__(
        self,
        path: Path,
        threads: int,
        mean: np.ndarray,
        std: np.ndarray,
        streams: int | None = None,
        precision: str = "f32",
    ) -> None:
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
                "INFERENCE_PRECISION_HINT": precision,  # always explicit: OpenVINO's default varies by CPU
                "ENABLE_CPU_PINNING": False,
            },
        )
        #: What the model computes in, as OpenVINO compiled it: "f32" or "bf16".
        self.precision = precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        #: Why a bf16 model was replaced by this f32 one (set by :func:`load_checked`), else None.
        self.fallback: str | None = None
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


def precision_name(value: Any) -> str:
    """OpenVINO's element type (or its name) as pixfind says it: "f32", "bf16", "f16"."""
    name = str(getattr(value, "get_type_name", lambda: value)())
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(name, name)


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


# -- the check against ONNX Runtime ----------------------------------------------------------


def load_checked(
    folder: Path,
    image_size: int,
    threads: int,
    normalisation: tuple[np.ndarray, np.ndarray],
    reference: Callable[[np.ndarray], np.ndarray],
    even_if_disabled: bool = False,
    streams: int | None = None,
    precision: str = "f32",
) -> OpenVinoVisual | None:
    """OpenVINO's image tower for the export in ``folder``, or None to stay on ONNX Runtime.

    ``normalisation``: the model's (mean, std), compiled in. ``reference`` runs ONNX Runtime's
    image tower on uint8 pixels; it is only called when this export has not been checked against
    this OpenVINO version, CPU and precision yet. ``even_if_disabled`` ignores
    ``PIXFIND_OPENVINO=0``. ``streams``: see :class:`OpenVinoVisual`. ``precision`` "bf16" that
    cannot run or fails its check gives the f32 model, its :attr:`~OpenVinoVisual.fallback`
    saying why.
    """
    if not (even_if_disabled or enabled()):
        return None
    ov_version = version()
    if ov_version is None:
        return None
    key = {"openvino": ov_version, "model": _model_stamp(folder), "runner": RUNNER, "cpu": cpu_description()}
    compile_args = (folder / "visual.onnx", threads, *normalisation)
    fallback = None
    if precision == "bf16":
        runner, fallback = _checked(folder, key, image_size, reference, compile_args, streams, "bf16")
        if runner is not None:
            return runner
    runner, _ = _checked(folder, key, image_size, reference, compile_args, streams, "f32")
    if runner is not None:
        runner.fallback = fallback
    return runner


def _checked(
    folder: Path,
    key: dict[str, Any],
    image_size: int,
    reference: Callable[[np.ndarray], np.ndarray],
    compile_args: tuple[Any, ...],
    streams: int | None,
    precision: str,
) -> tuple[OpenVinoVisual | None, str | None]:
    """The model compiled at ``precision`` if it passes (or passed) its check, else (None, why)."""
    record = _read_record(folder)
    checks = record.get("checks") if all(record.get(k) == v for k, v in key.items()) else None
    done = checks.get(precision) if isinstance(checks, dict) else None
    if isinstance(done, dict) and not done.get("ok"):
        log.info("OpenVINO %s failed its check for %s before: %s", precision, folder.name, done.get("reason"))
        return None, f"{precision} failed its check: {done.get('reason')}"
    try:
        runner = OpenVinoVisual(*compile_args, streams=streams, precision=precision)
    except Exception as exc:  # any compile failure means: another precision, or ONNX Runtime
        reason = f"compile: {type(exc).__name__}: {_first_line(exc)}"
        _write_check(folder, key, precision, False, reason)
        log.warning("OpenVINO cannot compile %s in %s, %s: %s", folder.name, precision, _instead(precision), reason)
        return None, f"{precision} failed its check: {reason}"
    if runner.precision != precision:
        reason = f"OpenVINO computes {runner.precision} on this CPU when asked for {precision}"
        _write_check(folder, key, precision, False, reason)
        log.warning("%s, %s", reason, _instead(precision))
        return None, reason
    if isinstance(done, dict):
        return runner, None
    ok, reason = _compare(runner, reference, image_size, precision)
    _write_check(folder, key, precision, ok, reason)
    if not ok:
        log.warning(
            "OpenVINO %s differs from ONNX Runtime on %s (%s), %s", precision, folder.name, reason, _instead(precision)
        )
        return None, f"{precision} failed its check: {reason}"
    return runner, None


def recorded_failure(folder: Path, precision: str) -> str | None:
    """Why ``precision`` failed its check for the export in ``folder`` on this OpenVINO and CPU,
    if it did (read from the record; nothing is compiled or imported)."""
    ov_version = version()
    if ov_version is None:
        return None
    key = {"openvino": ov_version, "model": _model_stamp(folder), "runner": RUNNER, "cpu": cpu_description()}
    record = _read_record(folder)
    checks = record.get("checks") if all(record.get(k) == v for k, v in key.items()) else None
    done = checks.get(precision) if isinstance(checks, dict) else None
    return str(done.get("reason")) if isinstance(done, dict) and not done.get("ok") else None


def _compare(
    runner: OpenVinoVisual, reference: Callable[[np.ndarray], np.ndarray], image_size: int, precision: str
) -> tuple[bool, str]:
    """Run the fixed sample on both; f32 must match to :data:`PARITY_TOL`, bf16 to
    :data:`BF16_MIN_COSINE` per image."""
    sample = parity_sample(image_size)
    ours, theirs = unit_rows(runner.run(sample)), unit_rows(reference(sample))
    if precision == "f32":
        diff = float(np.abs(ours - theirs).max())
        return bool(diff <= PARITY_TOL), f"max |OpenVINO - ONNX Runtime| {diff:.2e} (tolerance {PARITY_TOL:.0e})"
    cosine = float(np.nan_to_num((ours * theirs).sum(axis=1), nan=-1.0).min())
    return bool(cosine >= BF16_MIN_COSINE), f"min cosine to ONNX Runtime f32 {cosine:.5f} (at least {BF16_MIN_COSINE})"


def _instead(precision: str) -> str:
    return "using f32" if precision == "bf16" else "using ONNX Runtime"


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


def _write_check(folder: Path, key: dict[str, Any], precision: str, ok: bool, reason: str) -> None:
    """Record one precision's result; results of the other precision under the same key stay."""
    record = _read_record(folder)
    checks = record.get("checks") if all(record.get(k) == v for k, v in key.items()) else None
    checks = dict(checks) if isinstance(checks, dict) else {}
    checks[precision] = {"ok": ok, "reason": reason}
    with contextlib.suppress(OSError):  # a read-only cache: the check simply runs again next time
        (folder / RECORD).write_text(json.dumps({**key, "checks": checks}))
