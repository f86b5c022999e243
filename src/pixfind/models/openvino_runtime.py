"""OpenVINO for the exported image tower: the same ``visual.onnx``, faster than ONNX Runtime.

:class:`~pixfind.models.onnx_runtime.OnnxClipEncoder` uses it for images when the ``openvino``
package imports and its vectors match ONNX Runtime's on a fixed sample; the match is checked once
per export folder, OpenVINO version, CPU and precision and recorded in ``openvino.json`` beside
the export, so later runs skip the ONNX Runtime session. Text queries stay on ONNX Runtime (its
session starts faster, which is what a cold search needs).

Precision: on CPUs with bf16 arithmetic in hardware (AVX512-BF16, AMX) the model computes in
bfloat16, elsewhere in f32. OpenVINO's own default is not relied on either way (it varies by CPU
and version, and may emulate bf16 slowly): :func:`choose_precision` decides and the model is
compiled with that hint. bf16 is checked against ONNX Runtime's f32 vectors by the cosine per
image (:data:`BF16_MIN_COSINE`), and a bf16 model that fails its check is replaced by the f32
one, with one warning saying why. Figures: docs/speed.md.

``PIXFIND_OPENVINO=0`` turns it off (:attr:`pixfind.config.Settings.openvino`);
``PIXFIND_PRECISION=f32|bf16`` forces a precision.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ..vectors import unit_rows
from .messages import first_line
from .pixels import Normalisation

log = logging.getLogger(__name__)

RECORD = "openvino.json"
#: Largest allowed |OpenVINO - ONNX Runtime| on unit vectors in f32.
PARITY_TOL = 1e-4
#: Smallest allowed cosine between a bf16 vector and ONNX Runtime's f32 one, per image of the
#: check's sample: well below the drift bf16 shows on real photos (docs/speed.md), where search
#: results still agree.
BF16_MIN_COSINE = 0.999
#: CPU flags (as Linux names them) for bf16 arithmetic in hardware.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: The fixed sample the check runs: seeded pixels, a batch that splits unevenly over two streams.
PARITY_BATCH = 3
#: Images per infer request at most: a batch of 16 runs as 8 + 8 on two streams (docs/speed.md).
CHUNK = 8
#: Bump when how the model is compiled or fed changes: checks recorded before are then redone.
RUNNER = 3


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
    """``visual.onnx`` compiled for OpenVINO's CPU plugin: ``run(uint8 pixels) -> features``.

    It takes the pixels as :func:`~pixfind.models.pixels.resize_crop` gives them: the
    :class:`~pixfind.models.pixels.Normalisation` is compiled into the model, so the decode
    threads skip it and a batch crosses as a quarter of the bytes.

    ``precision`` ("f32" or "bf16") is the inference precision asked for; :attr:`precision` is
    the one OpenVINO compiled (f32 where the CPU cannot do bf16 at all). Input, normalisation and
    output stay f32 either way.

    A batch is split into parts of at most :data:`CHUNK` images that run on
    :func:`streams_for` streams at once, each stream on its share of the threads. With one
    stream all threads meet at a barrier after every operator, so one thread delayed by
    anything else on the machine (a decode, another process) stalls them all; streams do not
    wait for each other. A single image is faster on one stream, so a query encoder asks for
    ``streams=1``. Threads are not pinned to cores (pinning loses to another process that holds
    a core), and one ``run`` at a time (the web server may embed an uploaded image beside a
    query). Measurements: docs/speed.md.
    """

    def __init__(
        self,
        path: Path,
        threads: int,
        normalisation: Normalisation,
        streams: int | None = None,
        precision: str = "f32",
    ) -> None:
        """``streams``: None picks :func:`streams_for` ``threads`` (benchmarks compare others)."""
        import openvino

        self.streams = streams or streams_for(threads)
        core = openvino.Core()
        compiled = core.compile_model(
            taking_pixels(core.read_model(str(path)), normalisation),
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
        values = pixels.astype(np.float32)  # 0-255: what the compiled model takes
        parts = np.array_split(values, min(len(values), max(self.streams, -(-len(values) // CHUNK))))
        outputs: list[np.ndarray] = [np.empty(0, np.float32)] * len(parts)
        with self._lock:
            for i, part in enumerate(parts):
                self._queue.start_async({0: part}, (outputs, i))
            self._queue.wait_all()
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)


def streams_for(threads: int) -> int:
    """Two streams when there are two threads or more, sharing them (see :class:`OpenVinoVisual`)."""
    return 2 if threads >= 2 else 1


def precision_name(value: Any) -> str:
    """OpenVINO's element type (or its name) as pixfind says it: "f32", "bf16", "f16"."""
    name = str(getattr(value, "get_type_name", lambda: value)())
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(name, name)


