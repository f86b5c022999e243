"""What an index run tells its caller: progress while it works, and a summary when it ends.

Both are plain data with no dependency on how the run is executed, so the CLI, the Python API and
any runner (the local thread pipeline today) share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


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
    backfilled: int = 0  # of the unchanged, rows given the date/camera fields (no re-embedding)
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
    decoded_on: str | None = None  # the device a GPU decoder ran on (--decode auto/gpu), when one ran
    decoded_on_device: int = 0  # of the embedded files, those it decoded (the rest took the CPU path)

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
            "backfilled": self.backfilled,
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
            "decoded_on": self.decoded_on,
            "decoded_on_device": self.decoded_on_device,
        }
