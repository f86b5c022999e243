"""What `pixfind index` shows while it works: the phase while the model loads (a first run
exports it for the CPU, which takes seconds with no count to show), then an honest rate."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from pixfind.cli import RichProgress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_is_images_over_time_since_embedding_began() -> None:
    """The first run's shape: 5 files found, ~17 s preparing the model, one batch of 5 in 0.5 s.
    The bar must show the phase while it lasts, then 5 / 0.5 s = 10 img/s (rich's smoothed
    estimate showed 34,207)."""
    screen = io.StringIO()
    clock = Clock()
    progress = RichProgress(False, Console(file=screen, force_terminal=True, width=200), clock)
    progress.scanning(0)
    progress.scanning(5)
    progress.status("preparing ViT-B-32 for this CPU, once")
    shown_while_preparing = screen.getvalue()
    clock.now += 17.0
    progress.start_embedding(5)
    clock.now += 0.5
    progress.embedded(5)
    progress.finish()
    assert "preparing ViT-B-32 for this CPU, once" in shown_while_preparing
    final = screen.getvalue().rsplit("\r", 1)[-1]
    assert "5/5" in final and "10.0 img/s" in final, final

    screen.truncate(0)
    progress = RichProgress(False, Console(file=screen, force_terminal=True, width=200), clock)
    progress.start_embedding(100)
    clock.now += 4.0
    progress.embedded(16)
    clock.now += 4.0
    progress.embedded(16)  # 32 in 8 s: 4 img/s, 68 left: 17 s
    progress.finish()
    final = screen.getvalue().rsplit("\r", 1)[-1]
    assert "32/100" in final and "4.0 img/s" in final and "ETA 0:00:17" in final, final


class Recorder:
    """A Progress that writes down what it is told, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def scanning(self, found: int) -> None:
        self.calls.append(("scanning", found))

    def status(self, text: str) -> None:
        self.calls.append(("status", text))

    def start_embedding(self, total: int) -> None:
        self.calls.append(("start_embedding", total))

    def embedded(self, count: int) -> None:
        self.calls.append(("embedded", count))

    def finish(self) -> None:
        self.calls.append(("finish", None))


def test_the_model_load_is_announced_between_scan_and_embedding(make_images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pixfind.api import ImageIndex

    make_images(tmp_path / "photos", 3)
    recorder = Recorder()
    with ImageIndex(uri=str(tmp_path / "p.db")) as idx:
        assert idx.add(tmp_path / "photos", progress=recorder).new == 3
    kinds = [kind for kind, _ in recorder.calls]
    said = [text for kind, text in recorder.calls if kind == "status"]
    assert said and all("ViT-S-32" in str(text) for text in said), said
    assert kinds.index("status") > kinds.index("scanning") and kinds.index("status") < kinds.index("start_embedding")
    assert "status" not in kinds[kinds.index("start_embedding") :]
