"""The ONNX export of an open_clip model (needs torch), checked against torch before it is used.

Kept apart from :mod:`pixfind.models.onnx_runtime`, which runs the export without torch. Both
towers are traced once per model and weights; the folder is committed only when the numpy
preprocessing, the torch-free tokenizer and both towers give torch's results (:func:`check_parity`).
A failure is recorded per library versions, so it is not retried on every run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import ModelSpec
from ..errors import ModelLoadError
from ..vectors import unit_rows
from .onnx_runtime import BPE_FILE, EXPORT_VERSION, META, OnnxClipEncoder, export_dir, package_version
from .pixels import clip_normalisation
from .tokenizer import trim_padding

if TYPE_CHECKING:
    from .torch_clip import ClipEncoder

log = logging.getLogger(__name__)

OPSET = 17
#: Largest allowed |ORT - torch| on unit vectors.
PARITY_TOL = 1e-4
FAILED = "failed.json"

PARITY_TEXTS = [
    "a photo of a dog",
    "",
    "A red car parked in front of an old building at night, raining",
    "Ünïcödé café — “quotes” ﬁ 日本語 🐱",
    "&amp; html &lt;b&gt; entities",
    "very long caption " * 40,
]


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
        tower = encoder.text_tower
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
                tokens = torch.from_numpy(trim_padding(tokens.numpy()))
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


def _export(module: Any, sample: Any, path: Path, name: str, axes: dict[int, str]) -> None:
    """Trace ``module`` to ``path``, weights in ``<path>.data`` beside it: ONNX Runtime maps an
    external weights file instead of parsing it out of the protobuf, which makes creating the
    text session several times faster: most of a cold query's model cost (docs/speed.md)."""
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
    return {"mean": list(found.mean), "std": list(found.std)}


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
    from .tokenizer import ClipTokenizer

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
    pre_diff = float(np.abs(torch_pixels - candidate.normalisation.apply(ours)).max())
    if pre_diff > 1e-5:
        raise ModelLoadError(f"numpy preprocessing differs from open_clip's by {pre_diff:.2e}")
    a = encoder.encode_images(torch_pixels)
    # ONNX Runtime's image tower; OpenVINO is checked against it when first used (openvino_runtime)
    b = unit_rows(candidate.run_visual_ort(ours))
    image_diff = float(np.abs(a - b).max())
    a1 = unit_rows(candidate.run_visual_ort(ours[:1]))  # batch 1 through the dynamic axis
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


# -- failures, recorded per library versions ------------------------------------------------


def _failure_key() -> dict[str, str]:
    return {
        "export": str(EXPORT_VERSION),
        "torch": package_version("torch"),
        "open_clip": package_version("open_clip_torch"),
        "onnxruntime": package_version("onnxruntime"),
    }


def previous_failure(spec: ModelSpec) -> str | None:
    """A recorded export failure for these exact library versions (not retried every run)."""
    path = export_dir(spec).parent / f"{export_dir(spec).name}.{FAILED}"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record.get("reason") if record.get("versions") == _failure_key() else None


def record_failure(spec: ModelSpec, reason: str) -> None:
    path = export_dir(spec).parent / f"{export_dir(spec).name}.{FAILED}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"reason": reason, "versions": _failure_key()}))
    except OSError:
        pass