def taking_pixels(model: Any, normalisation: Normalisation) -> Any:
    """``model`` with the normalisation put in front (OpenVINO's PrePostProcessor): it takes
    0-255 pixel values."""
    from openvino import Layout
    from openvino.preprocess import PrePostProcessor

    steps = PrePostProcessor(model)
    steps.input().tensor().set_layout(Layout("NCHW"))
    steps.input().model().set_layout(Layout("NCHW"))
    steps.input().preprocess().scale(255.0).mean(list(normalisation.mean)).scale(list(normalisation.std))
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
    normalisation: Normalisation,
    reference: Callable[[np.ndarray], np.ndarray],
    streams: int | None = None,
    precision: str = "f32",
) -> OpenVinoVisual | None:
    """OpenVINO's image tower for the export in ``folder``, or None to stay on ONNX Runtime.

    ``normalisation`` is compiled in. ``reference`` runs ONNX Runtime's image tower on uint8
    pixels; it is only called when this export has not been checked against this OpenVINO
    version, CPU and precision yet. ``streams``: see :class:`OpenVinoVisual`. ``precision`` "bf16"
    that cannot run or fails its check gives the f32 model, its :attr:`~OpenVinoVisual.fallback`
    saying why.
    """
    key = _record_key(folder)
    if key is None:
        return None
    compile_args = (folder / "visual.onnx", threads, normalisation)
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
    done = _recorded_checks(folder, key).get(precision)
    if isinstance(done, dict) and not done.get("ok"):
        log.info("OpenVINO %s failed its check for %s before: %s", precision, folder.name, done.get("reason"))
        return None, f"{precision} failed its check: {done.get('reason')}"
    try:
        runner = OpenVinoVisual(*compile_args, streams=streams, precision=precision)
    except Exception as exc:  # any compile failure means: another precision, or ONNX Runtime
        reason = f"compile: {type(exc).__name__}: {first_line(exc)}"
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
    key = _record_key(folder)
    done = _recorded_checks(folder, key).get(precision) if key is not None else None
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


def _record_key(folder: Path) -> dict[str, Any] | None:
    """What a recorded check is valid for (None when OpenVINO is not installed): a check made
    with another OpenVINO, export, runner or CPU is redone."""
    ov_version = version()
    if ov_version is None:
        return None
    return {"openvino": ov_version, "model": _model_stamp(folder), "runner": RUNNER, "cpu": cpu_description()}


def _recorded_checks(folder: Path, key: dict[str, Any]) -> dict[str, Any]:
    """The checks recorded under ``key`` ({precision: {ok, reason}}), empty for any other key."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in key.items()):
        return {}
    checks = record.get("checks")
    return dict(checks) if isinstance(checks, dict) else {}


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
    checks = _recorded_checks(folder, key)
    checks[precision] = {"ok": ok, "reason": reason}
    with contextlib.suppress(OSError):  # a read-only cache: the check simply runs again next time
        (folder / RECORD).write_text(json.dumps({**key, "checks": checks}))
