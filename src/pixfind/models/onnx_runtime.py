"""The ONNX Runtime encoder: open_clip's towers as exported once, run without torch.

The export cache (``cache_dir()/onnx/<model>-<weights-hash>/``) holds ``visual.onnx``,
``text.onnx``, the tokenizer's merges and ``meta.json`` (written last: a folder without it is
incomplete); :mod:`pixfind.models.export` makes it. Once it exists nothing here imports torch or
open_clip: pixels come from :func:`~pixfind.models.pixels.resize_crop` and are normalised here in
numpy, text is tokenised by :mod:`pixfind.models.tokenizer`, both checked equal to open_clip's at
export, as are the vectors. Images may run on OpenVINO instead
(:mod:`pixfind.models.openvino_runtime`), chosen at the first image batch.

int8 dynamic quantisation is opt-in (``int8=True``): faster on AVX2 CPUs, but its vectors drift
from fp32 ones (docs/speed.md); do not mix int8 and fp32 vectors in one index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import ModelSpec, cache_dir, cpu_cores, precision_from
from ..errors import ModelLoadError
from ..vectors import unit_rows
from .pixels import Normalisation, draft_side_for, resize_crop
from .tokenizer import trim_padding

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

#: Bump when the export format or the parity checks change: old folders are then ignored.
EXPORT_VERSION = 2
META = "meta.json"
BPE_FILE = "bpe_merges.txt"


def package_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def weights_key(spec: ModelSpec) -> str:
    """Short hash naming the weights: the tag, or the checkpoint's path, size and mtime. Random
    weights also depend on the open_clip and torch versions (their initialisation may change)."""
    parts: dict[str, Any] = {"weights": spec.weights, "export": EXPORT_VERSION}
    if spec.checkpoint:
        try:
            st = Path(spec.checkpoint).stat()
            parts["file"] = [str(Path(spec.checkpoint).resolve()), st.st_size, st.st_mtime_ns]
        except OSError:
            parts["file"] = "missing"
    elif not spec.pretrained:
        from .weights import RANDOM_WEIGHTS_SEED

        parts["random"] = [RANDOM_WEIGHTS_SEED, package_version("open_clip_torch"), package_version("torch")]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def export_dir(spec: ModelSpec) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.name)
    return cache_dir() / "onnx" / f"{safe}-{weights_key(spec)}"


class OnnxClipEncoder:
    """An exported model on ONNX Runtime (CPU); implements :class:`~pixfind.models.base.Encoder`.

    Sessions are created on first use, so a process that only embeds queries never loads the
    image tower (and vice versa).
    """

    device = "cpu"

    def __init__(
        self,
        folder: str | Path,
        threads: int | None = None,
        int8: bool = False,
        spinning: bool = False,
        openvino: bool = True,
        image_streams: int | None = None,
        precision: str = "auto",
    ) -> None:
        """``threads``: None for one per core. ``spinning``: ONNX Runtime's workers spin between
        runs, which starves decode threads and other processes (``PIXFIND_ORT_SPIN``).
        ``openvino``: images on OpenVINO when it is installed and passes its check
        (``PIXFIND_OPENVINO``). ``image_streams``: OpenVINO streams for images (None: as many as
        suit the threads, for indexing; 1 for one image at a time, a query). ``precision``: the
        image model's setting (auto, f32, bf16; see :data:`pixfind.config.PRECISIONS`)."""
        self.folder = Path(folder)
        meta = json.loads((self.folder / META).read_text())
        if meta.get("version") != EXPORT_VERSION:
            raise ModelLoadError(f"stale ONNX export in {self.folder}")
        self.meta = meta
        self.spec = ModelSpec.from_weights(meta["model"], meta["weights"])
        self.dim = int(meta["dim"])
        self.image_size = int(meta["image_size"])
        self.threads = threads or cpu_cores()
        self.int8 = int8
        self.spinning = spinning
        self.openvino = openvino
        self.image_streams = image_streams
        self.precision_setting = precision_from(precision, "precision")
        self.normalisation = Normalisation(tuple(meta["preprocess"]["mean"]), tuple(meta["preprocess"]["std"]))
        #: Inference keeps every core busy: decoding beside it only slows both.
        self.fills_cpu = self.threads >= cpu_cores()
        #: What embeds images ("openvino" or "onnxruntime"), in what precision ("f32", "bf16",
        #: "int8") and why: None and "" until the first image batch picks the runtime.
        self.image_runtime: str | None = None
        self.image_precision: str | None = None
        self.precision_reason = ""
        self._sessions: dict[str, Any] = {}
        self._run_visual: Any = None
        self._pick_lock = threading.Lock()
        self._tokenizer: Any = None

    @classmethod
    def open(cls, spec: ModelSpec, **kwargs: Any) -> OnnxClipEncoder | None:
        """The exported encoder for ``spec`` if the cache has it, else None (never exports)."""
        folder = export_dir(spec)
        if not (folder / META).is_file():
            return None
        try:
            return cls(folder, **kwargs)
        except (OSError, ValueError, KeyError, ModelLoadError) as exc:
            log.warning("ignoring ONNX export in %s: %s", folder, exc)
            return None

    @property
    def draft_side(self) -> int:
        return draft_side_for(self.image_size)

    # -- sessions ---------------------------------------------------------------------------

    def session(self, tower: str) -> Any:
        if tower not in self._sessions:
            self._sessions[tower] = self._make_session(tower)
        return self._sessions[tower]

    def _make_session(self, tower: str) -> Any:
        import onnxruntime as ort

        path = self.folder / f"{tower}.onnx"
        if self.int8:
            path = quantize(self.folder, tower)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    # -- images -----------------------------------------------------------------------------

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """open_clip's resize and centre crop in Pillow: uint8 (3, S, S). The scaling and
        normalisation are left to the model run (:meth:`encode_images`)."""
        return resize_crop(image, self.image_size)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """Embed uint8 pixels (N, 3, S, S), as :meth:`preprocess` gives them, into unit vectors (N, dim)."""
        pixels = np.ascontiguousarray(pixels)
        if pixels.dtype != np.uint8:
            raise ValueError(f"pixels must be uint8 from preprocess, not {pixels.dtype}")
        if len(pixels) == 0:  # neither runtime takes an empty batch
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._pick_lock:
            if self._run_visual is None:
                self._run_visual = self._pick_image_runtime()
        return unit_rows(self._run_visual(pixels))

    def run_visual_ort(self, pixels: np.ndarray) -> np.ndarray:
        """ONNX Runtime's image tower on uint8 pixels: raw features (the reference OpenVINO is
        checked against)."""
        (features,) = self.session("visual").run(None, {"pixels": self.normalisation.apply(pixels)})
        return features

    def _pick_image_runtime(self) -> Any:
        """OpenVINO when it is on, installed and matches ONNX Runtime, in the precision
        :func:`~pixfind.models.openvino_runtime.choose_precision` says, else ONNX Runtime (f32).
        int8 stays on ONNX Runtime, which quantised it."""
        if self.int8:
            self.image_runtime, self.image_precision, self.precision_reason = "onnxruntime", "int8", "int8=True"
            return self.run_visual_ort
        reason = "OpenVINO is off or not installed: ONNX Runtime computes f32"
        if self.openvino:
            from .openvino_runtime import choose_precision, load_checked

            choice = choose_precision(self.precision_setting)
            runner = load_checked(
                self.folder,
                self.image_size,
                self.threads,
                self.normalisation,
                self.run_visual_ort,
                streams=self.image_streams,
                precision=choice.precision,
            )
            self._sessions.pop("visual", None)  # the check's ONNX Runtime session, freed
            if runner is not None:
                self.image_runtime, self.image_precision = "openvino", runner.precision
                self.precision_reason = runner.fallback or choice.reason
                return runner.run
        self.image_runtime, self.image_precision, self.precision_reason = "onnxruntime", "f32", reason
        return self.run_visual_ort

    # -- text -------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The torch-free CLIP tokenizer; open_clip's own (which imports torch) only for an
        export whose tokenizer is not the plain CLIP BPE one (the query path refuses those)."""
        if self._tokenizer is None:
            info = self.meta.get("tokenizer")
            if info:
                from .tokenizer import ClipTokenizer

                self._tokenizer = ClipTokenizer(self.folder / BPE_FILE, info["context_length"])
            else:
                import open_clip

                tok = open_clip.get_tokenizer(self.spec.name)
                self._tokenizer = lambda texts: tok(texts).numpy()
        return self._tokenizer

    def tokenize(self, texts: list[str]) -> np.ndarray:
        return self.tokenizer(texts)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Embed text queries into unit vectors (N, dim); padding after the longest prompt is
        cut off when the exported text tower takes any length (``text_trim`` in the meta)."""
        tokens = self.tokenize(texts)
        if self.meta.get("text_trim"):
            tokens = trim_padding(tokens)
        (features,) = self.session("text").run(None, {"tokens": tokens.astype(np.int64)})
        return unit_rows(features)


def quantize(folder: Path, tower: str) -> Path:
    """int8 dynamic quantisation of one tower (weights int8, activations quantised at run time);
    made once, beside the fp32 file."""
    target = folder / f"{tower}.int8.onnx"
    if target.is_file():
        return target
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = folder / f".{tower}.int8.{os.getpid()}.onnx"
    quantize_dynamic(str(folder / f"{tower}.onnx"), str(tmp), weight_type=QuantType.QInt8)
    tmp.replace(target)
    return target
