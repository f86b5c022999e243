"""Settings: where the index lives, which model embeds, how hard to work.

Every setting has a default, an environment variable and (in the CLI) a flag; flags beat the
environment, which beats the default. Nothing here imports torch or pymilvus, so reading the
configuration is instant.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from platformdirs import user_cache_dir, user_data_dir

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
DEFAULT_COLLECTION = "pixfind"

ENV_URI = "PIXFIND_URI"
ENV_TOKEN = "PIXFIND_TOKEN"
ENV_COLLECTION = "PIXFIND_COLLECTION"
ENV_MODEL = "PIXFIND_MODEL"
ENV_PRETRAINED = "PIXFIND_PRETRAINED"
ENV_CHECKPOINT = "PIXFIND_CHECKPOINT"
ENV_DEVICE = "PIXFIND_DEVICE"
ENV_CACHE = "PIXFIND_CACHE_DIR"
ENV_DATA = "PIXFIND_DATA_DIR"
ENV_SEARCH_EF = "PIXFIND_SEARCH_EF"
ENV_PRECISION = "PIXFIND_PRECISION"
ENV_BACKEND = "PIXFIND_BACKEND"
ENV_OPENVINO = "PIXFIND_OPENVINO"
ENV_ORT_SPIN = "PIXFIND_ORT_SPIN"
ENV_THREADS = "PIXFIND_THREADS"
ENV_DEBUG = "PIXFIND_DEBUG"
ENV_DECODE = "PIXFIND_DECODE"

#: What the CPU image model computes in: ``auto`` (bf16 where the CPU has bf16 arithmetic in
#: hardware, else f32), or ``f32`` / ``bf16`` forced (see pixfind.models.openvino_runtime).
PRECISIONS = ("auto", "f32", "bf16")

#: Where JPEGs are decoded when indexing: ``auto`` (on the GPU beside a CUDA model, where
#: torchvision's decoder works; else the CPU), ``cpu``, or ``gpu`` (refused where it cannot be).
#: See pixfind.ingest.gpu_decode.
DECODE_MODES = ("auto", "cpu", "gpu")

#: Default search effort on a Milvus server (HNSW ``ef``): recall@10 >= 0.98 on clustered
#: CLIP-like vectors up to a million rows, where a smaller ``ef`` fell short (docs/scale.md;
#: tests/test_search_effort.py holds it to the measurement). Embedded Lite searches exactly.
DEFAULT_SEARCH_EF = 128


def data_dir() -> Path:
    """Folder holding the default embedded index (``$PIXFIND_DATA_DIR`` or the OS data dir)."""
    return Path(os.environ.get(ENV_DATA) or user_data_dir("pixfind"))


def cache_dir() -> Path:
    """Folder for downloaded weights, exported models and thumbnails."""
    return Path(os.environ.get(ENV_CACHE) or user_cache_dir("pixfind"))


def default_uri() -> str:
    return str(data_dir() / "pixfind.db")


#: URI beginnings that name a Milvus server (``unix:`` is a server's socket file).
SERVER_PREFIXES = ("http://", "https://", "tcp://", "grpc://", "unix:")
#: ``scheme:`` followed by ``/`` (RFC 3986 scheme characters): a URI, not a file name.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")


def is_server_uri(uri: str) -> bool:
    """``http(s)://``, ``tcp://``, ``grpc://`` and ``unix:`` URIs name a Milvus server; a path is
    a Lite file. Any other scheme (a typo, ``file://``, ``nonsense://``) is refused, rather than
    taken as a file path and created as an odd folder in the current directory."""
    if uri.startswith(SERVER_PREFIXES):
        return True
    match = _SCHEME.match(uri)
    if match:
        from .errors import PixfindError

        raise PixfindError(
            f"unknown URI scheme {match.group(1)!r} in {uri!r}: give a Milvus Lite file path "
            f"(e.g. pixfind.db) or a server URI ({', '.join(SERVER_PREFIXES)})"
        )
    return False


def search_ef_from(value: object, source: str = "--ef") -> int:
    """A validated search effort (``ef``): a whole number from 1 to 32768."""
    try:
        ef = int(str(value).strip())
    except ValueError:
        ef = 0
    if not 1 <= ef <= 32768:
        from .errors import PixfindError

        raise PixfindError(f"{source} must be a whole number from 1 to 32768, not {value!r}")
    return ef


def default_search_ef() -> int:
    """``$PIXFIND_SEARCH_EF`` or :data:`DEFAULT_SEARCH_EF`."""
    value = _env(ENV_SEARCH_EF)
    return DEFAULT_SEARCH_EF if value is None else search_ef_from(value, ENV_SEARCH_EF)


def precision_from(value: object, source: str = "--precision") -> str:
    """A validated precision setting: one of :data:`PRECISIONS` (case and spaces ignored)."""
    text = str(value).strip().lower()
    if text not in PRECISIONS:
        from .errors import PixfindError

        raise PixfindError(f"{source} must be one of {', '.join(PRECISIONS)}, not {value!r}")
    return text


def default_precision() -> str:
    """``$PIXFIND_PRECISION`` or ``auto``."""
    value = _env(ENV_PRECISION)
    return "auto" if value is None else precision_from(value, ENV_PRECISION)


def cpu_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's share), at least 1."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_from(value: object, source: str = ENV_THREADS) -> int | None:
    """A validated thread count for the model: a whole number, 0 (or empty) for one per core (None)."""
    text = str(value).strip()
    try:
        threads = int(text or "0")
    except ValueError:
        threads = -1
    if threads < 0:
        from .errors import PixfindError

        raise PixfindError(f"{source} must be a whole number of threads (0: one per core), not {value!r}")
    return threads or None


def decode_mode_from(value: object, source: str = "--decode") -> str:
    """A validated decode setting: one of :data:`DECODE_MODES` (case and spaces ignored)."""
    text = str(value).strip().lower()
    if text not in DECODE_MODES:
        from .errors import PixfindError

        raise PixfindError(f"{source} must be one of {', '.join(DECODE_MODES)}, not {value!r}")
    return text


def _decode_from_env() -> str:
    """``$PIXFIND_DECODE`` checked, or ``auto``."""
    value = _env(ENV_DECODE)
    return "auto" if value is None else decode_mode_from(value, ENV_DECODE)


def _env_flag(name: str, default: bool) -> bool:
    """A yes/no variable: unset or empty gives ``default``; 0, false, no, off are no."""
    value = _env(name)
    if value is None:
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def debug_enabled() -> bool:
    """``$PIXFIND_DEBUG``: internal errors show their traceback. Read when one happens, apart
    from :class:`Settings`: a broken setting must not hide the error being reported."""
    return _env(ENV_DEBUG) is not None


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def normalise_pretrained(tag: str | None) -> str | None:
    """``none``/empty means random weights (offline testing); anything else is an open_clip tag."""
    if tag is None:
        return None
    tag = tag.strip()
    return None if tag.lower() in {"", "none", "random"} else tag


@dataclass(frozen=True)
class ModelSpec:
    """Which open_clip network embeds images and text, and with which weights."""

    name: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED
    checkpoint: str | None = None

    @property
    def weights(self) -> str:
        """How the weights are identified in the collection's metadata."""
        if self.checkpoint:
            return f"file:{self.checkpoint}"
        return self.pretrained or "none"

    @classmethod
    def from_weights(cls, name: str, weights: str) -> ModelSpec:
        """Inverse of :attr:`weights`: rebuild the spec a collection records."""
        if weights.startswith("file:"):
            return cls(name=name, pretrained=None, checkpoint=weights[len("file:") :])
        return cls(name=name, pretrained=normalise_pretrained(weights))

    def describe(self) -> str:
        return f"{self.name} ({self.weights})"


@dataclass(frozen=True)
class Settings:
    """Everything a command needs to reach the index and the model."""

    uri: str = field(default_factory=default_uri)
    token: str | None = None
    collection: str = DEFAULT_COLLECTION
    model: ModelSpec | None = None  # None: use what the collection records (or the default)
    device: str = "auto"
    batch_size: int | None = None  # None: pick per device
    workers: int | None = None  # decode threads; None: pick from the CPU count
    draft: bool = True  # reduced-size JPEG decoding
    search_ef: int | None = None  # server search effort (HNSW ef); None: $PIXFIND_SEARCH_EF or default
    precision: str = "auto"  # CPU image model: auto, f32 or bf16 (see PRECISIONS)
    backend: str = "auto"  # model runtime: auto (ONNX Runtime on CPU, torch on GPU), onnx or torch
    openvino: bool = True  # images on OpenVINO where it is installed and matches ONNX Runtime
    ort_spin: bool = False  # ONNX Runtime's threads spin between runs (costs others the core)
    threads: int | None = None  # model threads; None: one per core
    decode: str = "auto"  # where JPEGs are decoded: auto (the GPU beside a CUDA model), cpu or gpu

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Defaults, then environment variables, then the non-None ``overrides``."""
        model = None
        if _env(ENV_MODEL) or _env(ENV_PRETRAINED) is not None or _env(ENV_CHECKPOINT):
            model = ModelSpec(
                name=_env(ENV_MODEL) or DEFAULT_MODEL,
                pretrained=normalise_pretrained(os.environ.get(ENV_PRETRAINED, DEFAULT_PRETRAINED)),
                checkpoint=_env(ENV_CHECKPOINT),
            )
        base = cls(
            uri=_env(ENV_URI) or default_uri(),
            token=_env(ENV_TOKEN),
            collection=_env(ENV_COLLECTION) or DEFAULT_COLLECTION,
            model=model,
            device=_env(ENV_DEVICE) or "auto",
            search_ef=default_search_ef() if _env(ENV_SEARCH_EF) else None,
            precision=default_precision(),
            backend=(_env(ENV_BACKEND) or "auto").strip().lower(),
            openvino=_env_flag(ENV_OPENVINO, True),
            ort_spin=_env_flag(ENV_ORT_SPIN, False),
            threads=threads_from(_env(ENV_THREADS) or "0"),
            decode=_decode_from_env(),
        )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})
