"""Where folders become rows: scan → plan → decode (look-ahead pool) → encode (batches) → write.

A run is incremental and crash-safe by construction:

* *plan*: scanned files are looked up in the store in chunks; a file whose size and mtime match
  its row is unchanged and costs nothing more. A new file whose whole content is stored under
  another path (renamed, moved or copied: a cheap fingerprint finds candidates, a hash of the
  whole file confirms) takes that row's vector instead of being embedded;
* *embed*: new and changed files are read once, hashed and decoded from those bytes by a small
  thread pool running ahead of the model (a bounded queue of futures, so memory stays flat),
  encoded in batches and upserted. Rows are keyed by path, so a batch written twice (after a
  crash) replaces itself: exactly once;
* *prune*: stored rows under the indexed folders whose file is *known* to be gone are deleted
  last. A file that cannot be checked (a folder that cannot be read, an empty folder that may be
  an unmounted drive) keeps its row, and the report says where (``unreadable``, ``empty``).

A stop request (Ctrl-C) finishes the batch in hand, writes it and returns a report marked
``interrupted``; the next run picks up where this one stopped.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .config import cpu_cores
from .errors import PixfindError
from .images import ImageLoadError, describe_failure, load_image
from .models.base import Encoder
from .pathkeys import MAX_KEY_BYTES, key_fits, key_of, path_of
from .scanner import (
    FileEntry,
    NotRegularFileError,
    Presence,
    PresenceCheck,
    ScanProblem,
    content_hash,
    fingerprint,
    read_file,
    scan,
)
from .store import CONTENT, Row, Store

PLAN_CHUNK = 500
WRITE_EVERY = 256  # rows buffered before an upsert


class Progress(Protocol):
    def scanning(self, found: int) -> None: ...

    def status(self, text: str) -> None:
        """What the run is doing while no count moves: loading, downloading or preparing the
        model (a first run exports it for the CPU: seconds with nothing else to show)."""

    def start_embedding(self, total: int) -> None: ...

    def embedded(self, count: int) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    def scanning(self, found: int) -> None:
        pass

    def status(self, text: str) -> None:
        pass

    def start_embedding(self, total: int) -> None:
        pass

    def embedded(self, count: int) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class IndexReport:
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    moved: int = 0  # new paths that took the vector of an identical file now gone (its row went)
    copied: int = 0  # new paths that took the vector of an identical file still stored
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    unreadable: dict[str, str] = field(default_factory=dict)  # folder -> reason; rows under it kept
    kept: dict[str, int] = field(default_factory=dict)  # unreadable folder -> rows kept under it
    empty: dict[str, int] = field(default_factory=dict)  # empty folder -> rows kept under it
    roots: int = 0  # folders and files named
    roots_read: int = 0  # of those, the ones that could be read (a folder listed, an image file)
    embedded: int = 0
    elapsed_s: float = 0.0
    embed_s: float = 0.0
    interrupted: bool = False
    precision: str | None = None  # what the image model computed in (f32, bf16, ...), when it ran
    precision_reason: str = ""

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.embed_s if self.embed_s > 0 else 0.0

    @property
    def nothing_read(self) -> bool:
        """No folder or file named could be read at all (unreadable, or not an image file)."""
        return self.roots > 0 and self.roots_read == 0

    def to_dict(self) -> dict[str, object]:
        return {
            "new": self.new,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "moved": self.moved,
            "copied": self.copied,
            "removed": self.removed,
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "unreadable": [{"path": p, "reason": r, "kept": self.kept.get(p, 0)} for p, r in self.unreadable.items()],
            "empty_folders": [{"path": p, "kept": n} for p, n in self.empty.items()],
            "nothing_read": self.nothing_read,
            "elapsed_s": round(self.elapsed_s, 3),
            "images_per_s": round(self.images_per_s, 2),
            "interrupted": self.interrupted,
            "precision": self.precision,
            "precision_reason": self.precision_reason,
        }


@dataclass(slots=True)
class _Todo:
    entry: FileEntry
    key: str
    is_update: bool


@dataclass(slots=True)
class _Prepared:
    todo: _Todo
    pixels: np.ndarray
    width: int
    height: int
    size: int  # of the bytes decoded (fstat when opened), not the scan's
    mtime_ns: int
    fingerprint: str
    content: str


def default_workers(encoder: Encoder) -> int:
    """Decode threads. A model on the GPU leaves the CPU to decoding, and one that fills the CPU
    leaves it between batches (decoded quickly on every core): one per core (on a 16-core GPU
    machine 24 or 32 threads were slower: benchmarks/gpu.py). A CPU model on fewer threads: one
    per two cores, beside it (draft decoding costs ~1/6 of a CPU inference)."""
    return cpu_cores() if _on_gpu(encoder) or encoder.fills_cpu else max(1, cpu_cores() // 2)


def default_batch(encoder: Encoder) -> int:
    """Images per model call: 256 on a GPU (fp16 ViT-B-32 reaches its rate there), 16 on the
    CPU (larger batches are no faster there, and look further ahead in memory)."""
    return 256 if _on_gpu(encoder) else 16


def _on_gpu(encoder: Encoder) -> bool:
    return encoder.device.startswith("cuda")


class CpuTurns:
    """Decode threads and a model that fills every core take turns on the CPU.

    A decode running beside such a model delays one of its threads, and all the others then
    wait for that one at the next synchronisation point: the decode costs about twice its own
    CPU time. Measured on 2 cores (ONNX Runtime, 2 threads, 200 photos): overlapped, ``pixfind
    index`` ran at 0.81 of model-only; in turns (decoding between batches on both cores) at
    0.85. OpenVINO's two independent streams suffer less from it (overlapped 27.95 images/s, in
    turns 27.99: equal), so turns stay. Beside a GPU, or a model on fewer threads than cores,
    turns are off (``enabled``).
    """

    def __init__(self) -> None:
        self.enabled = False
        self._changed = threading.Condition()
        self._decoding = 0
        self._model_turn = False

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        """One decode: waits while the model runs; the model waits for it to end."""
        if not self.enabled:
            yield
            return
        with self._changed:
            self._changed.wait_for(lambda: not self._model_turn)
            self._decoding += 1
        try:
            yield
        finally:
            with self._changed:
                self._decoding -= 1
                self._changed.notify_all()

    @contextlib.contextmanager
    def model(self) -> Iterator[None]:
        """One batch of inference: decodes in progress finish first, no new one starts."""
        if not self.enabled:
            yield
            return
        with self._changed:
            self._model_turn = True
            self._changed.wait_for(lambda: self._decoding == 0)
        try:
            yield
        finally:
            with self._changed:
                self._model_turn = False
                self._changed.notify_all()


class Indexer:
    def __init__(
        self,
        store: Store,
        get_encoder: Callable[[], Encoder],
        *,
        batch_size: int | None = None,
        workers: int | None = None,
        draft: bool = True,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.store = store
        self._get_encoder = get_encoder
        self.batch_size = max(1, batch_size) if batch_size else None  # None: default_batch()
        self.workers = workers  # None: default_workers()
        self._turns = CpuTurns()
        self.draft = draft
        self.progress = progress or NoProgress()
        self.stop = stop or threading.Event()

    # -- public -----------------------------------------------------------------------------

    def run(self, roots: Iterable[str]) -> IndexReport:
        started = time.perf_counter()
        report = IndexReport()
        folders = list(dict.fromkeys(resolve_root(root) for root in roots))
        report.roots = len(folders)
        todo, planned_on_rows = self._plan(folders, report)
        if todo and not self.stop.is_set():
            self._embed(todo, report, planned_on_rows)
        if not self.stop.is_set():
            self._prune(folders, report)
        report.interrupted = self.stop.is_set()
        self.store.flush()
        self.progress.finish()
        report.elapsed_s = time.perf_counter() - started
        return report

    # -- plan -------------------------------------------------------------------------------

    def _plan(self, folders: Sequence[str], report: IndexReport) -> tuple[list[_Todo], bool]:
        """The files to embed, and whether the store had rows to compare them with."""
        todo: list[_Todo] = []
        found = 0
        self.progress.scanning(0)  # shows that a scan is under way before the first image is found
        collection_has_rows = self.store.exists() and self.store.count() > 0
        for chunk in _chunks(_scan_all(folders, report, self.stop), PLAN_CHUNK):
            if self.stop.is_set():
                break
            found += len(chunk)
            self.progress.scanning(found)
            stored = self.store.lookup([key for _, key in chunk]) if collection_has_rows else {}
            fresh: list[_Todo] = []
            for entry, key in chunk:
                row = stored.get(key)
                if row is None:
                    fresh.append(_Todo(entry, key, is_update=False))
                elif row.size == entry.size and row.mtime_ns == entry.mtime_ns:
                    report.unchanged += 1
                else:
                    todo.append(_Todo(entry, key, is_update=True))
            if collection_has_rows and fresh:
                fresh = self._reuse_stored(fresh, report)
            todo.extend(fresh)
        return todo, collection_has_rows

    def _reuse_stored(self, fresh: list[_Todo], report: IndexReport) -> list[_Todo]:
        """New files whose whole content is already stored take that row's vector: a *move*
        when the stored file is known to be gone (its row goes), else a *copy* (both stay).

        The fingerprint (size, first and last 64 KiB) only finds candidates: two images can
        share it. A candidate is taken only when the new file's content hash equals the one
        recorded when the stored row was embedded; rows without one (older indexes, schema 1)
        never lend their vector. Returns the files still to embed.
        """
        candidates = self._candidates(fresh)
        if not candidates:
            return fresh
        hashes = self._content_hashes([item for item in fresh if item.key in candidates])
        check = PresenceCheck()
        rows: list[Row] = []
        gone: list[str] = []
        remaining: list[_Todo] = []
        for item in fresh:
            content = hashes.get(item.key)
            same = [c for c in candidates.get(item.key, []) if content and c[CONTENT] == content]
            if not same:
                remaining.append(item)
                continue
            source = next((c for c in same if c["path"] not in gone and _known_gone(check, c["path"])), None)
            match = source or same[0]
            entry = item.entry
            rows.append(
                Row(
                    item.key,
                    match["vector"],
                    entry.size,
                    entry.mtime_ns,
                    match["width"],
                    match["height"],
                    match["fingerprint"],
                    content,
                )
            )
            if source is not None:
                gone.append(source["path"])
                report.moved += 1
            else:
                report.copied += 1
        if rows:
            self.store.write(rows)
            self.store.delete(gone)  # the old name of a moved file: not a removal
        return remaining

    def _candidates(self, fresh: list[_Todo]) -> dict[str, list[dict[str, object]]]:
        """Stored rows that may hold the same content as each new file (by key): same
        fingerprint and size, and a recorded content hash."""
        prints: dict[str, str] = {}
        for item in fresh:
            with contextlib.suppress(OSError):  # the decode step will report the problem
                prints[item.key] = fingerprint(item.entry.path, item.entry.size)
        if not prints:
            return {}
        stored = self.store.find_by_fingerprint(sorted(set(prints.values())))
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

    def _content_hashes(self, items: list[_Todo]) -> dict[str, str]:
        """The content hash of each file (by key), read in parallel; unreadable files left out."""

        def hashed(item: _Todo) -> tuple[str, str | None]:
            try:
                return item.key, content_hash(path=item.entry.path)
            except OSError:
                return item.key, None  # the decode step will report the problem

        with ThreadPoolExecutor(self.workers or cpu_cores(), thread_name_prefix="pixfind-hash") as pool:
            return {key: digest for key, digest in pool.map(hashed, items) if digest}

    # -- embed ------------------------------------------------------------------------------

    def _embed(self, todo: list[_Todo], report: IndexReport, planned_on_rows: bool) -> None:
        encoder = self._get_encoder()
        batch_size = self.batch_size or default_batch(encoder)
        self.store.ensure(encoder.spec, encoder.dim)  # a new Lite file is made here, not before
        if not planned_on_rows and self.store.count() > 0:
            todo = self._not_stored_meanwhile(todo, report)  # another run made the index first
        self.progress.start_embedding(len(todo))
        started = time.perf_counter()
        pending: list[Row] = []
        batch: list[_Prepared] = []
        prepared_files = self._prepare_all(todo, encoder, report, batch_size)
        for prepared in prepared_files:
            batch.append(prepared)
            if len(batch) >= batch_size:
                pending.extend(self._encode(batch, encoder, report))
                batch = []
                if len(pending) >= WRITE_EVERY:
                    self.store.write(pending)
                    pending = []
                if self.stop.is_set():
                    break  # stop after the batch in hand: files decoded ahead are dropped
        prepared_files.close()  # cancels the look-ahead still queued
        if batch:
            pending.extend(self._encode(batch, encoder, report))
        if pending:
            self.store.write(pending)
        report.embed_s = time.perf_counter() - started

    def _not_stored_meanwhile(self, todo: list[_Todo], report: IndexReport) -> list[_Todo]:
        """Drop from ``todo`` the files that another run stored, unchanged, while this one was
        planning on an index that did not exist yet (it waited for that run's lock)."""
        left: list[_Todo] = []
        for start in range(0, len(todo), PLAN_CHUNK):
            chunk = todo[start : start + PLAN_CHUNK]
            stored = self.store.lookup([item.key for item in chunk])
            for item in chunk:
                row = stored.get(item.key)
                if row is not None and (row.size, row.mtime_ns) == (item.entry.size, item.entry.mtime_ns):
                    report.unchanged += 1
                else:
                    left.append(item)
        return left

    def _encode(self, batch: list[_Prepared], encoder: Encoder, report: IndexReport) -> list[Row]:
        pixels = np.stack([p.pixels for p in batch])
        with self._turns.model():
            vectors = encoder.encode_images(pixels)
        rows = []
        for prepared, vector in zip(batch, vectors, strict=True):
            rows.append(
                Row(
                    prepared.todo.key,
                    vector,
                    prepared.size,
                    prepared.mtime_ns,
                    prepared.width,
                    prepared.height,
                    prepared.fingerprint,
                    prepared.content,
                )
            )
            if prepared.todo.is_update:
                report.updated += 1
            else:
                report.new += 1
        report.embedded += len(batch)
        self.progress.embedded(len(batch))
        return rows

    def _prepare_all(
        self, todo: list[_Todo], encoder: Encoder, report: IndexReport, batch_size: int
    ) -> Iterator[_Prepared]:
        """Decode in a thread pool, at most ``lookahead`` files ahead of the model, in order."""
        min_side = encoder.draft_side if self.draft else None
        self._turns.enabled = encoder.fills_cpu
        workers = self.workers or default_workers(encoder)
        lookahead = max(2 * batch_size, 4 * workers)
        queue: deque[Future[_Prepared | tuple[str, str]]] = deque()
        items = iter(todo)
        with ThreadPoolExecutor(workers, thread_name_prefix="pixfind-decode") as pool:
            try:
                while True:
                    while len(queue) < lookahead and not self.stop.is_set():
                        item = next(items, None)
                        if item is None:
                            break
                        queue.append(pool.submit(_prepare, item, encoder, min_side, self._turns))
                    if not queue:
                        return
                    result = queue.popleft().result()
                    if isinstance(result, tuple):
                        report.failed.append(result)
                        self.progress.embedded(1)
                    else:
                        yield result
            finally:
                for future in queue:
                    future.cancel()

    # -- prune ------------------------------------------------------------------------------

    def _prune(self, folders: Sequence[str], report: IndexReport) -> None:
        """Delete the rows under ``folders`` whose files are known to be gone; keep (and
        report) those that cannot be checked."""
        if not self.store.exists():
            return
        for folder in folders:
            if os.path.isfile(folder):
                continue  # a single file named on the command line: nothing else to prune
            check = PresenceCheck(top=folder)
            gone: list[str] = []
            for page in self.store.iter_keys(folder):
                for key in page:
                    verdict = check(path_of(key))
                    if verdict.presence is Presence.GONE:
                        gone.append(key)
                    elif verdict.presence is Presence.UNREADABLE:
                        report.unreadable.setdefault(verdict.folder, verdict.reason)
                        report.kept[verdict.folder] = report.kept.get(verdict.folder, 0) + 1
                    elif verdict.presence is Presence.EMPTY_FOLDER:
                        report.empty[verdict.folder] = report.empty.get(verdict.folder, 0) + 1
            if gone:
                report.removed += self.store.delete(gone)


def _known_gone(check: PresenceCheck, key: str) -> bool:
    return check(path_of(key)).presence is Presence.GONE


def _prepare(item: _Todo, encoder: Encoder, min_side: int | None, turns: CpuTurns) -> _Prepared | tuple[str, str]:
    """Runs in a decode thread: read the file once; then, in the decoders' turn, hash those bytes
    (fingerprint and content hash) and decode them. Failures become (path, reason)."""
    path = item.entry.path
    try:
        raw = read_file(path)
        with turns.decoding():
            print_, content = raw.digests()
            loaded = load_image(path, min_side=min_side, data=raw.data)
            pixels = encoder.preprocess(loaded.image)
    except ImageLoadError as exc:
        return (path, exc.reason)
    except NotRegularFileError as exc:  # swapped for a pipe or folder after the scan
        return (path, str(exc))
    except OSError as exc:  # the file vanished or became unreadable after the scan
        return (path, describe_failure(exc, path))
    except Exception as exc:
        return (path, f"cannot process: {exc}")
    return _Prepared(item, pixels, loaded.width, loaded.height, raw.size, raw.mtime_ns, print_, content)


def _scan_all(folders: Sequence[str], report: IndexReport, stop: threading.Event) -> Iterator[tuple[FileEntry, str]]:
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
