"""What an index run has to do, decided from the scan and the store before any pixel is decoded.

* a scanned file whose size and mtime match its row is *unchanged* and costs nothing more,
  unless its row predates the date/camera fields: then it is *backfilled* (:mod:`.backfill`:
  its header read, its stored vector written again with the richer record, no decode, no embed);
* a *new* file whose whole content is stored under another path (renamed, moved or copied: a
  cheap fingerprint finds candidates, a hash of the whole file confirms) takes that row's vector
  instead of being embedded;
* every other new or *changed* file becomes a :class:`WorkItem` for the pipeline;
* stored rows under an indexed folder whose file is *known* to be gone are listed for deletion;
  a file that cannot be checked (a folder that cannot be read, an empty folder that may be an
  unmounted drive) keeps its row, and the report says where.

Planning only reads (the file system and the store). Writing what it decided is the runner's
job, chunk by chunk, so that a moved file's old row is gone before the next chunk looks for
candidates.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import PixfindError
from ..pathkeys import MAX_KEY_BYTES, key_fits, key_of, path_of
from ..store import CONTENT, Row, Store
from .content import content_hash, fingerprint
from .facts import read_facts
from .report import IndexReport
from .scan import FileEntry, Presence, PresenceCheck, ScanProblem, scan

PLAN_CHUNK = 500


@dataclass(slots=True)
class WorkItem:
    """A file to embed: new, or changed since its row was written (``is_update``)."""

    entry: FileEntry
    key: str
    is_update: bool


@dataclass(slots=True)
class ChunkPlan:
    """The decisions on one chunk of scanned files."""

    embed: list[WorkItem] = field(default_factory=list)
    reused: list[Row] = field(default_factory=list)  # new paths that take a stored vector
    moved_from: list[str] = field(default_factory=list)  # keys to delete once ``reused`` is written
    backfill: list[WorkItem] = field(default_factory=list)  # unchanged files whose rows lack the facts


def resolve_root(root: str) -> str:
    """Absolute, symlink-free form of a folder or file given by the user; must exist. One that
    cannot be read is returned all the same: the scan reports it, and its rows are kept."""
    path = os.path.realpath(os.path.expanduser(root))
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise PixfindError(f"folder not found: {root}: check the path") from None
    except OSError:
        pass
    return path


def has_rows(store: Store) -> bool:
    """Whether there is anything to compare scanned files with (a first run skips the lookups)."""
    return store.exists() and store.count() > 0


def plan(
    store: Store,
    folders: Sequence[str],
    report: IndexReport,
    *,
    compare: bool,
    stop: threading.Event,
    hash_workers: int,
    found: Callable[[int], None],
) -> Iterator[ChunkPlan]:
    """Scan ``folders`` and decide, a chunk at a time, what each file needs. ``compare``: look
    scanned files up in the store (see :func:`has_rows`); ``found`` is told the running count.
    Counts (unchanged, moved, copied, scan problems) go into ``report``."""
    total = 0
    for chunk in _chunks(scan_roots(folders, report, stop), PLAN_CHUNK):
        if stop.is_set():
            break
        total += len(chunk)
        found(total)
        yield plan_chunk(store, chunk, report, compare=compare, hash_workers=hash_workers)


def plan_chunk(
    store: Store, chunk: list[tuple[FileEntry, str]], report: IndexReport, *, compare: bool, hash_workers: int
) -> ChunkPlan:
    """Unchanged, changed or new, for scanned files and their keys; new ones may reuse a vector."""
    stored = store.lookup([key for _, key in chunk]) if compare else {}
    result = ChunkPlan()
    fresh: list[WorkItem] = []
    for entry, key in chunk:
        row = stored.get(key)
        if row is None:
            fresh.append(WorkItem(entry, key, is_update=False))
        elif row.size == entry.size and row.mtime_ns == entry.mtime_ns:
            report.unchanged += 1
            if not row.has_facts:
                result.backfill.append(WorkItem(entry, key, is_update=False))
        else:
            result.embed.append(WorkItem(entry, key, is_update=True))
    if compare and fresh:
        fresh = _reuse_stored(store, fresh, report, result, hash_workers)
    result.embed.extend(fresh)
    return result


def _reuse_stored(
    store: Store, fresh: list[WorkItem], report: IndexReport, result: ChunkPlan, hash_workers: int
) -> list[WorkItem]:
    """New files whose whole content is already stored take that row's vector: a *move* when
    the stored file is known to be gone (its row goes), else a *copy* (both stay).

    The fingerprint (size, first and last 64 KiB) only finds candidates: two images can share
    it. A candidate is taken only when the new file's content hash equals the one recorded when
    the stored row was embedded; rows without one (older indexes, schema 1) never lend their
    vector. Returns the files still to embed; adds the reused rows to ``result``.
    """
    candidates = _candidates(store, fresh)
    if not candidates:
        return fresh
    hashes = _content_hashes([item for item in fresh if item.key in candidates], hash_workers)
    check = PresenceCheck()
    remaining: list[WorkItem] = []
    for item in fresh:
        content = hashes.get(item.key)
        same = [c for c in candidates.get(item.key, []) if content and c[CONTENT] == content]
        if not same:
            remaining.append(item)
            continue
        source = next((c for c in same if c["path"] not in result.moved_from and _known_gone(check, c["path"])), None)
        match = source or same[0]
        entry = item.entry
        result.reused.append(
            Row(
                item.key,
                match["vector"],
                entry.size,
                entry.mtime_ns,
                match["width"],
                match["height"],
                match["fingerprint"],
                content,
                _facts(entry, match),
            )
        )
        if source is not None:
            result.moved_from.append(source["path"])  # the old name of a moved file: not a removal
            report.moved += 1
        else:
            report.copied += 1
    return remaining


def _facts(entry: FileEntry, match: dict[str, object]) -> dict[str, object] | None:
    """The facts of a moved or copied file: its own (its header, its mtime: a copy's date
    may differ from the original's), or none when its header cannot be read now."""
    try:
        return read_facts(entry.path, int(match["width"]), int(match["height"]), entry.mtime_ns)  # type: ignore[call-overload]
    except Exception:
        return None


def _candidates(store: Store, fresh: list[WorkItem]) -> dict[str, list[dict[str, object]]]:
    """Stored rows that may hold the same content as each new file (by key): same fingerprint
    and size, and a recorded content hash."""
    prints: dict[str, str] = {}
    for item in fresh:
        with contextlib.suppress(OSError):  # the decode step will report the problem
            prints[item.key] = fingerprint(item.entry.path, item.entry.size)
    if not prints:
        return {}
    stored = store.find_by_fingerprint(sorted(set(prints.values())))
    found: dict[str, list[dict[str, object]]] = {}
    for item in fresh:
        rows = [
            row
            for row in stored.get(prints.get(item.key, ""), [])
            if row["size"] == item.entry.size and row.get(CONTENT)
        ]
        if rows:
            found[item.key] = rows
    return found


def _content_hashes(items: list[WorkItem], workers: int) -> dict[str, str]:
    """The content hash of each file (by key), read in parallel; unreadable files left out."""

    def hashed(item: WorkItem) -> tuple[str, str | None]:
        try:
            return item.key, content_hash(path=item.entry.path)
        except OSError:
            return item.key, None  # the decode step will report the problem

    with ThreadPoolExecutor(workers, thread_name_prefix="pixfind-hash") as pool:
        return {key: digest for key, digest in pool.map(hashed, items) if digest}


def not_stored_meanwhile(store: Store, todo: list[WorkItem], report: IndexReport) -> list[WorkItem]:
    """Drop from ``todo`` the files that another run stored, unchanged, while this one was
    planning on an index that did not exist yet (it waited for that run's lock)."""
    left: list[WorkItem] = []
    for start in range(0, len(todo), PLAN_CHUNK):
        chunk = todo[start : start + PLAN_CHUNK]
        stored = store.lookup([item.key for item in chunk])
        for item in chunk:
            row = stored.get(item.key)
            if row is not None and (row.size, row.mtime_ns) == (item.entry.size, item.entry.mtime_ns):
                report.unchanged += 1
            else:
                left.append(item)
    return left


def known_gone(store: Store, folder: str, report: IndexReport) -> list[str]:
    """The keys of the rows under ``folder`` whose files are known to be gone; rows that cannot
    be checked are counted in ``report`` (``unreadable``/``kept``, ``empty``) and left out."""
    if os.path.isfile(folder):
        return []  # a single file named on the command line: nothing else to prune
    check = PresenceCheck(top=folder)
    gone: list[str] = []
    for page in store.iter_keys(folder):
        for key in page:
            verdict = check(path_of(key))
            if verdict.presence is Presence.GONE:
                gone.append(key)
            elif verdict.presence is Presence.UNREADABLE:
                report.unreadable.setdefault(verdict.folder, verdict.reason)
                report.kept[verdict.folder] = report.kept.get(verdict.folder, 0) + 1
            elif verdict.presence is Presence.EMPTY_FOLDER:
                report.empty[verdict.folder] = report.empty.get(verdict.folder, 0) + 1
    return gone


def _known_gone(check: PresenceCheck, key: str) -> bool:
    return check(path_of(key)).presence is Presence.GONE


def scan_roots(folders: Sequence[str], report: IndexReport, stop: threading.Event) -> Iterator[tuple[FileEntry, str]]:
    """Scanned image files with their keys; scan problems and paths too long to store go into
    ``report``."""
    for folder in folders:
        root_read = True
        for found in scan(folder):
            if stop.is_set():
                return  # Ctrl-C while scanning a large tree: stop now, not at the next chunk
            if isinstance(found, ScanProblem):
                root_read = root_read and found.path != folder
                if found.folder:
                    report.unreadable.setdefault(found.path, found.reason)
                else:
                    report.failed.append((found.path, found.reason))
                continue
            key = key_of(found.path)
            if not key_fits(key):
                report.failed.append((found.path, f"path too long to store (over {MAX_KEY_BYTES:,} bytes as a key)"))
                continue
            yield found, key
        report.roots_read += root_read


def _chunks(items: Iterable[tuple[FileEntry, str]], size: int) -> Iterator[list[tuple[FileEntry, str]]]:
    chunk: list[tuple[FileEntry, str]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
