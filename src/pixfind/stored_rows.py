"""Stored rows read back in batches: the path, the vector and the file's whole record.

``pixfind duplicates`` and ``pixfind export`` walk a whole collection, which may hold millions
of rows, so nothing here holds more than one batch. It is written over :class:`Store`'s public
methods only (the store is being reorganised): :meth:`Store.iter_keys` pages through the keys,
:meth:`Store.lookup` gives each key's fingerprint, and :meth:`Store.find_by_fingerprint` returns
the rows with those fingerprints, vector and whole record included (width, height and content
hash are in no other public answer). A fingerprint shared by copies outside the batch brings
their rows too; they are dropped here and read again in their own batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .pathkeys import path_of
from .store import Store

#: Rows read per batch: one page of keys, then a few Milvus queries of at most 500 keys each.
READ_BATCH = 2000
#: The record's filter fields a dataset gets (``camera_terms`` only serves ``--camera``).
EXPORTED_FACTS = ("taken", "taken_from", "camera", "type", "orientation")


@dataclass(frozen=True)
class StoredRecord:
    """One stored row as a dataset sees it: the file's path (not its escaped key), its vector
    and the record written at index time (``content`` is None in rows written before content
    hashes were recorded, and in schema-1 collections)."""

    path: str
    key: str
    vector: Sequence[float]
    size: int
    mtime_ns: int
    width: int
    height: int
    fingerprint: str
    content: str | None
    facts: dict[str, object] | None = None  # taken, taken_from, camera, type, orientation (when recorded)


def records_of(store: Store, keys: Sequence[str]) -> dict[str, StoredRecord]:
    """The stored rows of those of ``keys`` that are in the index, by key."""
    wanted = set(keys)
    fingerprints = sorted({stored.fingerprint for stored in store.lookup(list(wanted)).values()})
    found: dict[str, StoredRecord] = {}
    for rows in store.find_by_fingerprint(fingerprints).values():
        for row in rows:
            if row["path"] in wanted:
                found[row["path"]] = _record(row)
    return found


def iter_records(store: Store, folder: str | None = None, batch: int = READ_BATCH) -> Iterator[list[StoredRecord]]:
    """Every stored row (under ``folder``, an absolute path), ``batch`` at a time, in key order."""
    for keys in store.iter_keys(folder, batch=batch):
        found = records_of(store, keys)
        yield [found[key] for key in keys if key in found]  # a row deleted meanwhile is left out


def count_rows(store: Store, folder: str | None = None) -> int:
    """How many rows there are (under ``folder``): the total a progress bar counts towards."""
    if folder is None:
        return store.count()
    return sum(len(keys) for keys in store.iter_keys(folder))


def _record(row: dict[str, object]) -> StoredRecord:
    key = str(row["path"])
    content = row.get("content")
    return StoredRecord(
        path=path_of(key),
        key=key,
        vector=row["vector"],  # type: ignore[arg-type]
        size=int(row["size"]),  # type: ignore[call-overload]
        mtime_ns=int(row["mtime_ns"]),  # type: ignore[call-overload]
        width=int(row["width"]),  # type: ignore[call-overload]
        height=int(row["height"]),  # type: ignore[call-overload]
        fingerprint=str(row["fingerprint"]),
        content=str(content) if content else None,
        facts={name: row[name] for name in EXPORTED_FACTS if name in row} or None,
    )
