"""An independent check that every stored vector belongs to its file, and is its current one.

For an index and the image files it should hold, :func:`check_index` embeds every file again,
one at a time, on open_clip's own documented reference path::

    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    model.encode_image(preprocess(picture)[None])

with the random weights pixfind uses for ``--pretrained none`` (the same seed), and never with
pixfind's encoder objects, decoder or preprocessing. The picture is what the README says pixfind
embeds: the first frame, EXIF orientation applied, alpha composited over white, full size.
Then, for each file:

* exactly one row, whose size and mtime are the file's own now (not a stale row);
* width and height as displayed (after EXIF rotation);
* a unit vector whose cosine to the file's own reference is at least :func:`min_cosine`;
* and which is nearer to its own reference than to any other file's (so a vector from the wrong
  file is caught even among near-duplicates).

Tolerances (measured on this project's 2-core machine, ViT-S-32 with random weights, drawn test
pictures as in ``conftest.draw_photo``):

* random weights put every picture in a narrow cone: different drawn pictures have cosines of
  0.977 on average and up to 0.995 (40 pictures, 780 pairs), so the bound must stay well above
  0.995 to tell a wrong vector from a right one;
* where nothing is decoded at reduced size (any file whose shorter side is under twice pixfind's
  documented draft side, 1.5x the model input), pixfind's ONNX Runtime, OpenVINO and torch
  vectors differ from the reference only by float rounding: 1 - cosine <= 1e-7 measured (11
  files, each runtime); :data:`EXACT_MIN_COSINE` is 0.99999, a hundred times that;
* where a file may be decoded at reduced size (README: ``Image.draft`` to 1.5x the model input
  for JPEGs; a box reduction for other formats), drawn pictures measured >= 0.99998 (48 JPEGs,
  700-2400 px; 0.9999925 through ``pixfind index``). :data:`REDUCED_MIN_COSINE` is 0.999: 50
  times that deviation, and still above the 0.995 that two different pictures can reach (the
  nearest-reference rule catches the rest). It holds for drawn test pictures only: real photos
  measured down to 0.9986 (60 photos; README: >= 0.9985 on 150).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from pixfind.store import Store

#: Cosine to the reference where no reduced-size decoding can happen (rounding only).
EXACT_MIN_COSINE = 0.99999
#: Cosine to the reference where a JPEG may be decoded at reduced size (drawn test pictures).
REDUCED_MIN_COSINE = 0.999
#: Cosine to the reference of images embedded in bf16 (docs/speed.md: the bf16 check's
#: tolerance, 0.999 per image; measured >= 0.99994 on 300 real photos).
BF16_MIN_COSINE = 0.999
#: README: "JPEGs decoded at reduced size (Image.draft to 1.5x the model input)".
DRAFT_FACTOR = 1.5


@dataclass(frozen=True)
class StoredRow:
    vector: np.ndarray
    size: int
    mtime_ns: int
    width: int
    height: int


class Reference:
    """open_clip's own model and preprocessing, with pixfind's random-weight seed."""

    def __init__(self, model_name: str) -> None:
        import open_clip
        import torch

        from pixfind.models.weights import RANDOM_WEIGHTS_SEED  # defines the random weights, nothing else

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
        self.model = model.eval()
        self.preprocess = preprocess
        self.name = model_name
        size = getattr(model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self._cache: dict[tuple[str, int, int], np.ndarray] = {}

    def embed(self, path: str | Path) -> np.ndarray:
        """The reference vector of the file as it is now (cached by path, size and mtime)."""
        import torch

        info = os.stat(path)
        key = (str(path), info.st_size, info.st_mtime_ns)
        if key not in self._cache:
            with torch.inference_mode():
                features = self.model.encode_image(self.preprocess(picture(path))[None])
            vector = features[0].numpy().astype(np.float64)
            self._cache[key] = vector / np.linalg.norm(vector)
        return self._cache[key]

    def min_cosine(self, path: str | Path) -> float:
        """The bound for this file: a picture is decoded at reduced size (JPEG draft, or a box
        reduction for other formats: docs/architecture.md) only when its shorter side is at least
        twice the draft side, since either reduces by a whole factor of 2 or more."""
        with Image.open(path) as img:
            shorter = min(img.size)
        return REDUCED_MIN_COSINE if shorter >= 2 * DRAFT_FACTOR * self.image_size else EXACT_MIN_COSINE


@functools.cache
def reference(model_name: str) -> Reference:
    """One reference model per test process."""
    return Reference(model_name)


def picture(path: str | Path) -> Image.Image:
    """The picture the README says is embedded: first frame, EXIF orientation, alpha over white."""
    with Image.open(path) as img:
        img.seek(0)
        img.load()
        oriented = ImageOps.exif_transpose(img)
    if oriented.mode in ("RGBA", "LA", "PA") or (oriented.mode == "P" and "transparency" in oriented.info):
        rgba = oriented.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return oriented.convert("RGB")


def displayed_size(path: str | Path) -> tuple[int, int]:
    return picture(path).size


def stored_rows(
    uri: str,
    token: str | None = None,
    collection: str = "pixfind",
    store: Store | None = None,
    strong: bool = False,
) -> dict[str, StoredRow]:
    """Every stored row by file path; fails on duplicate keys. ``store``: read through this open
    Store (a Lite file is locked by the process that has it open, this one included).

    Rows are read as any later process reads them (the README promises that a search right after
    ``pixfind index`` sees every image it reported); ``strong``: first wait until every write
    accepted by a server is visible, for writes of a process that was killed and never flushed."""
    from pixfind.store import Store

    if store is not None:
        return _read_rows(store, strong)
    with Store(uri, token=token, collection=collection) as opened:
        return _read_rows(opened, strong)


def _read_rows(store: Store, strong: bool) -> dict[str, StoredRow]:
    from pixfind.pathkeys import keys_filter, path_of
    from pixfind.store import flat_record, record_fields

    rows: dict[str, StoredRow] = {}
    if not store.exists():
        return rows
    if strong:
        store.sync()
    keys = [key for page in store.iter_keys() for key in page]
    assert len(keys) == len(set(keys)), "a key is stored twice"
    count = store.count()
    assert count == len(keys), f"count(*) {count} != {len(keys)} distinct keys"
    info = store.info()
    assert info is not None
    fields = ["path", "vector", *record_fields(info.schema)]
    for start in range(0, len(keys), 200):
        chunk = keys[start : start + 200]
        for raw in store.client.query(store.collection, filter=keys_filter(chunk), output_fields=fields):
            row = flat_record(raw)
            rows[path_of(row["path"])] = StoredRow(
                np.asarray(row["vector"], dtype=np.float64),
                int(row["size"]),
                int(row["mtime_ns"]),
                int(row["width"]),
                int(row["height"]),
            )
    return rows


@dataclass
class Verdict:
    path: str
    cosine: float
    bound: float
    nearest_other: str | None
    nearest_other_cosine: float


def check_index(
    uri: str,
    files: Iterable[str | Path],
    *,
    model: str,
    token: str | None = None,
    collection: str = "pixfind",
    store: Store | None = None,
    strong: bool = False,
    precision: str = "f32",
) -> list[Verdict]:
    """Assert that the index holds exactly ``files``, each with its own current vector and record;
    returns the per-file verdicts (cosines) for reports. ``store``, ``strong``: see stored_rows.
    ``precision``: what the run said it embedded images in (:func:`reported_precision`)."""
    expected = sorted({str(f) for f in files})
    rows = stored_rows(uri, token=token, collection=collection, store=store, strong=strong)
    missing = sorted(set(expected) - set(rows))
    extra = sorted(set(rows) - set(expected))
    assert not missing and not extra, f"stored set differs: missing {missing[:5]}, extra {extra[:5]}"
    ref = reference(model)
    refs = np.stack([ref.embed(path) for path in expected]) if expected else np.zeros((0, 1))
    problems: list[str] = []
    verdicts: list[Verdict] = []
    for i, path in enumerate(expected):
        row = rows[path]
        info = os.stat(path)
        if (row.size, row.mtime_ns) != (info.st_size, info.st_mtime_ns):
            stored, now = (row.size, row.mtime_ns), (info.st_size, info.st_mtime_ns)
            problems.append(f"{path}: stale record (size, mtime) {stored} != the file's {now}")
        if (row.width, row.height) != displayed_size(path):
            problems.append(f"{path}: stored {row.width}x{row.height}, the picture is {displayed_size(path)}")
        norm = float(np.linalg.norm(row.vector))
        if abs(norm - 1.0) > 1e-3:
            problems.append(f"{path}: vector of length {norm:.4f}, not a unit vector")
        cosines = refs @ (row.vector / max(norm, 1e-12))
        own = float(cosines[i])
        other = refs @ refs[i] < 1 - 1e-9  # files holding another picture (copies are the same)
        nearest = int(np.argmax(np.where(other, cosines, -np.inf))) if other.any() else -1
        other_path = expected[nearest] if nearest >= 0 else None
        other_cos = float(cosines[nearest]) if nearest >= 0 else -1.0
        bound = ref.min_cosine(path) if precision == "f32" else min(ref.min_cosine(path), BF16_MIN_COSINE)
        verdicts.append(Verdict(path, own, bound, other_path, other_cos))
        if own < bound:
            problems.append(f"{path}: cosine {own:.6f} to its own reference, below {bound}")
        if other_cos >= own:
            problems.append(f"{path}: nearer to {other_path} ({other_cos:.6f}) than to itself ({own:.6f})")
    assert not problems, f"{len(problems)} wrong rows:\n" + "\n".join(problems[:20])
    return verdicts


def reported_precision(summary: str) -> str:
    """The precision an index run's summary names ("images embedded in bf16 (...)"), f32 if none."""
    import re

    found = re.search(r"images embedded in (\w+) ", summary)
    return found.group(1) if found else "f32"


def image_files(folder: str | Path, skip: Iterable[str | Path] = ()) -> list[str]:
    """Image files a scan should store under ``folder`` (by extension), minus ``skip``."""
    from pixfind.ingest.decode import has_image_extension

    left_out = {str(p) for p in skip}
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = os.path.join(root, name)
            if not name.startswith(".") and has_image_extension(name) and path not in left_out:
                found.append(path)
    return sorted(found)
