"""ONNX Runtime backend: the open_clip towers exported once, then run without torch.

``load_encoder(spec)`` is the entry point: on CPU it returns an :class:`OnnxClipEncoder` when the
towers are exported (exporting them on first use, which needs torch) and pass the parity check
against torch, else a torch :class:`~pixfind.encoder.ClipEncoder`, with the reason logged.

The export cache (``cache_dir()/onnx/<model>-<weights-hash>/``) holds ``visual.onnx``,
``text.onnx``, the tokenizer's merges and ``meta.json`` (written last: a folder without it is
incomplete). Once it exists, nothing here imports torch or open_clip: preprocessing is done with
Pillow and numpy (checked equal to open_clip's transform at export), tokenising by
:mod:`pixfind.cliptokenizer` (checked equal to open_clip's tokenizer at export). Vectors are the
torch backend's to within 1e-4 (checked at export), so indexes built with either can be searched
with either.

int8 dynamic quantisation is opt-in (``int8=True``): ~1.5x faster on AVX2 CPUs, but embeddings
drift from fp32 (cosine recorded in ``meta.json`` as ``int8_cosine``); do not mix int8 and fp32
vectors in one index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import ModelSpec, cache_dir, cpu_cores, default_precision, inference_threads, precision_from
from .encoder import _first_line, draft_side_for  # numpy only: no torch import
from .errors import ModelLoadError
from .preprocess import clip_normalisation, normalise, resize_crop
from .vectors import unit_rows

if TYPE_CHECKING:
    from PIL import Image

    from .encoder import ClipEncoder

log = logging.getLogger(__name__)

#: Bump when the export format or the parity checks change: old folders are then ignored.
EXPORT_VERSION = 2
OPSET = 17
#: What a first run tells the user to expect for the export of a model (loading it in torch,
#: tracing both towers, the parity checks), where it was measured: ViT-B-32 took 15 s on 2 idle
#: cores and 40 s on the same cores shared with other jobs. Other models: no estimate (larger
#: ones take longer); the progress line shows the time elapsed.
EXPORT_ESTIMATES = {"ViT-B-32": "~15-40 s"}
#: Largest allowed |ORT - torch| on unit vectors (typically ~3e-6 in fp32).
PARITY_TOL = 1e-4
META = "meta.json"
FAILED = "failed.json"
BPE_FILE = "bpe_merges.txt"

PARITY_TEXTS = [
    "a photo of a dog",
    "",
    "A red car parked in front of an old building at night, raining",
    "Ünïcödé café — “quotes” ﬁ 日本語 🐱",
    "&amp; html &lt;b&gt; entities",
    "very long caption " * 40,
]


def _version(dist: str) -> str:
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
        from .encoder import RANDOM_WEIGHTS_SEED

        parts["random"] = [RANDOM_WEIGHTS_SEED, _version("open_clip_torch"), _version("torch")]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def export_dir(spec: ModelSpec) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.name)
    return cache_dir() / "onnx" / f"{safe}-{weights_key(spec)}"


def default_threads() -> int:
    return inference_threads()


class OnnxClipEncoder:
    """Same interface as :class:`~pixfind.encoder.ClipEncoder`, on ONNX Runtime (CPU).

    Sessions are created on first use, so a process that only embeds queries never loads the
    image tower (and vice versa).
    """

    backend = "onnx"
    device = "cpu"

    def __init__(
        self,
        folder: str | Path,
        threads: int | None = None,
        int8: bool = False,
        spinning: bool | None = None,
        openvino: bool | None = None,
        image_streams: int | None = None,
        precision: str | None = None,
    ) -> None:
        self.folder = Path(folder)
        meta = json.loads((self.folder / META).read_text())
        if meta.get("version") != EXPORT_VERSION:
            raise ModelLoadError(f"stale ONNX export in {self.folder}")
        self.meta = meta
        self.spec = ModelSpec.from_weights(meta["model"], meta["weights"])
        self.dim = int(meta["dim"])
        self.image_size = int(meta["image_size"])
        self.threads = threads or default_threads()
        self.int8 = int8
        #: Spinning ORT workers burn a core between runs, which starves decode threads and other
        #: processes: off by default (measured: -5% on a quiet 2-core machine, up to +45% on a busy
        #: one); ``PIXFIND_ORT_SPIN=1`` turns it on.
        self.spinning = spinning
        self._sessions: dict[str, Any] = {}
        #: Images on OpenVINO: None = when it is installed, checked and not disabled.
        self.openvino = openvino
        #: OpenVINO streams for images: None = two (throughput, for indexing); 1 for one image at a
        #: time with every thread on it (queries: 42 ms instead of 80 on 2 quiet cores).
        self.image_streams = image_streams
        self._run_visual: Any = None
        self._pick_lock = threading.Lock()
        #: What embeds images: "openvino" or "onnxruntime" (None until the first image batch).
        self.image_runtime: str | None = None
        #: The precision setting for images (auto, f32, bf16; None: ``$PIXFIND_PRECISION``).
        self.precision_setting = precision_from(precision, "precision") if precision else default_precision()
        #: What the image model computes in ("f32", "bf16", "int8"; None until the first image
        #: batch), and why (the setting, the CPU, or a failed check).
        self.image_precision: str | None = None
        self.precision_reason = ""
        self._tokenizer: Any = None
        #: Inference keeps every core busy: decoding beside it only slows both (the indexer then
        #: decodes between batches instead).
        self.fills_cpu = self.threads >= cpu_cores()
        pre = meta["preprocess"]
        self._mean = np.array(pre["mean"], dtype=np.float32).reshape(3, 1, 1)
        self._std = np.array(pre["std"], dtype=np.float32).reshape(3, 1, 1)

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
        spinning = self.spinning
        if spinning is None:
            spinning = os.environ.get("PIXFIND_ORT_SPIN", "0") not in ("", "0")
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    # -- images -----------------------------------------------------------------------------

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """open_clip's resize and centre crop in Pillow: uint8 (3, S, S), equal to torchvision's
        pixels (checked at export). The scaling and normalisation are left to the model run
        (:meth:`encode_images`): compiled into the OpenVINO model, numpy for ONNX Runtime."""
        return resize_crop(image, self.image_size)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """Embed a batch (N, 3, H, W) into unit vectors (N, dim): uint8 pixels as :meth:`preprocess`
        gives them, or float32 already normalised (what open_clip's own transform gives)."""
        pixels = np.ascontiguousarray(pixels)
        if len(pixels) == 0:  # neither runtime takes an empty batch
            return np.zeros((0, self.dim), dtype=np.float32)
        if pixels.dtype != np.uint8:
            pixels = pixels.astype(np.float32, copy=False)
        with self._pick_lock:
            if self._run_visual is None:
                self._run_visual = self._pick_image_runtime()
        return unit_rows(self._run_visual(pixels))

    def _run_visual_ort(self, pixels: np.ndarray) -> np.ndarray:
        """ONNX Runtime's image tower on uint8 pixels or normalised float32."""
        batch = normalise(pixels, self._mean, self._std) if pixels.dtype == np.uint8 else pixels
        (features,) = self.session("visual").run(None, {"pixels": batch})
        return features

    def _pick_image_runtime(self) -> Any:
        """OpenVINO when it is installed and matches ONNX Runtime (see :mod:`pixfind.openvino_visual`),
        in bf16 where :func:`~pixfind.openvino_visual.choose_precision` says so, else ONNX Runtime
        (f32). int8 stays on ONNX Runtime, which quantised it."""
        if self.int8:
            self.image_runtime, self.image_precision, self.precision_reason = "onnxruntime", "int8", "int8=True"
            return self._run_visual_ort
        reason = "OpenVINO is off or not installed: ONNX Runtime computes f32"
        if self.openvino is not False:
            from .openvino_visual import choose_precision, load_checked

            choice = choose_precision(self.precision_setting)
            runner = load_checked(
                self.folder,
                self.image_size,
                self.threads,
                (self._mean, self._std),
                self._run_visual_ort,
                even_if_disabled=bool(self.openvino),
                streams=self.image_streams,
                precision=choice.precision,
            )
            self._sessions.pop("visual", None)  # the check's ONNX Runtime session: ~350 MB freed
            if runner is not None:
                self.image_runtime, self.image_precision = "openvino", runner.precision
                self.precision_reason = runner.fallback or choice.reason
                return runner.run
        self.image_runtime, self.image_precision, self.precision_reason = "onnxruntime", "f32", reason
        return self._run_visual_ort

    # -- text -------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            info = self.meta.get("tokenizer")
            if info:
                from .cliptokenizer import ClipTokenizer

                self._tokenizer = ClipTokenizer(self.folder / BPE_FILE, info["context_length"])
            else:  # not a plain CLIP BPE tokenizer: open_clip's own (imports torch)
                import open_clip

                tok = open_clip.get_tokenizer(self.spec.name)
                self._tokenizer = lambda texts: tok(texts).numpy()
        return self._tokenizer

    def tokenize(self, texts: list[str]) -> np.ndarray:
        return self.tokenizer(texts)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Embed text queries into unit vectors (N, dim); padding after the longest prompt is
        cut off when the text tower allows it (see :func:`text_tower_for_export`)."""
        from .cliptokenizer import trim_padding

        tokens = self.tokenize(texts)
        if self.meta.get("text_trim"):
            tokens = trim_padding(tokens)
        (features,) = self.session("text").run(None, {"tokens": tokens.astype(np.int64)})
        return unit_rows(features)


# -- choosing a backend ----------------------------------------------------------------------


def load_encoder(
    spec: ModelSpec,
    backend: str | None = None,
    device: str = "auto",
    threads: int | None = None,
    int8: bool = False,
    status: Callable[[str], None] | None = None,
    precision: str | None = None,
) -> ClipEncoder | OnnxClipEncoder:
    """The encoder to use: ``backend`` "onnx", "torch" or "auto"/None (``$PIXFIND_BACKEND``,
    default auto: ONNX Runtime on CPU when the export works, torch on CUDA or as fallback).
    ``status`` hears what takes the time, for a progress display. ``precision``: the exported
    image tower's setting (auto, f32, bf16; None: ``$PIXFIND_PRECISION``); torch ignores it (f32
    on the CPU, fp16 on CUDA)."""
    from .encoder import check_device

    say = status or _silent
    backend = (backend or os.environ.get("PIXFIND_BACKEND") or "auto").lower()
    if backend not in ("auto", "onnx", "torch"):
        raise ModelLoadError(f"unknown backend {backend!r}: choose auto, onnx or torch")
    device = check_device(device)
    if backend == "auto" and (device not in ("auto", "cpu") or (device == "auto" and _gpu_present())):
        backend = "torch"
    if backend != "torch":
        encoder = OnnxClipEncoder.open(spec, threads=threads, int8=int8, precision=precision)
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
    from .encoder import ClipEncoder, configure_threads

    if backend == "torch" or device not in ("auto", "cpu"):
        configure_threads(threads)
        say(f"loading {spec.describe()}")
        return ClipEncoder(spec, device, status=say)
    failure = _previous_failure(spec)
    estimate = EXPORT_ESTIMATES.get(spec.name)
    preparing = f"preparing {spec.name} for this CPU, once" + (f" ({estimate})" if estimate else "")
    say(preparing if failure is None else f"loading {spec.describe()}")
    torch_encoder = ClipEncoder(spec, "cpu", status=say)
    if failure is None:
        say(preparing)  # again, after any download
        try:
            folder = export(torch_encoder)
            return OnnxClipEncoder(folder, threads=threads, int8=int8, precision=precision)
        except Exception as exc:  # any export failure means: use torch
            failure = _failure_text(exc)
            _record_failure(spec, failure)
    if backend == "onnx":
        raise ModelLoadError(f"ONNX export of {spec.describe()} failed: {failure}")
    log.warning("ONNX export of %s unusable, using torch: %s", spec.describe(), failure)
    configure_threads(threads)
    return torch_encoder


def _silent(text: str) -> None:
    pass


def planned_image_precision(spec: ModelSpec, setting: str) -> tuple[str, str]:
    """What an index run on this machine's CPU would embed images in, and why, without loading
    anything (for ``pixfind info``): the precision setting and CPU (see
    :func:`~pixfind.openvino_visual.choose_precision`), unless the torch backend is forced, OpenVINO
    is off or missing, or bf16 failed its check for this model's export before."""
    from . import openvino_visual

    if (os.environ.get("PIXFIND_BACKEND") or "").strip().lower() == "torch":
        return "f32", "PIXFIND_BACKEND=torch"
    if not openvino_visual.enabled() or openvino_visual.version() is None:
        return "f32", "OpenVINO is off or not installed: ONNX Runtime computes f32"
    choice = openvino_visual.choose_precision(setting)
    failure = openvino_visual.recorded_failure(export_dir(spec), choice.precision)
    if choice.precision == "bf16" and failure:
        return "f32", f"bf16 failed its check: {failure}"
    return choice.precision, choice.reason


