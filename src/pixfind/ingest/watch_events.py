"""File events into batches of settled paths, for the live index (:mod:`pixfind.ingest.watch`).

Only which paths were touched is kept; what happened to each is decided from the disk when its
batch is applied. A batch is due :data:`QUIET_S` after the last event, or :data:`MAX_WAIT_S` after
its first while events keep coming; a file that had an event less than :data:`QUIET_S` ago, or
whose size or mtime moved since its last event, waits for a later batch (it is still being
written). The clock and the ``stat`` are injectable, so these rules are tested without events.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import PixfindError
from .decode import has_image_extension
from .plan import resolve_root

#: A batch is applied once no event came for this long (seconds)...
QUIET_S = 1.0
#: ...or this long after its first event, while a long copy keeps sending more.
MAX_WAIT_S = 10.0
#: How often the loop looks for a batch that is due.
TICK_S = 0.25
#: How long ``serve --watch`` lets waiting searches go first between two model batches.
HANDOFF_S = 0.005

Signature = tuple[int, int] | None  # (size, mtime_ns) of a file; None: missing


# -- which paths matter ------------------------------------------------------------------------


class WatchedRoots:
    """The folders (or single image files) being watched, resolved as ``pixfind index`` resolves
    them (absolute, links resolved), and the rule for which touched paths matter: those a scan of
    the roots would take (image files, folders), never hidden ones below a root."""

    def __init__(self, roots: Iterable[str]) -> None:
        self.paths = list(dict.fromkeys(resolve_root(str(root)) for root in roots))
        if not self.paths:
            raise PixfindError("no folder given: pixfind watch FOLDER [FOLDER ...]")

    def root_of(self, path: str) -> str | None:
        """The watched root ``path`` is (or is under), or None."""
        for root in self.paths:
            if path == root or path.startswith(root.rstrip("/") + "/"):
                return root
        return None

    def matters(self, path: str, is_dir: bool) -> bool:
        root = self.root_of(path)
        if root is None or path == root:
            return path == root and not is_dir  # a watched single file; a root folder itself is no change
        below = os.path.relpath(path, root).split(os.sep)
        if any(part.startswith(".") for part in below):
            return False  # hidden below a root: skipped by the scan, so by the watch too
        return is_dir or has_image_extension(below[-1])


# -- events into touched paths -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Touch:
    """A path some event concerned: ``deleted`` when that event reported it deleted or moved away."""

    path: str
    is_dir: bool = False
    deleted: bool = False


#: The watchdog event types that change what a scan finds (opened, closed without writing, and a
#: folder's own modification when an entry in it changes, are not changes of an image).
_CHANGE_EVENTS = {"created", "modified", "closed", "attrib"}


def touches_of(event: Any) -> list[Touch]:
    """The paths a watchdog event touches: its ``event_type``, ``src_path``, ``dest_path`` and
    ``is_directory`` only, so tests can pass plain objects."""
    kind, is_dir = event.event_type, bool(event.is_directory)
    src, dest = os.fsdecode(event.src_path), os.fsdecode(getattr(event, "dest_path", "") or "")
    if kind == "moved":
        found = [Touch(src, is_dir, deleted=True)] if src else []
        return found + ([Touch(dest, is_dir)] if dest else [])
    if kind == "deleted":
        return [Touch(src, is_dir, deleted=True)]
    if kind in _CHANGE_EVENTS and not (is_dir and kind != "created"):
        return [Touch(src, is_dir)]
    return []


# -- debouncing --------------------------------------------------------------------------------


def file_signature(path: str) -> Signature:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (0, 0) if os.path.isdir(path) else (info.st_size, info.st_mtime_ns)


@dataclass(slots=True)
class _Pending:
    touch: Touch
    last_event: float
    signature: Signature


class Batcher:
    """Collects touched paths and hands them out in batches once they have settled.

    Thread-safe: the observer's thread calls :meth:`touch`, the applying thread :meth:`take`.
    ``clock`` and ``signature`` are injectable, so the rules are tested without real events."""

    def __init__(
        self,
        quiet: float = QUIET_S,
        max_wait: float = MAX_WAIT_S,
        clock: Callable[[], float] = time.monotonic,
        signature: Callable[[str], Signature] = file_signature,
    ) -> None:
        self.quiet = quiet
        self.max_wait = max_wait
        self._clock = clock
        self._signature = signature
        self._pending: dict[str, _Pending] = {}
        self._first_event: float | None = None
        self._last_event = 0.0
        self._lock = threading.Lock()

    def touch(self, touch: Touch) -> None:
        signature = self._signature(touch.path)
        now = self._clock()
        with self._lock:
            self._pending[touch.path] = _Pending(touch, now, signature)  # the latest event decides
            self._last_event = now
            if self._first_event is None:
                self._first_event = now

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def take(self) -> list[Touch]:
        """The settled paths of a batch that is due (quiet, or waited long enough), in the order
        touched; the rest stay pending. Empty when no batch is due."""
        now = self._clock()
        with self._lock:
            if self._first_event is None:
                return []
            quiet = now - self._last_event >= self.quiet
            if not quiet and now - self._first_event < self.max_wait:
                return []
            ready = [entry for entry in self._pending.values() if now - entry.last_event >= self.quiet]
        settled = []
        for entry in ready:
            signature = self._signature(entry.touch.path)  # outside the lock: events keep coming
            with self._lock:
                if self._pending.get(entry.touch.path) is not entry:
                    continue  # touched again meanwhile: it waits
                if signature == entry.signature:
                    settled.append(entry.touch)
                    del self._pending[entry.touch.path]
                else:  # still being written: its own quiet time starts again
                    entry.signature, entry.last_event = signature, now
        with self._lock:
            self._first_event = min((e.last_event for e in self._pending.values()), default=None)
        return settled
