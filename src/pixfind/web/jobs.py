"""The page's duplicates search: :meth:`ImageIndex.duplicates` on a thread of its own.

On 100,000 images the search takes minutes, far longer than a request may, so a POST starts it
and the page asks how it goes. One runs at a time (a second start is answered with the running
one's state): every stored vector is searched once, and two such runs would only halve each
other's speed. The run holds the routes' index lock (one Milvus client, one writer on an embedded
index) and lends it to waiting searches after each batch of stored vectors, as a ``serve --watch``
batch does, so a search waits for one batch, not for the run. It stops at the next batch when
cancelled or when the server stops, and its thread is joined then: nothing is left running.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import debug_enabled
from ..errors import PixfindError
from ..ingest.watch_events import HANDOFF_S
from .paths import path_query, version_of

if TYPE_CHECKING:
    from ..api import ImageIndex
    from ..duplicates import DuplicateGroup

#: Groups a GET returns at most in one answer (the page asks for the next ones as it scrolls).
MAX_GROUPS_PER_ANSWER = 500
#: Stored vectors per Milvus search in a run (the command line's 500 make a search wait longer).
SEARCH_BATCH = 100
#: Longest a run waits, at one batch boundary, for searches that queue without end.
MAX_LEND_S = 2.0


class JobCancelled(Exception):
    """Raised into the run at a batch boundary when it is cancelled."""


@dataclass
class JobState:
    """What a run is doing, and what it found once done."""

    state: str = "idle"  # idle, running, done, cancelled, failed
    threshold: float | None = None
    under: str | None = None
    phase: str = ""
    scanned: int = 0
    total: int = 0
    groups_found: int = 0
    started_at: float | None = None  # seconds since the epoch
    finished_at: float | None = None
    error: str | None = None
    groups: list[DuplicateGroup] = field(default_factory=list)

    def to_dict(self, offset: int = 0, limit: int = MAX_GROUPS_PER_ANSWER) -> dict[str, Any]:
        data: dict[str, Any] = {
            "state": self.state,
            "threshold": self.threshold,
            "under": self.under,
            "phase": self.phase,
            "scanned": self.scanned,
            "total": self.total,
            "groups_found": self.groups_found,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "elapsed_s": self._elapsed(),
            "error": self.error,
        }
        if self.state == "done":
            shown = self.groups[offset : offset + limit]
            data["groups_total"] = len(self.groups)
            data["images_total"] = sum(len(group.files) for group in self.groups)
            data["reclaimable_bytes"] = sum(group.reclaimable for group in self.groups)
            data["offset"] = offset
            data["groups"] = [group_json(group) for group in shown]
        return data

    def _elapsed(self) -> float | None:
        if self.started_at is None:
            return None
        return round((self.finished_at or time.time()) - self.started_at, 3)


def group_json(group: DuplicateGroup) -> dict[str, Any]:
    """A group as ``pixfind duplicates --json`` writes it, each file with the URLs the page uses
    (served by the routes that serve only indexed, unchanged files)."""
    data = group.to_dict()
    for item in data["files"]:  # type: ignore[union-attr]
        query = path_query(item["path"])
        version = version_of(item["path"])
        suffix = f"&v={version}" if version else ""
        item["thumb"] = f"/api/thumb?path={query}{suffix}"
        item["image"] = f"/api/image?path={query}{suffix}"
    return data


class DuplicatesJob:
    """At most one duplicates run of ``index``, under ``lock`` (the routes' index lock)."""

    def __init__(
        self,
        index: ImageIndex,
        lock: Any,
        waiting: Callable[[], int] = lambda: 0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.index = index
        self.lock = lock
        self.waiting = waiting  # how many calls wait for ``lock``: they go first at each batch
        self.log = log or (lambda line: print(line, flush=True))
        self.status = JobState()
        self._guard = threading.Lock()  # guards starting and the thread handle
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, threshold: float, under: str | None) -> bool:
        """Start a run; False (nothing started) while one is running."""
        with self._guard:
            if self.running:
                return False
            self._cancel.clear()
            self.status = JobState(
                state="running", threshold=threshold, under=under, phase="starting", started_at=time.time()
            )
            self._thread = threading.Thread(target=self._run, args=(self.status,), name="pixfind-duplicates")
            self._thread.start()
            return True

    def cancel(self, wait: bool = False) -> None:
        """Stop the run at its next batch; ``wait``: until its thread has ended."""
        self._cancel.set()
        thread = self._thread
        if wait and thread is not None:
            thread.join()

    def _run(self, status: JobState) -> None:
        try:
            with self.lock:
                self._lend_lock()  # the request that started the run is answered first
                groups = self.index.duplicates(
                    status.threshold,
                    under=status.under,
                    progress=lambda done, total: self._step(status, done, total),
                    status=lambda what: setattr(status, "phase", what),
                    found=lambda count: setattr(status, "groups_found", count),
                    batch=SEARCH_BATCH,
                )
            status.groups = groups
            status.groups_found = len(groups)
            status.state = "done"
        except JobCancelled:
            status.state = "cancelled"
        except PixfindError as exc:
            status.state, status.error = "failed", str(exc)
        except Exception as exc:  # the server goes on answering searches; the page says why it ended
            if debug_enabled():
                raise
            status.state = "failed"
            status.error = f"internal error: {type(exc).__name__}: {exc} (set PIXFIND_DEBUG=1 for details)"
            self.log(f"pixfind: duplicates: {status.error}")
        finally:
            status.phase = ""
            status.finished_at = time.time()

    def _step(self, status: JobState, done: int, total: int) -> None:
        """After each batch: count it, let waiting searches go first, stop when cancelled."""
        status.phase = "collecting the groups" if done >= total else "comparing"
        status.scanned, status.total = done, total
        self._lend_lock()

    def _lend_lock(self) -> None:
        """Let every call waiting for the lock go first (a lock is not fair: released and taken
        again at once, it would often stay with the run), for :data:`MAX_LEND_S` at most."""
        self.lock.release()
        try:
            time.sleep(HANDOFF_S)  # a search woken by the release takes the lock meanwhile
            deadline = time.monotonic() + MAX_LEND_S
            while self.waiting() and time.monotonic() < deadline and not self._cancel.is_set():
                time.sleep(HANDOFF_S)
        finally:
            self.lock.acquire()
        if self._cancel.is_set():
            raise JobCancelled