def _failure_text(exc: BaseException) -> str:
    """``Type: first line of the message`` (the type alone when the message is empty or blank)."""
    name, line = type(exc).__name__, _first_line(exc, 300)
    return name if line == name else f"{name}: {line}"


def _gpu_present() -> bool:
    """CUDA usable? Only imports torch (2+ s) when an NVIDIA driver is there at all."""
    from .encoder import pick_device

    return pick_device("auto") != "cpu"


def _failure_key() -> dict[str, str]:
    return {
        "export": str(EXPORT_VERSION),
        "torch": _version("torch"),
        "open_clip": _version("open_clip_torch"),
        "onnxruntime": _version("onnxruntime"),
    }


def _previous_failure(spec: ModelSpec) -> str | None:
    """A recorded export failure for these exact library versions (not retried every run)."""
    path = export_dir(spec).parent / f"{export_dir(spec).name}.{FAILED}"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record.get("reason") if record.get("versions") == _failure_key() else None


def _record_failure(spec: ModelSpec, reason: str) -> None:
    path = export_dir(spec).parent / f"{export_dir(spec).name}.{FAILED}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"reason": reason, "versions": _failure_key()}))
    except OSError:
        pass


# -- export (needs torch) --------------------------------------------------------------------


def export(encoder: ClipEncoder, folder: Path | None = None) -> Path:
    """Export ``encoder``'s towers to ONNX, check them against torch, and commit the folder.

    Raises on any failure (export, parity, preprocessing or tokenizer mismatch); the caller falls
    back to torch. Safe against concurrent exporters: each writes a private folder and renames it.
    """
    import torch

    spec = encoder.spec
    folder = folder or export_dir(spec)
    if (folder / META).is_file():
        return folder
    started = time.perf_counter()
    work = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        model = encoder.model.float().eval()
        tower = text_tower_for_export(model)
        trim = tower is not None
        if tower is None:

            class FullText(torch.nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.model = model

                def forward(self, tokens: Any) -> Any:
                    return self.model.encode_text(tokens)

            tower = FullText().eval()
        previous = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            size = encoder.image_size
            pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
            tokens = encoder.tokenize(["a photo of a dog", "x"])
            if trim:  # trace at a length other than the context, so nothing pins it to 77
                from .encoder import trim_padding

                tokens = trim_padding(tokens)
            _export(model.visual, pixels, work / "visual.onnx", "pixels", {0: "batch"})
            _export(
                tower,
                tokens,
                work / "text.onnx",
                "tokens",
                {0: "batch", 1: "length"} if trim else {0: "batch"},
            )
        finally:
            torch.backends.mha.set_fastpath_enabled(previous)
        preprocess = _preprocess_config(encoder)
        tokenizer = _tokenizer_config(encoder, work)
        meta = {
            "version": EXPORT_VERSION,
            "model": spec.name,
            "weights": spec.weights,
            "dim": encoder.dim,
            "image_size": encoder.image_size,
            "text_trim": trim,
            "preprocess": preprocess,
            "tokenizer": tokenizer,
            "opset": OPSET,
            "versions": _failure_key(),
        }
        (work / META).write_text(json.dumps(meta, indent=1))
        candidate = OnnxClipEncoder(work, threads=None)
        meta["parity"] = check_parity(encoder, candidate)
        meta["export_seconds"] = round(time.perf_counter() - started, 1)
        (work / (META + ".tmp")).write_text(json.dumps(meta, indent=1))
        (work / (META + ".tmp")).replace(work / META)
        try:
            work.rename(folder)
        except OSError:
            if not (folder / META).is_file():  # not a concurrent winner: a real failure
                raise
        log.info("exported %s to ONNX in %.0f s: %s", spec.describe(), meta["export_seconds"], folder)
        return folder
    finally:
        shutil.rmtree(work, ignore_errors=True)


def text_tower_for_export(model: Any) -> Any | None:
    """The text tower as a module taking tokens (N, L) for any L up to the context length.

    open_clip's ``encode_text`` adds all 77 positional embeddings and the full 77x77 causal mask,
    so it only accepts full rows. With a causal mask and pooling at the end-of-text token
    (argmax: it has the highest id), positions after that token cannot change the output, so
    slicing both to L gives the same features (as ``pixfind.encoder`` does for torch queries).
    Attention is written out with shapes read from the input: ``nn.MultiheadAttention``'s own
    forward traces the sequence length as a constant. None for any other kind of text tower
    (it is then exported at full length, and queries keep their padding).
    """
    import torch
    from open_clip.transformer import text_global_pool

    parts = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
    if parts is None or not all(
        hasattr(parts, a) for a in ("token_embedding", "positional_embedding", "ln_final", "transformer")
    ):
        return None
    pool = getattr(parts, "text_pool_type", getattr(parts, "pool_type", None))
    if pool != "argmax" or getattr(parts, "attn_mask", None) is None:
        return None
    if getattr(parts, "cls_emb", None) is not None or getattr(parts, "use_pad_mask", False):
        return None
    blocks = list(getattr(parts.transformer, "resblocks", []))
    if not blocks or not getattr(parts.transformer, "batch_first", True):
        return None
    for b in blocks:
        attn = getattr(b, "attn", None)
        if not (
            isinstance(attn, torch.nn.MultiheadAttention)
            and attn.batch_first
            and attn._qkv_same_embed_dim
            and not hasattr(b, "ln_1_kv")
            and all(hasattr(b, a) for a in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2"))
        ):
            return None

    def attention(attn: Any, x: Any, mask: Any) -> Any:
        batch, width, heads, head_dim = x.shape[0], attn.embed_dim, attn.num_heads, attn.head_dim
        qkv = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias)
        qkv = qkv.reshape(batch, -1, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = torch.matmul(q * (head_dim**-0.5), k.transpose(-2, -1)) + mask
        out = torch.matmul(scores.softmax(dim=-1), v)
        return attn.out_proj(out.transpose(1, 2).reshape(batch, -1, width))

    class TextTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.parts = parts

        def forward(self, tokens: Any) -> Any:
            p = self.parts
            length = tokens.shape[1]
            cast = p.transformer.get_cast_dtype()
            x = p.token_embedding(tokens).to(cast)
            x = x + p.positional_embedding[:length].to(cast)
            mask = p.attn_mask[:length, :length].to(cast)
            for block in p.transformer.resblocks:
                x = x + block.ls_1(attention(block.attn, block.ln_1(x), mask))
                x = x + block.ls_2(block.mlp(block.ln_2(x)))
            x = p.ln_final(x)
            x = text_global_pool(x, tokens, "argmax")
            proj = p.text_projection
            if proj is not None:
                x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
            return x

    return TextTower().eval()


def _export(module: Any, sample: Any, path: Path, name: str, axes: dict[int, str]) -> None:
    """Trace ``module`` to ``path``, weights in ``<path>.data`` beside it: ONNX Runtime maps an
    external weights file instead of parsing it out of the protobuf, which makes creating the
    text session ~3x faster (0.6 -> 0.2 s for ViT-B-32): most of a cold query's model cost."""
    import warnings

    import onnx
    import torch

    traced = path.with_name(f".{path.name}.traced")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks: parity decides
        torch.onnx.export(
            module,
            (sample,),
            str(traced),
            dynamo=False,
            opset_version=OPSET,
            input_names=[name],
            output_names=["features"],
            dynamic_axes={name: axes, "features": {0: "batch"}},
            do_constant_folding=True,
        )
    proto = onnx.load(str(traced))
    traced.unlink()
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=1024,
    )


def _preprocess_config(encoder: ClipEncoder) -> dict[str, Any]:
    """Read open_clip's transform; refuse any pipeline the numpy version does not reproduce."""
    found = clip_normalisation(encoder._transform, encoder.image_size)
    if found is None:
        raise ModelLoadError(f"unsupported preprocessing pipeline {encoder._transform}")
    mean, std = found
    return {"mean": list(mean), "std": list(std)}


def _tokenizer_config(encoder: ClipEncoder, work: Path) -> dict[str, Any] | None:
    """Save the BPE merges when open_clip's tokenizer is the plain CLIP one (else None: the ONNX
    encoder then tokenises with open_clip, which imports torch)."""
    try:
        from open_clip.tokenizer import SimpleTokenizer, _clean_lower, default_bpe
    except ImportError:
        return None
    tok = encoder._tokenizer
    if (
        type(tok) is not SimpleTokenizer
        or tok.clean_fn is not _clean_lower
        or tok.reduction_fn is not None
        or tok.vocab_size != 49408
    ):
        return None
    import gzip

    lines = gzip.decompress(Path(default_bpe()).read_bytes()).decode("utf-8").split("\n")[: 49152 - 256 - 2 + 1]
    (work / BPE_FILE).write_text("\n".join(lines), encoding="utf-8")
    from .cliptokenizer import ClipTokenizer

    ours = ClipTokenizer(work / BPE_FILE, tok.context_length)
    if ours.encoder != tok.encoder:
        return None
    return {"kind": "clip-bpe", "context_length": int(tok.context_length)}


def check_parity(encoder: ClipEncoder, candidate: OnnxClipEncoder) -> dict[str, float]:
    """Compare the ONNX encoder with torch on images (including the preprocessing) and texts
    (including the tokenizer and trimming); raise ModelLoadError when they differ."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in ((300, 400), (517, 233), (224, 224), (97, 1000))
    ]
    gradient = np.linspace(0, 255, 640 * 480 * 3).reshape(480, 640, 3).astype(np.uint8)
    images.append(Image.fromarray(gradient))
    torch_pixels = np.stack([encoder.preprocess(img) for img in images])
    ours = np.stack([candidate.preprocess(img) for img in images])  # uint8
    pre_diff = float(np.abs(torch_pixels - normalise(ours, candidate._mean, candidate._std)).max())
    if pre_diff > 1e-5:
        raise ModelLoadError(f"numpy preprocessing differs from open_clip's by {pre_diff:.2e}")
    a = encoder.encode_images(torch_pixels)
    # ONNX Runtime's image tower; OpenVINO is checked against it when first used (openvino_visual)
    b = unit_rows(candidate._run_visual_ort(ours))
    image_diff = float(np.abs(a - b).max())
    a1 = unit_rows(candidate._run_visual_ort(ours[:1]))  # batch 1 through the dynamic axis
    image_diff = max(image_diff, float(np.abs(a[:1] - a1).max()))
    if image_diff > PARITY_TOL:
        raise ModelLoadError(f"ONNX image tower differs from torch by {image_diff:.2e}")
    token_diff = 0
    if candidate.meta.get("tokenizer"):
        theirs = encoder.tokenize(PARITY_TEXTS).numpy()
        token_diff = int((theirs != candidate.tokenize(PARITY_TEXTS)).sum())
        if token_diff:
            raise ModelLoadError("torch-free tokenizer differs from open_clip's")
    import torch

    with torch.inference_mode():  # reference: full 77 positions, open_clip's own encode_text
        full = encoder.model.encode_text(encoder.tokenize(PARITY_TEXTS)).float().numpy()
    full = unit_rows(full)
    text_diff = 0.0
    for texts, ref in ((PARITY_TEXTS, full), (PARITY_TEXTS[:1], full[:1]), (PARITY_TEXTS[:3], full[:3])):
        text_diff = max(text_diff, float(np.abs(candidate.encode_texts(texts) - ref).max()))
    if text_diff > PARITY_TOL:
        raise ModelLoadError(f"ONNX text tower differs from torch by {text_diff:.2e}")
    return {"preprocess": pre_diff, "image": image_diff, "text": text_diff, "tokens": token_diff}


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
