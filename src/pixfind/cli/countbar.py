"""A progress bar for a pass over stored rows (``pixfind duplicates``, ``pixfind export``):
count, rate and ETA, as ``pixfind index`` shows while embedding.

The rate is rows done over the time since the pass began (not rich's smoothed estimate, which
swings wildly on batches that arrive in bursts), and the ETA follows from it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console


class CountBar:
    """``update(done, total)`` after each batch; ``close()`` at the end. Shows nothing when
    ``disable`` (not a terminal, or ``--quiet``)."""

    def __init__(
        self, label: str, unit: str, console: Console, disable: bool, clock: Callable[[], float] | None = None
    ) -> None:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._clock = clock or time.monotonic
        self._unit = unit
        self._bar = Progress(
            SpinnerColumn(),
            TextColumn(label),
            BarColumn(),
            TextColumn("{task.fields[count]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
            console=console,
            disable=disable,
            get_time=self._clock,
        )
        self._task: Any = None
        self._counting = False
        self._since = 0.0

    def _start(self, total: int | None) -> None:
        if self._task is None:
            self._bar.start()
            self._task = self._bar.add_task("", total=total, count="", rate="", eta="")

    def status(self, text: str) -> None:
        """What takes the time before the count starts (shown in place of the count)."""
        self._start(None)
        self._bar.update(self._task, count=text)
        self._bar.refresh()

    def update(self, done: int, total: int) -> None:
        if self._task is None or not self._counting:
            self._start(total)
            self._counting = True
            self._since = self._clock()
        elapsed = self._clock() - self._since
        rate = done / elapsed if elapsed > 0 else 0.0
        left = max(0, total - done) / rate if rate else 0.0
        self._bar.update(
            self._task,
            completed=done,
            total=total,
            count=f"{done:,}/{total:,}",
            rate=f"{rate:,.0f} {self._unit}/s" if rate else "",
            eta=f"ETA {_clock_time(left)}" if rate else "",
        )

    def close(self) -> None:
        if self._task is not None:
            self._bar.stop()
            self._task = None

    def __enter__(self) -> CountBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clock_time(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
