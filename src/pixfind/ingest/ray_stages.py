"""The index's stages as Ray Data runs them on the cluster's nodes, for
:mod:`pixfind.ingest.ray_runner` (the driver). Kept apart so that what is shipped to the workers
reads as one piece: decode tasks, the embedder actor, the sink that writes into Milvus, and the
counter the driver polls for progress. Each calls the local run's own stages
(:mod:`pixfind.ingest.pipeline`) unchanged.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import ModelSpec, Settings
from ..errors import PixfindError
from ..models.pixels import resize_crop
from ..store import Row, Store
from .pipeline import Decoded, Failed, decode_item, embed_batch, write_rows
from .plan import WorkItem
from .scan import FileEntry

if TYPE_CHECKING:
    from ..models.base import Encoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """What the decode tasks and the collection need to know of the model, without loading it."""

    image_size: int
    dim: int


def decode_rows(batch: dict[str, np.ndarray], image_size: int, min_side: int | None) -> dict[str, np.ndarray]:
    """One decode task: :func:`pipeline.decode_item` on each file of the block. A failure is a
    row with an ``error`` (and zero pixels), never a failed task."""
    crop = partial(resize_crop, size=image_size)
    count = len(batch["key"])
    pixels = np.zeros((count, 3, image_size, image_size), dtype=np.uint8)
    record: dict[str, list[Any]] = {
        name: [] for name in ("width", "height", "size", "mtime_ns", "fingerprint", "content", "facts", "error")
    }
    for i in range(count):
        entry = FileEntry(str(batch["path"][i]), int(batch["size"][i]), int(batch["mtime_ns"][i]))
        item = WorkItem(entry, str(batch["key"][i]), bool(batch["is_update"][i]))
        result = decode_item(item, crop, min_side)
        if isinstance(result, Failed):
            values = (0, 0, 0, 0, "", "", "{}", result.reason or "cannot process")
        else:
            pixels[i] = result.pixels
            facts = json.dumps(result.facts)  # a string column: Arrow needs no schema for the record's entries
            values = (
                result.width,
                result.height,
                result.size,
                result.mtime_ns,
                result.fingerprint,
                result.content,
                facts,
                "",
            )
        for name, value in zip(record, values, strict=True):
            record[name].append(value)
    out = {name: batch[name] for name in ("path", "key", "is_update")}
    out.update(
        {
            name: np.asarray(values, dtype=object if isinstance(values[0], str) else np.int64)
            for name, values in record.items()
        }
    )
    out["pixels"] = pixels
    return out


class Embedder:
    """An actor of the embed stage: the encoder is loaded once, when the actor starts (and again
    on another node if its node is lost)."""

    def __init__(self, spec: ModelSpec, settings: Settings, shape: ModelShape) -> None:
        from ..models.load import load_encoder

        self.encoder: Encoder = load_encoder(spec, settings)
        if (self.encoder.image_size, self.encoder.dim) != (shape.image_size, shape.dim):
            raise PixfindError(
                f"{spec.describe()} loaded as {self.encoder.image_size} px / {self.encoder.dim}-d, "
                f"its configuration says {shape.image_size} px / {shape.dim}-d"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        good = [i for i, error in enumerate(batch["error"]) if not error]
        vectors = np.zeros((len(batch["key"]), self.encoder.dim), dtype=np.float32)
        if good:
            decoded = [
                Decoded(
                    WorkItem(FileEntry(str(batch["path"][i]), 0, 0), str(batch["key"][i]), bool(batch["is_update"][i])),
                    # the crop is S x S: the encoder's preprocess only converts it to its input
                    self.encoder.preprocess(Image.fromarray(batch["pixels"][i].transpose(1, 2, 0))),
                    int(batch["width"][i]),
                    int(batch["height"][i]),
                    int(batch["size"][i]),
                    int(batch["mtime_ns"][i]),
                    str(batch["fingerprint"][i]),
                    str(batch["content"][i]),
                )
                for i in good
            ]
            for i, row in zip(good, embed_batch(self.encoder, decoded), strict=True):
                vectors[i] = row.vector
        out = {name: values for name, values in batch.items() if name != "pixels"}
        out["vector"] = vectors
        return out


@dataclass
class BatchOutcome:
    """What one batch of embedded rows amounts to: the rows to write and the files that failed."""

    rows: list[Row]
    updates: int
    failed: list[tuple[str, str]]


def outcome_of(batch: dict[str, np.ndarray]) -> BatchOutcome:
    rows: list[Row] = []
    updates = 0
    failed: list[tuple[str, str]] = []
    for i, error in enumerate(batch["error"]):
        if error:
            failed.append((str(batch["path"][i]), str(error)))
            continue
        updates += bool(batch["is_update"][i])
        rows.append(
            Row(
                str(batch["key"][i]),
                np.asarray(batch["vector"][i], dtype=np.float32),
                int(batch["size"][i]),
                int(batch["mtime_ns"][i]),
                int(batch["width"][i]),
                int(batch["height"][i]),
                str(batch["fingerprint"][i]),
                str(batch["content"][i]),
                json.loads(str(batch["facts"][i])) if "facts" in batch else None,
            )
        )
    return BatchOutcome(rows, updates, failed)


class ProgressCounter:
    """A small actor the write tasks tell what they did (fire and forget); the driver polls it.
    A retried write task counts twice here, so these are progress figures only: the summary is
    taken from the writes' own returns."""

    def __init__(self) -> None:
        self.done = 0

    def add(self, count: int) -> None:
        self.done += count

    def get(self) -> int:
        return self.done


_STORES: dict[tuple[str, str], Store] = {}  # one connection per worker process and collection


def _worker_store(uri: str, token: str | None, collection: str) -> Store:
    store = _STORES.get((uri, collection))
    if store is None:
        store = _STORES[(uri, collection)] = Store(uri, token, collection, create=False)
    return store


def make_sink(uri: str, token: str | None, collection: str, counter: str) -> Any:
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class MilvusSink(Datasink):  # type: ignore[misc]
        """Upserts each block into the Milvus server from the worker that holds it."""

        def __init__(self) -> None:
            self.written = 0
            self.updates = 0
            self.failed: list[tuple[str, str]] = []
            self.complete = False

        def write(self, blocks: Any, ctx: Any) -> dict[str, Any]:
            import ray

            store = _worker_store(uri, token, collection)
            written = updates = 0
            failed: list[tuple[str, str]] = []
            for block in blocks:
                outcome = outcome_of(BlockAccessor.for_block(block).to_batch_format("numpy"))
                written += write_rows(store, outcome.rows)
                updates += outcome.updates
                failed += outcome.failed
                with contextlib.suppress(Exception):  # progress only: never fail a write for it
                    ray.get_actor(counter).add.remote(len(outcome.rows) + len(outcome.failed))
            return {"written": written, "updates": updates, "failed": failed}

        def on_write_complete(self, write_result: Any) -> None:
            returns = write_result.write_returns
            self.written = sum(r["written"] for r in returns)
            self.updates = sum(r["updates"] for r in returns)
            self.failed = [tuple(f) for r in returns for f in r["failed"]]
            self.complete = True

    return MilvusSink()
