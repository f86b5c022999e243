"""Rows written before pixfind recorded what a photo is (date taken, camera, type, orientation)
get those fields on the next index run, without re-embedding.

The plan finds such a row when its file is unchanged (same size and mtime) but its record lacks
``taken``. Here each file's header is read (EXIF and format: :func:`~pixfind.ingest.facts.read_facts`,
no pixel decoded) and the row is upserted with its stored vector, bit for bit, and its richer
record. An upsert replaces the row whole, so a run stopped half way leaves each row either as it
was or complete: the next run adds the fields to the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from ..store import CONTENT, Row, Store
from .facts import read_facts
from .plan import WorkItem


def backfilled_rows(store: Store, items: Sequence[WorkItem], workers: int) -> list[Row]:
    """The rows of ``items`` (unchanged files) rewritten with their facts, from their stored
    vectors; a file whose header cannot be read now keeps its row as it is (the next run tries
    again, or the prune removes it when the file is gone)."""
    stored = store.records_of([item.key for item in items])

    def rewritten(item: WorkItem) -> Row | None:
        row = stored.get(item.key)
        if row is None:
            return None  # removed meanwhile: nothing to add to
        try:
            facts = read_facts(item.entry.path, int(row["width"]), int(row["height"]), int(row["mtime_ns"]))
        except Exception:  # unreadable now, or no longer an image: not this run's business
            return None
        return Row(
            item.key,
            row["vector"],
            int(row["size"]),
            int(row["mtime_ns"]),
            int(row["width"]),
            int(row["height"]),
            str(row["fingerprint"]),
            row.get(CONTENT),
            facts,
        )

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="pixfind-backfill") as pool:
        return [row for row in pool.map(rewritten, items) if row is not None]
