"""A live index: file events, debounced into batches, applied by the same indexer as ``pixfind index``.

``pixfind watch`` and ``pixfind serve --watch`` use this module. File events (watchdog: inotify on
Linux, or polling for network drives, where the system reports nothing) only say which paths were
*touched*; what happened to each is decided when its batch is applied, from what is on disk then.
Events that arrive out of order, twice, or in bursts (a copy of a thousand photos, an editor saving
through a temporary file and a rename) therefore all end the same way:

* a touched path that exists is indexed by one :meth:`~pixfind.api.ImageIndex.add` run, as
  ``pixfind index`` would index it: a file as a single root, a new or moved-in folder as a folder.
  New and changed files are embedded; a file whose whole content is stored under a path now gone
  takes that vector (a move: nothing is embedded); rows under such a folder whose files are known
  to be gone are pruned;
* a touched path that is gone loses its row, and the rows under it, only when they are known to be
  gone (:class:`~pixfind.ingest.scan.PresenceCheck`, as the prune of ``pixfind index``), with one
  addition: a file the kernel reported deleted (inotify, not polling) is gone even when its folder
  is now empty. ``pixfind index`` keeps the rows of an empty folder because an unmounted drive looks
  like one, but an unmount reports no deletion: without this the last photo deleted from a folder
  would stay findable.

Batches: one is applied :data:`QUIET_S` after the last event, or :data:`MAX_WAIT_S` after its first
one while events keep coming. A file that had an event less than :data:`QUIET_S` ago, or whose size
or mtime changed since its last event, waits for a later batch: a file still being copied is not
indexed half-written. Editors' temporary files (``.x.swp``, ``x~``, ``x.part``) are not image files
or are hidden, so they are ignored like a scan ignores them, and the rename that ends a save is a
touched image file like any other.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import debug_enabled
from ..errors import PixfindError
from ..pathkeys import key_of, path_of
from .report import IndexReport, NoProgress, Progress
from .scan import Presence, PresenceCheck
from .watch_events import HANDOFF_S, MAX_WAIT_S, QUIET_S, TICK_S, Batcher, Touch, WatchedRoots, touches_of

if TYPE_CHECKING:
    from ..api import ImageIndex
    from ..store import Store

# -- applying a batch --------------------------------------------------------------------------


def outermost(paths: Iterable[str]) -> list[str]:
    """``paths`` without those inside another of them (a folder's run covers its files)."""
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not kept or not path.startswith(kept[-1].rstrip("/") + "/"):
            kept.append(path)
    return kept


def apply_batch(
    index: ImageIndex,
    batch: Sequence[Touch],
    roots: WatchedRoots,
    *,
    stop: threading.Event,
    progress: Progress | None = None,
    deletions_are_proof: bool = True,
) -> IndexReport:
    """Index the touched paths that exist and prune those that are gone; one report for both.

    ``deletions_are_proof``: a deletion the watcher reported is proof even in an empty folder
    (true of kernel events, not of polling, where an unmounted drive looks deleted)."""
    started = time.perf_counter()
    present = outermost(touch.path for touch in batch if os.path.exists(touch.path))
    report = _index_present(index, present, stop, progress) if present else IndexReport()
    if not report.interrupted and not stop.is_set():
        gone = [touch for touch in batch if not os.path.exists(touch.path)]
        prune_gone(index.store, gone, roots, report, deletions_are_proof=deletions_are_proof)
    else:
        report.interrupted = True
    report.elapsed_s = time.perf_counter() - started
    return report


def _index_present(
    index: ImageIndex, paths: list[str], stop: threading.Event, progress: Progress | None
) -> IndexReport:
    """``index.add(*paths)``; a path deleted since it was found is dropped and the run retried
    (its deletion is the next batch's)."""
    while True:
        try:
            return index.add(*paths, progress=progress, stop=stop)
        except PixfindError:
            still = [path for path in paths if os.path.exists(path)]
            if len(still) == len(paths):
                raise
            paths = still
            if not paths:
                return IndexReport()


def prune_gone(
    store: Store,
    gone: Sequence[Touch],
    roots: WatchedRoots,
    report: IndexReport,
    *,
    deletions_are_proof: bool = True,
) -> None:
    """Delete the rows of gone paths (and of the files under gone folders) that are known to be
    gone; the others are kept and counted in ``report`` as the prune of ``pixfind index`` does."""
    if not gone or not store.exists():
        return
    by_path = {touch.path: touch for touch in gone}
    doomed: list[str] = []
    checks: dict[str, PresenceCheck] = {}
    for path in outermost(by_path):
        root = roots.root_of(path)
        if root is None or (path != root and not os.path.isdir(root)):
            continue  # the watched folder itself went (a drive unmounted?): keep its rows
        check = checks.setdefault(root, PresenceCheck(top=root if os.path.isdir(root) else None))
        proof = deletions_are_proof and by_path[path].deleted
        for key in _stored_at_or_under(store, path):
            verdict = check(path_of(key))
            if verdict.presence is Presence.GONE or (proof and verdict.presence is Presence.EMPTY_FOLDER):
                doomed.append(key)
            elif verdict.presence is Presence.UNREADABLE:
                report.unreadable.setdefault(verdict.folder, verdict.reason)
                report.kept[verdict.folder] = report.kept.get(verdict.folder, 0) + 1
            elif verdict.presence is Presence.EMPTY_FOLDER:
                report.empty[verdict.folder] = report.empty.get(verdict.folder, 0) + 1
    if doomed:
        report.removed += store.delete(doomed)
        store.flush()


def _stored_at_or_under(store: Store, path: str) -> Iterator[str]:
    key = key_of(path)
    if store.lookup([key]):
        yield key
    for page in store.iter_keys(path):
        yield from page


# -- serving searches between model batches ----------------------------------------------------


class HandoffProgress(NoProgress):
    """Progress for a run inside ``pixfind serve``: at each step (a plan chunk scanned, a model
    batch embedded) the run lends the index lock it holds to waiting searches, so they wait for
    one model batch, not for the whole run. Safe there: the run holds no half-made Milvus call
    and no model call at those points (decoding ahead of the model goes on meanwhile)."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock

    def _hand_off(self) -> None:
        self._lock.release()
        try:
            time.sleep(HANDOFF_S)  # a search woken by the release takes the lock meanwhile
        finally:
            self._lock.acquire()

    def scanning(self, found: int) -> None:
        self._hand_off()

    def embedded(self, count: int) -> None:
        self._hand_off()


# -- the watcher -------------------------------------------------------------------------------


@dataclass
class WatchState:
    """What a watch is doing, for ``/api/info``."""

    folders: list[str]
    polling: float | None = None
    phase: str = "starting"  # starting, indexing, watching, stopped, failed
    applying: bool = False  # a batch is being applied now
    batches: int = 0
    pending: int = 0
    last_summary: str = ""
    last_batch: dict[str, Any] | None = None  # the counts of the last run that did something, and when
    error: str | None = None  # why the watch stopped

    def to_dict(self) -> dict[str, Any]:
        return {
            "folders": self.folders,
            "polling_s": self.polling,
            "phase": self.phase,
            "applying": self.applying,
            "batches": self.batches,
            "pending": self.pending,
            "last_summary": self.last_summary,
            "last_batch": self.last_batch,
            "error": self.error,
            "missing": [folder for folder in self.folders if not os.path.exists(folder)],
        }

    def record(self, report: IndexReport) -> None:
        """The summary and counts of ``report``, the last run that did something."""
        self.last_summary = _first_line(report)
        self.last_batch = {
            "at": time.time(),
            "new": report.new,
            "updated": report.updated,
            "moved": report.moved,
            "copied": report.copied,
            "removed": report.removed,
            "failed": len(report.failed),
            "unreadable": len(report.unreadable),
            "problems": [f"{path}: {reason}" for path, reason in [*report.failed, *report.unreadable.items()][:5]],
            "elapsed_s": round(report.elapsed_s, 3),
        }


class Watcher:
    """Watches the roots of one index and applies their changes in batches.

    Start it (:meth:`start`) before the first full index run, so that nothing written meanwhile is
    missed, then :meth:`run` until ``stop`` is set; :meth:`close` ends the observer thread.
    ``poll``: seconds between polls of the folders instead of kernel events (network drives).
    ``lock``: held while a batch is applied, lent to others between model batches (``serve``)."""

    def __init__(
        self,
        index: ImageIndex,
        folders: Iterable[str],
        *,
        poll: float | None = None,
        lock: Any = None,
        quiet: float = QUIET_S,
        max_wait: float = MAX_WAIT_S,
    ) -> None:
        self.index = index
        self.roots = WatchedRoots(folders)
        self.poll = poll
        self.lock = lock
        self.batcher = Batcher(quiet, max_wait)
        self.state = WatchState(list(self.roots.paths), poll)
        self._observer: Any = None

    def start(self) -> None:
        """Begin receiving events; one clear error when the system refuses to watch."""
        from watchdog.events import FileSystemEventHandler

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                watcher.touched(event)

        self._observer = self._make_observer()
        handler = Handler()
        try:
            for root in self.roots.paths:
                if os.path.isdir(root):
                    self._observer.schedule(handler, root, recursive=True, follow_symlink=True)
                else:  # a single image file: its folder, and only its events matter
                    self._observer.schedule(handler, os.path.dirname(root), recursive=False)
            self._observer.start()
        except OSError as exc:
            self.close()
            raise PixfindError(_watch_error(root, exc)) from exc

    def _make_observer(self) -> Any:
        if self.poll is not None:
            from watchdog.observers.polling import PollingObserver

            return PollingObserver(timeout=self.poll)
        from watchdog.observers import Observer

        return Observer()

    def touched(self, event: Any) -> None:
        for touch in touches_of(event):
            if self.roots.matters(touch.path, touch.is_dir):
                self.batcher.touch(touch)

    def index_all(self, stop: threading.Event, progress: Progress | None = None) -> IndexReport:
        """The first run over every root, as ``pixfind index ROOTS`` (under the lock, when given)."""
        self.state.phase = "indexing"
        with self._holding() as lent:
            report = self.index.add(*self.roots.paths, progress=progress or lent, stop=stop)
        self.state.record(report)
        return report

    def run(self, stop: threading.Event, on_report: Callable[[IndexReport], None]) -> None:
        """Apply batches until ``stop`` is set; ``on_report`` is told each one that did something."""
        self.state.phase = "watching"
        while not stop.wait(TICK_S):
            self.state.pending = self.batcher.pending()
            batch = self.batcher.take()
            if not batch:
                continue
            with self._holding() as lent:
                self.state.applying = True  # set and cleared under the lock: whoever reads it there sees the truth
                try:
                    report = apply_batch(
                        self.index, batch, self.roots, stop=stop, progress=lent, deletions_are_proof=self.poll is None
                    )
                finally:
                    self.state.applying = False
            self.state.batches += 1
            self.state.pending = self.batcher.pending()
            if _did_something(report):
                self.state.record(report)
                on_report(report)
        self.state.phase = "stopped"

    @contextlib.contextmanager
    def _holding(self) -> Iterator[Progress | None]:
        if self.lock is None:
            yield None
            return
        with self.lock:
            yield HandoffProgress(self.lock)

    def close(self) -> None:
        if self._observer is not None:
            with contextlib.suppress(RuntimeError):
                self._observer.stop()
                self._observer.join(timeout=10)
            self._observer = None


def _did_something(report: IndexReport) -> bool:
    counted = report.new + report.updated + report.moved + report.copied + report.removed
    return bool(counted or report.failed or report.unreadable or report.empty or report.interrupted)


def _first_line(report: IndexReport) -> str:
    from ..render import summary_lines

    return summary_lines(report)[0]


def _watch_error(root: str, exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EMFILE):
        return (
            f"cannot watch {root}: the system's limit on inotify watches is reached "
            "(raise fs.inotify.max_user_watches with sysctl, or pass --poll SECONDS)"
        )
    return f"cannot watch {root}: {exc.strerror or exc}"


@contextlib.contextmanager
def watching_in_background(
    watcher: Watcher | None, say: Callable[[str], None], stop: threading.Event | None = None
) -> Iterator[None]:
    """Inside ``pixfind serve``: the first run over the roots, then the batches, on a thread of
    their own while the block runs; on exit (or once ``stop`` is set: the server begins to stop)
    the batch in hand ends and the thread is joined."""
    if watcher is None:
        yield
        return
    from ..render import summary_lines

    stop = stop or threading.Event()

    def say_all(report: IndexReport) -> None:
        for line in summary_lines(report):
            say(f"pixfind: watch: {line}")

    def work() -> None:
        try:
            say_all(watcher.index_all(stop))
            if not stop.is_set():
                say(f"pixfind: watching {_folders(watcher.roots.paths)} for changes")
                watcher.run(stop, say_all)
        except PixfindError as exc:
            watcher.state.phase, watcher.state.error = "failed", str(exc)
            say(f"pixfind: watch stopped: {exc}")
        except Exception as exc:  # the server goes on answering searches; the watch says why it ended
            if debug_enabled():
                raise
            watcher.state.phase = "failed"
            what = f"{type(exc).__name__}: {exc}"
            watcher.state.error = f"internal error: {what}"
            say(f"pixfind: watch stopped: internal error: {what} (set PIXFIND_DEBUG=1 for details)")

    thread = threading.Thread(target=work, name="pixfind-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        watcher.close()


def _folders(paths: Sequence[str]) -> str:
    return paths[0] if len(paths) == 1 else f"{len(paths)} folders"
