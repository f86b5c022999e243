"""The stages that turn planned files into stored rows: decode one file, embed a batch, write rows.

Each stage is a plain function of picklable values (a :class:`~pixfind.ingest.plan.WorkItem`,
uint8 pixels, :class:`~pixfind.store.Row`), so any runner can compose them: the local one
(:mod:`pixfind.ingest.runner`) with a thread pool, a distributed one with its own workers. Where
a runner has to arbitrate the CPU between decoding and the model, it passes a ``turn`` (a context
manager factory) that brackets the CPU-heavy part; by default it does nothing.

Rows are keyed by path, so a batch written twice (after a crash) replaces itself: exactly once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ..models.base import Encoder
from ..store import Row, Store
from .content import NotRegularFileError, read_file
from .decode import ImageLoadError, describe_failure, load_image
from .facts import Header, facts_of
from .plan import WorkItem

Turn = Callable[[], AbstractContextManager[object]]


@dataclass(slots=True)
class Decoded:
    """A file ready for the model: its pixels and the record its row will carry."""

    item: WorkItem
    pixels: np.ndarray  # uint8 (3, S, S), the model's preprocess applied
    width: int  # of the original, as displayed
    height: int
    size: int  # of the bytes decoded (fstat when opened), not the scan's
    mtime_ns: int
    fingerprint: str
    content: str
    facts: dict[str, Any] = field(default_factory=dict)  # date taken, camera, type (ingest.facts)


@dataclass(slots=True)
class Compressed:
    """A JPEG read and hashed, left compressed for a GPU decoder (:mod:`.gpu_decode`): the same
    record as :class:`Decoded`, its bytes instead of pixels."""

    item: WorkItem
    data: bytes
    header: Any  # gpu_decode.JpegHeader: stored size and EXIF orientation
    size: int
    mtime_ns: int
    fingerprint: str
    content: str
    facts: dict[str, Any] = field(default_factory=dict)  # date taken, camera, type (ingest.facts)

    @property
    def width(self) -> int:
        return int(self.header.displayed[0])

    @property
    def height(self) -> int:
        return int(self.header.displayed[1])


@dataclass(frozen=True, slots=True)
class Failed:
    """A file that could not be decoded, and why in a few words (listed in the run's summary)."""

    path: str
    reason: str


def decode_item(
    item: WorkItem,
    preprocess: Callable[[Image.Image], np.ndarray],
    min_side: int | None,
    turn: Turn = contextlib.nullcontext,
    gpu_route: Callable[[bytes], Any] | None = None,
) -> Decoded | Compressed | Failed:
    """Read the file once; then, within ``turn``, hash those bytes (fingerprint and content
    hash, so the row records exactly what was embedded) and decode them. ``min_side``: decode a
    large image reduced, its shorter side kept at least this long (the model's draft side).
    ``gpu_route``: given the bytes, the header of a JPEG a GPU decoder takes (the file then
    stays :class:`Compressed`), or None. Every failure becomes a :class:`Failed`: one bad file
    never stops a run."""
    path = item.entry.path
    try:
        raw = read_file(path)
        with turn():
            print_, content = raw.digests()
            header = gpu_route(raw.data) if gpu_route is not None and raw.data is not None else None
            if header is not None and raw.data is not None:
                facts = facts_of(header.exif, *header.displayed, raw.mtime_ns)
                return Compressed(item, raw.data, header, raw.size, raw.mtime_ns, print_, content, facts)
            loaded = load_image(path, min_side=min_side, data=raw.data)
            pixels = preprocess(loaded.image)
    except ImageLoadError as exc:
        return Failed(path, exc.reason)
    except NotRegularFileError as exc:  # swapped for a pipe or folder after the scan
        return Failed(path, str(exc))
    except OSError as exc:  # the file vanished or became unreadable after the scan
        return Failed(path, describe_failure(exc, path))
    except Exception as exc:
        return Failed(path, f"cannot process: {exc}")
    header = loaded.header or Header(None, None, "", "")
    facts = facts_of(header, loaded.width, loaded.height, raw.mtime_ns)
    return Decoded(item, pixels, loaded.width, loaded.height, raw.size, raw.mtime_ns, print_, content, facts)


def embed_batch(encoder: Encoder, batch: Sequence[Decoded], turn: Turn = contextlib.nullcontext) -> list[Row]:
    """One model call for the whole batch (``turn`` brackets the inference), one row per file."""
    pixels = np.stack([decoded.pixels for decoded in batch])
    with turn():
        vectors = encoder.encode_images(pixels)
    return rows_of(batch, vectors)


def rows_of(batch: Sequence[Decoded | Compressed], vectors: Sequence[np.ndarray]) -> list[Row]:
    """One row per file of ``batch``, with its vector."""
    return [
        Row(d.item.key, vector, d.size, d.mtime_ns, d.width, d.height, d.fingerprint, d.content, d.facts)
        for d, vector in zip(batch, vectors, strict=True)
    ]


def write_rows(store: Store, rows: Sequence[Row]) -> int:
    """Upsert ``rows`` (replacing any row of the same path); returns how many were written."""
    if rows:
        store.write(rows)
    return len(rows)
