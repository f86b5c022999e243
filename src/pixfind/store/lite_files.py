"""Checks on a Milvus Lite file's location, made before anything is created there, so that a
location that cannot work is refused in one line and a file that is not an index is never
touched."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import StoreError

#: File names Milvus Lite 2.5 accepts for its database (it refuses others with a traceback).
LITE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")
LITE_NAME_MAX = 36
#: Free space below which a failed write on Milvus Lite is reported as "disk full".
NEARLY_FULL_BYTES = 4 << 20


def check_lite_path(db: Path) -> None:
    """Refuse, without creating anything, a Lite location that cannot work (``db`` with its
    links resolved: Milvus Lite opens that file)."""
    if not set(db.name) <= LITE_NAME_CHARS or len(db.name) > LITE_NAME_MAX:
        raise StoreError(
            f"Milvus Lite cannot use the file name {db.name!r}: use at most {LITE_NAME_MAX} letters, "
            "digits, '.', '-' or '_' (e.g. --uri pixfind.db)"
        )
    existing = db.parent
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise StoreError(f"cannot create folder {db.parent}: {existing} is a file; pass --uri with a writable path")
    if not os.access(existing, os.W_OK):
        what = "index folder" if existing == db.parent else f"cannot create folder {db.parent}:"
        raise StoreError(f"{what} {existing} is not writable: pass --uri with a writable path")
    if db.exists() and db.is_dir():
        raise StoreError(f"{db} is a folder, not an index file: pass --uri FILE.db")
    if db.exists() and db.stat().st_size > 0 and not looks_like_lite(db):
        raise StoreError(
            f"{db} is not a Milvus Lite index (foreign or corrupt file): move it away or pass --uri with another path"
        )


def make_lite_folder(db: Path) -> None:
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create folder {db.parent}: {exc.strerror}; pass --uri with a writable path") from exc
    if not os.access(db.parent, os.W_OK):
        raise StoreError(f"index folder {db.parent} is not writable: pass --uri with a writable path")


def looks_like_lite(db: Path) -> bool:
    """Milvus Lite 2.5 files are SQLite databases with its ``collection_meta`` table. Another
    program's SQLite database is not one: Milvus Lite would add its tables to it."""
    try:
        with db.open("rb") as fh:
            if fh.read(16) != b"SQLite format 3\x00":
                return False
    except OSError:
        return False
    import sqlite3  # here: `import pixfind` stays light
    from urllib.parse import quote

    def tables(mode: str) -> set[str]:
        with contextlib.closing(sqlite3.connect(f"file:{quote(str(db))}?mode={mode}", uri=True, timeout=5)) as con:
            return {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    try:
        try:
            found = tables("ro")
        except sqlite3.OperationalError:
            # A hot journal, left by a crash in the middle of a write: a read-only connection
            # cannot roll it back ("attempt to write a readonly database"); a read-write one does
            # SQLite's standard recovery, as the engine itself would on opening the file.
            found = tables("rw")
    except sqlite3.Error:
        return False
    return "collection_meta" in found


def nearly_full(folder: Path) -> bool:
    try:
        info = os.statvfs(folder)
    except OSError:
        return False
    return info.f_bavail * info.f_frsize < NEARLY_FULL_BYTES
