"""Where folders become rows: scan → plan → decode (look-ahead pool) → encode (batches) → write.

A run is incremental and crash-safe by construction:

* *plan*: scanned files are looked up in the store in chunks; a file whose size and mtime match
  its row is unchanged and costs nothing more. A new file whose content fingerprint matches a
  stored row (renamed, moved or copied) takes that row's vector instead of being embedded;
* *embed*: new and changed files are decoded by a small thread pool running ahead of the model
  (a bounded queue of futures, so memory stays flat), encoded in batches and upserted. Rows are
  keyed by path, so a batch written twice (after a crash) replaces itself: exactly once;
* *prune*: stored rows under the indexed folders whose file is gone are deleted last.

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

from .config import ModelSpec, cpu_cores
from .errors import PixfindError
from .images import ImageLoadError, describe_failure, load_image
from .pathkeys import MAX_KEY_BYTES, key_fits, key_of, path_of
from .scanner import FileEntry, ScanProblem, fingerprint, is_indexable, scan
from .store import Row, Store

PLAN_CHUNK = 500
WRITE_EVERY = 256  # rows buffered before an upsert


class Encoder(Protocol):
    """What the indexer needs from a model (see pixfind.encoder.ClipEncoder)."""

    spec: ModelSpec
    dim: int
    draft_side: int

    def preprocess(self, image: object) -> np.ndarray: ...

    def encode_images(self, pixels: np.ndarray) -> np.ndarray: ...


class Progress(Protocol):
    def scanning(self, found: int) -> None: ...

    def start_embedding(self, total: int) -> None: ...

    def embedded(self, count: int) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    def scanning(self, found: int) -> None:
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
    moved: int = 0  # new paths that reused a stored vector (renamed, moved or copied files)
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    embedded: int = 0
    elapsed_s: float = 0.0
    embed_s: float = 0.0
    interrupted: bool = False
    precision: str | None = None  # what the image model computed in (f32, bf16, ...), when it ran
    precision_reason: str = ""

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.embed_s if self.embed_s > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "new": self.new,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "moved": self.moved,
            "removed": self.removed,
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
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
    fingerprint: str | None = None


@dataclass(slots=True)
class _Prepared:
    todo: _Todo
    pixels: np.ndarray
    width: int
    height: int
    fingerprint: str


def default_workers(encoder: Encoder) -> int:
    """Decode threads. A model on the GPU leaves the CPU to decoding, and one that fills the CPU
    leaves it between batches (decoded quickly on every core): one per core (on a 16-core GPU
    machine 24 or 32 threads were slower: benchmarks/gpu.py). A CPU model on fewer threads: one
    per two cores, beside it (draft decoding costs ~1/6 of a CPU inference)."""
    return cpu_cores() if _on_gpu(encoder) or _fills_cpu(encoder) else max(1, cpu_cores() // 2)


def default_batch(encoder: Encoder) -> int:
    """Images per model call: 256 on a GPU (fp16 ViT-B-32 reaches its rate there), 16 on the
    CPU (larger batches are no faster there, and look further ahead in memory)."""
    return 256 if _on_gpu(encoder) else 16


def _on_gpu(encoder: Encoder) -> bool:
    return str(getattr(encoder, "device", "cpu")).startswith("cuda")


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
        folders = [resolve_root(root) for root in roots]
        todo = self._plan(folders, report)
        if todo and not self.stop.is_set():
            self._embed(todo, report)
        if not self.stop.is_set():
            self._prune(folders, report)
        report.interrupted = self.stop.is_set()
        self.store.flush()
        self.progress.finish()
        report.elapsed_s = time.perf_counter() - started
        return report

    # -- plan -------------------------------------------------------------------------------

    def _plan(self, folders: Sequence[str], report: IndexReport) -> list[_Todo]:
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
                fresh = self._reuse_moved(fresh, report)
            todo.extend(fresh)
        return todo

    def _reuse_moved(self, fresh: list[_Todo], report: IndexReport) -> list[_Todo]:
        """Give new files whose content is already stored (renamed, moved, copied) that vector."""
        for item in fresh:
            try:
                item.fingerprint = fingerprint(item.entry.path, item.entry.size)
            except OSError:
                item.fingerprint = None  # the decode step will report the problem
        prints = sorted({item.fingerprint for item in fresh if item.fingerprint})
        if not prints:
            return fresh
        candidates = self.store.find_by_fingerprint(prints)
        rows: list[Row] = []
        gone: list[str] = []
        remaining: list[_Todo] = []
        for item in fresh:
            match = next(
                (c for c in candidates.get(item.fingerprint or "", []) if c["size"] == item.entry.size),
                None,
            )
            if match is None:
                remaining.append(item)
                continue
            rows.append(
                Row(
                    item.key,
                    match["vector"],
                    item.entry.size,
                    item.entry.mtime_ns,
                    match["width"],
                    match["height"],
                    match["fingerprint"],
                )
            )
            old_path = path_of(match["path"])
            if match["path"] != item.key and not is_indexable(old_path):
                gone.append(match["path"])
            report.moved += 1
        if rows:
            self.store.write(rows)
            self.store.delete(sorted(set(gone)))  # the old name of a moved file: not a removal
        return remaining

    # -- embed ------------------------------------------------------------------------------

    def _embed(self, todo: list[_Todo], report: IndexReport) -> None:
        encoder = self._get_encoder()
        batch_size = self.batch_size or default_batch(encoder)
        self.store.ensure(encoder.spec, encoder.dim)
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

    def _encode(self, batch: list[_Prepared], encoder: Encoder, report: IndexReport) -> list[Row]:
        pixels = np.stack([p.pixels for p in batch])
        with self._turns.model():
            vectors = encoder.encode_images(pixels)
        rows = []
        for prepared, vector in zip(batch, vectors, strict=True):
            entry = prepared.todo.entry
            rows.append(
                Row(
                    prepared.todo.key,
                    vector,
                    entry.size,
                    entry.mtime_ns,
                    prepared.width,
                    prepared.height,
                    prepared.fingerprint,
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
        self._turns.enabled = _fills_cpu(encoder)
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
        if not self.store.exists():
            return
        for folder in folders:
            if not os.path.isdir(folder):
                continue  # a single file named on the command line: nothing else to prune
            gone = [key for page in self.store.iter_keys(folder) for key in page if not is_indexable(path_of(key))]
            if gone:
                report.removed += self.store.delete(gone)


def _prepare(item: _Todo, encoder: Encoder, min_side: int | None, turns: CpuTurns) -> _Prepared | tuple[str, str]:
    """Runs in a decode thread: fingerprint (reads 128 KiB), then, in the decoders' turn,
    decode and preprocess. Failures become (path, reason)."""
    path = item.entry.path
    try:
        fp = item.fingerprint or fingerprint(path, item.entry.size)
        with turns.decoding():
            loaded = load_image(path, min_side=min_side)
            pixels = encoder.preprocess(loaded.image)
    except ImageLoadError as exc:
        return (path, exc.reason)
    except OSError as exc:  # from the fingerprint: the file vanished or became unreadable
        return (path, describe_failure(exc, path))
    except Exception as exc:
        return (path, f"cannot process: {exc}")
    return _Prepared(item, pixels, loaded.width, loaded.height, fp)


def _fills_cpu(encoder: Encoder) -> bool:
    return bool(getattr(encoder, "fills_cpu", False))  # an encoder of the caller's may not say


def _scan_all(folders: Sequence[str], report: IndexReport, stop: threading.Event) -> Iterator[tuple[FileEntry, str]]:
    for folder in folders:
        for found in scan(folder):
            if stop.is_set():
                return  # Ctrl-C while scanning a large tree: stop now, not at the next chunk
            if isinstance(found, ScanProblem):
                report.failed.append((found.path, found.reason))
                continue
            key = key_of(found.path)
            if not key_fits(key):
                report.failed.append((found.path, f"path too long to store (over {MAX_KEY_BYTES:,} bytes as a key)"))
                continue
            yield found, key


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
    """Absolute, symlink-free form of a folder or file given by the user; must exist."""
    path = os.path.realpath(os.path.expanduser(root))
    if not os.path.exists(path):
        raise PixfindError(f"folder not found: {root}: check the path")
    if not os.access(path, os.R_OK):
        raise PixfindError(f"cannot read {root}: permission denied")
    return path
