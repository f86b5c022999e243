"""A live index: ``pixfind watch`` and ``pixfind serve --watch`` keep an index current.

The batching rules are tested on a fake clock (no real events); everything else runs a real
watchdog observer on a temporary folder, a real Milvus Lite file and the small test model, in
process or as the command a user starts. Bounds are generous (seconds, never sub-second): the
latency itself is measured in benchmarks/watch_latency.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import cli_env, draw_photo
from test_serve_live import ServeProcess

from pixfind.errors import PixfindError
from pixfind.ingest.report import IndexReport
from pixfind.ingest.watch import Watcher, outermost
from pixfind.ingest.watch_events import Batcher, Touch, WatchedRoots, touches_of
from pixfind.pathkeys import key_of, path_of

SETTLE_S = 20.0  # what "within a few seconds" may take on a busy shared machine


def wait_for(condition: Callable[[], Any], timeout: float = SETTLE_S, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


# -- the rules, without real events -------------------------------------------------------------


def event(kind: str, src: str, dest: str = "", is_dir: bool = False) -> SimpleNamespace:
    return SimpleNamespace(event_type=kind, src_path=src, dest_path=dest, is_directory=is_dir)


def test_events_become_touched_paths() -> None:
    assert touches_of(event("moved", "/p/a.jpg", "/p/b.jpg")) == [Touch("/p/a.jpg", deleted=True), Touch("/p/b.jpg")]
    assert touches_of(event("moved", "/p/d", "/p/e", is_dir=True)) == [
        Touch("/p/d", True, deleted=True),
        Touch("/p/e", True),
    ]
    assert touches_of(event("deleted", "/p/a.jpg")) == [Touch("/p/a.jpg", deleted=True)]
    for kind in ("created", "modified", "closed", "attrib"):
        assert touches_of(event(kind, "/p/a.jpg")) == [Touch("/p/a.jpg")]
    assert touches_of(event("created", "/p/new", is_dir=True)) == [Touch("/p/new", True)]
    # a folder "modified" because an entry in it changed, a file opened or read: no change of an image
    assert touches_of(event("modified", "/p", is_dir=True)) == []
    assert touches_of(event("opened", "/p/a.jpg")) == []
    assert touches_of(event("closed_no_write", "/p/a.jpg")) == []


def test_only_what_a_scan_would_take_matters(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    roots = WatchedRoots([str(tmp_path / "photos")])
    root = roots.paths[0]
    assert roots.matters(f"{root}/a.jpg", False)
    assert roots.matters(f"{root}/deep/er/a.PNG", False)
    assert roots.matters(f"{root}/new folder", True)
    for temporary in (".a.jpg.swp", "a.jpg~", "a.jpg.part", "notes.txt", ".hidden.jpg", ".cache/a.jpg"):
        assert not roots.matters(f"{root}/{temporary}", False), temporary
    assert not roots.matters(f"{root}/.git", True)
    assert not roots.matters(str(tmp_path / "elsewhere.jpg"), False)
    assert not roots.matters(f"{root}-other/a.jpg", False)  # a sibling whose name starts the same


def test_outermost_drops_paths_inside_others() -> None:
    assert outermost(["/p/a/x.jpg", "/p/a", "/p/ab.jpg", "/p/b/y.jpg", "/p/a"]) == ["/p/a", "/p/ab.jpg", "/p/b/y.jpg"]


@dataclass
class FakeDisk:
    """A clock and file signatures the test moves by hand."""

    now: float = 0.0
    files: dict[str, tuple[int, int] | None] = field(default_factory=dict)

    def clock(self) -> float:
        return self.now

    def signature(self, path: str) -> tuple[int, int] | None:
        return self.files.get(path)


def test_a_batch_waits_for_quiet() -> None:
    disk = FakeDisk(files={"/p/a.jpg": (10, 1)})
    batcher = Batcher(quiet=1.0, max_wait=10.0, clock=disk.clock, signature=disk.signature)
    batcher.touch(Touch("/p/a.jpg"))
    disk.now = 0.5
    assert batcher.take() == []
    batcher.touch(Touch("/p/a.jpg"))  # another event: the quiet time starts again
    disk.now = 1.2
    assert batcher.take() == []
    disk.now = 1.6
    assert batcher.take() == [Touch("/p/a.jpg")]
    assert batcher.take() == [] and batcher.pending() == 0


def test_a_burst_of_events_is_one_batch() -> None:
    """Files copied one after another go together once the copy is quiet, not one by one."""
    disk = FakeDisk(files={f"/p/{n}.jpg": (n, n) for n in range(4)})
    batcher = Batcher(quiet=1.0, max_wait=10.0, clock=disk.clock, signature=disk.signature)
    taken = []
    for n in range(4):
        disk.now = n * 0.8
        batcher.touch(Touch(f"/p/{n}.jpg"))
        taken.append(batcher.take())
    disk.now = 3.5  # 1.1 s after the last event
    taken.append(batcher.take())
    assert taken == [[], [], [], [], [Touch(f"/p/{n}.jpg") for n in range(4)]]


def test_a_file_still_growing_waits_for_a_later_batch() -> None:
    """A writer the watcher gets no event from (a memory-mapped write, a network drive): the
    size changed since the last event, so the file waits until two looks agree."""
    disk = FakeDisk(files={"/p/a.jpg": (10, 1), "/p/b.jpg": (5, 1)})
    batcher = Batcher(quiet=1.0, max_wait=10.0, clock=disk.clock, signature=disk.signature)
    batcher.touch(Touch("/p/a.jpg"))
    batcher.touch(Touch("/p/b.jpg"))
    disk.files["/p/a.jpg"] = (20, 2)
    disk.now = 1.5
    assert batcher.take() == [Touch("/p/b.jpg")]
    disk.now = 2.0
    assert batcher.take() == []  # its own quiet time started again when the change was seen
    disk.now = 2.6
    assert batcher.take() == [Touch("/p/a.jpg")]


def test_a_long_copy_is_applied_in_batches_of_settled_files() -> None:
    """Events every half second for ever: after ``max_wait`` the settled files go anyway, the
    one still being written stays."""
    disk = FakeDisk()
    batcher = Batcher(quiet=1.0, max_wait=4.0, clock=disk.clock, signature=disk.signature)
    taken: list[Touch] = []
    for step in range(12):
        disk.now = step * 0.5
        path = f"/p/{step}.jpg"
        disk.files[path] = (step, step)
        batcher.touch(Touch(path))
        taken += batcher.take()
    assert taken, "nothing applied while events kept coming"
    assert Touch("/p/11.jpg") not in taken and Touch("/p/10.jpg") not in taken
    assert all(disk.now - int(touch.path[3:-4]) * 0.5 >= 1.0 for touch in taken)


def test_a_deleted_file_is_settled_at_once_after_quiet() -> None:
    disk = FakeDisk(files={"/p/a.jpg": None})
    batcher = Batcher(quiet=1.0, max_wait=10.0, clock=disk.clock, signature=disk.signature)
    batcher.touch(Touch("/p/a.jpg", deleted=True))
    disk.now = 1.0
    assert batcher.take() == [Touch("/p/a.jpg", deleted=True)]


# -- a real watcher in this process -------------------------------------------------------------


@dataclass
class Live:
    """A watcher running on ``folder`` in a thread; ``lock`` guards the index as in ``serve``."""

    folder: Path
    index: Any
    lock: threading.Lock
    reports: list[IndexReport]

    def stored(self, path: Path) -> Any:
        with self.lock:
            key = key_of(os.path.realpath(path))
            return self.index.store.lookup([key]).get(key) if self.index.store.exists() else None

    def vector(self, path: Path) -> list[float]:
        with self.lock:
            return self.index.store.vectors_of([key_of(os.path.realpath(path))])[key_of(os.path.realpath(path))]

    def count(self) -> int:
        with self.lock:
            return self.index.store.count() if self.index.store.exists() else 0

    def total(self, field_name: str) -> int:
        return sum(getattr(report, field_name) for report in list(self.reports))

    def failures(self) -> list[tuple[str, str]]:
        return [failure for report in list(self.reports) for failure in report.failed]


def save_photo(path: Path, seed: int) -> Path:
    """Written beside, then renamed into place, as a careful program (or a download) does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    draw_photo(seed).save(part, "JPEG")
    os.replace(part, path)
    return path


@contextlib.contextmanager
def start_live(index: Any, folder: Path, **options: Any) -> Iterator[Live]:
    lock = threading.Lock()
    watcher = Watcher(index, [str(folder)], lock=lock, **options)
    stop = threading.Event()
    reports: list[IndexReport] = []
    watcher.start()
    watcher.index_all(stop)
    thread = threading.Thread(target=watcher.run, args=(stop, reports.append), daemon=True)
    thread.start()
    try:
        yield Live(folder, index, lock, reports)
    finally:
        stop.set()
        thread.join(60)
        watcher.close()


@pytest.fixture
def live(index_factory, tmp_path: Path) -> Iterator[Live]:  # type: ignore[no-untyped-def]
    folder = tmp_path / "photos"
    save_photo(folder / "first.jpg", 1)
    with start_live(index_factory(), folder) as running:
        yield running


def test_a_new_file_a_change_and_a_delete_are_picked_up(live: Live) -> None:
    assert live.stored(live.folder / "first.jpg") is not None  # the first run, before any event
    added = save_photo(live.folder / "added.jpg", 2)
    wait_for(lambda: live.stored(added), what="the new file indexed")
    assert live.total("new") == 1

    before = live.vector(added)
    save_photo(added, 3)  # another picture under the same name
    size = added.stat().st_size
    wait_for(lambda: (live.stored(added) or SimpleNamespace(size=-1)).size == size, what="the change indexed")
    assert live.total("updated") == 1
    assert live.vector(added) != before

    added.unlink()
    wait_for(lambda: live.stored(added) is None, what="the deleted file removed")
    assert live.total("removed") == 1
    assert live.count() == 1 and not live.failures()


def test_a_rename_takes_the_stored_vector(live: Live) -> None:
    before = live.vector(live.folder / "first.jpg")
    moved = live.folder / "sub" / "renamed.jpg"
    moved.parent.mkdir()
    (live.folder / "first.jpg").rename(moved)
    wait_for(lambda: live.stored(moved), what="the renamed file indexed")
    assert live.stored(live.folder / "first.jpg") is None
    assert live.total("moved") == 1
    assert live.total("embedded") == 0, "a rename was embedded again"
    assert live.vector(moved) == before


def test_folders_made_or_renamed_later_and_the_last_file_deleted(live: Live) -> None:
    """A folder made while watching (its files written at once), then renamed, then emptied."""
    new_folder = live.folder / "trip"
    new_folder.mkdir()
    first = [save_photo(new_folder / f"{n}.jpg", 10 + n) for n in range(3)]
    wait_for(lambda: all(live.stored(path) for path in first), what="the new folder's files indexed")
    assert live.total("new") == 3

    new_folder.rename(live.folder / "trip-2024")
    renamed = [live.folder / "trip-2024" / path.name for path in first]
    wait_for(lambda: all(live.stored(path) for path in renamed), what="the renamed folder's files indexed")
    wait_for(lambda: not any(live.stored(path) for path in first), what="the old names removed")
    assert live.total("moved") == 3 and live.total("embedded") == 3

    for path in renamed:  # its folder ends empty: the deletions were reported, so they go
        path.unlink()
    wait_for(lambda: not any(live.stored(path) for path in renamed), what="the deleted files removed")
    assert live.count() == 1 and not live.failures()


def test_editors_temporary_files_and_hidden_files_are_ignored(live: Live) -> None:
    photo = draw_photo(20)
    photo.save(live.folder / ".saved.jpg.swp", "JPEG")
    photo.save(live.folder / "saved.jpg~", "JPEG")
    (live.folder / ".thumbnails").mkdir()
    photo.save(live.folder / ".thumbnails" / "t.jpg", "JPEG")
    photo.save(live.folder / "saved.jpg.part", "JPEG")
    (live.folder / "saved.jpg.part").rename(live.folder / "saved.jpg")  # the save ends with a rename
    wait_for(lambda: live.stored(live.folder / "saved.jpg"), what="the saved file indexed")
    time.sleep(2.5)  # more than a batch's quiet time: anything else would have been applied
    assert live.count() == 2
    assert not live.failures(), live.failures()


def test_a_file_being_written_is_indexed_once_complete(index_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Written in pieces for longer than a batch may wait (max_wait 2 s): it is indexed once,
    whole, never as a truncated image."""
    folder = tmp_path / "photos"
    folder.mkdir()
    source = tmp_path / "big.jpg"
    draw_photo(30, size=(1600, 1200)).save(source, "JPEG", quality=95)
    data = source.read_bytes()
    with start_live(index_factory(), folder, max_wait=2.0) as live:
        target = folder / "big.jpg"
        with open(target, "wb") as out:
            for start in range(0, len(data), len(data) // 12 + 1):
                out.write(data[start : start + len(data) // 12 + 1])
                out.flush()
                time.sleep(0.4)
        wait_for(lambda: live.stored(target), what="the written file indexed")
        time.sleep(2.5)
        assert not live.failures(), live.failures()
        assert live.stored(target).size == len(data)
        assert live.total("embedded") == 1


def test_polling_finds_changes_but_takes_no_deletion_as_proof(index_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """--poll (network drives): changes are found by looking; a file gone from a folder left
    empty keeps its entry, as ``pixfind index`` keeps it (an unmounted drive looks the same)."""
    folder = tmp_path / "photos"
    save_photo(folder / "keep.jpg", 1)
    with start_live(index_factory(), folder, poll=0.5) as live:
        added = save_photo(folder / "drive" / "a.jpg", 2)
        wait_for(lambda: live.stored(added), what="the new file found by polling")
        added.unlink()
        wait_for(lambda: any(report.empty for report in live.reports), what="the empty folder reported")
        assert live.stored(added) is not None
        second = save_photo(folder / "b.jpg", 3)
        wait_for(lambda: live.stored(second), what="another file found")
        second.unlink()  # in a folder that still holds a file: known gone
        wait_for(lambda: live.stored(second) is None, what="the deleted file removed")


def test_a_refused_watch_is_one_line_naming_the_fix(index_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    class Refusing:
        def schedule(self, *args: Any, **kwargs: Any) -> None:
            raise OSError(errno.ENOSPC, "inotify watch limit reached")

        def stop(self) -> None:
            pass

        def join(self, timeout: float | None = None) -> None:
            pass

    (tmp_path / "photos").mkdir()
    watcher = Watcher(index_factory(), [str(tmp_path / "photos")])
    watcher._make_observer = Refusing  # type: ignore[method-assign]
    with pytest.raises(PixfindError) as refused:
        watcher.start()
    message = str(refused.value)
    assert "\n" not in message and "max_user_watches" in message and "--poll" in message


# -- the commands as a user runs them ------------------------------------------------------------


class WatchProcess:
    """``pixfind watch FOLDER --uri DB`` in a child process; its stderr lines collected."""

    def __init__(self, folder: Path, db: Path, cwd: Path) -> None:
        command = [sys.executable, "-m", "pixfind", "watch", str(folder), "--uri", str(db)]
        self.process = subprocess.Popen(
            command, env=cli_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, pattern: str, after: int = 0, timeout: float = SETTLE_S) -> str:
        def found() -> str | None:
            if self.process.poll() is not None:
                raise AssertionError(f"pixfind watch ended:\n{self.output}")
            return next((line for line in self.lines[after:] if re.search(pattern, line)), None)

        return wait_for(found, timeout, f"{pattern!r} in pixfind watch's output:\n{self.output}")

    def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(120)
        finally:
            if self.process.poll() is None:
                self.process.kill()


def stored_rows(db: Path) -> dict[str, Any]:
    from pixfind.api import ImageIndex

    with ImageIndex(uri=str(db), create=False) as index:  # fails if the lock were still held
        return {key: row for page in index.store.iter_keys() for key, row in index.store.lookup(page).items()}


def test_pixfind_watch_prints_a_summary_per_batch_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    save_photo(folder / "a.jpg", 1)
    db = tmp_path / "index.db"
    watch = WatchProcess(folder, db, tmp_path)
    try:
        watch.wait_for_line(r"^indexed: 1 new", timeout=300)  # the first run, model load included
        watch.wait_for_line(r"^watching .* for changes")
        mark = len(watch.lines)
        save_photo(folder / "b.jpg", 2)
        watch.wait_for_line(r"^indexed: 1 new, 0 updated, 0 unchanged, 0 moved", after=mark)
        mark = len(watch.lines)
        (folder / "b.jpg").rename(folder / "c.jpg")
        line = watch.wait_for_line(r"^indexed: ", after=mark)
        assert re.match(r"indexed: 0 new, 0 updated, 0 unchanged, 1 moved, 0 copied, 0 removed, 0 failed", line)
    finally:
        code = watch.interrupt()
    assert code == 130, watch.output
    assert "Traceback" not in watch.output
    rows = stored_rows(db)
    assert sorted(os.path.basename(key) for key in rows) == ["a.jpg", "c.jpg"]


def test_ctrl_c_during_a_batch_leaves_a_consistent_index(tmp_path: Path) -> None:
    """Ctrl-C while a batch of 32 files is applied: exit 130; every stored row is a file as it is
    on disk, and a later ``pixfind index`` completes the rest without a failure."""
    folder = tmp_path / "photos"
    save_photo(folder / "a.jpg", 1)
    db = tmp_path / "index.db"
    watch = WatchProcess(folder, db, tmp_path)
    try:
        watch.wait_for_line(r"^watching .* for changes", timeout=300)
        spare = tmp_path / "spare"
        for n in range(32):
            save_photo(spare / f"{n:02d}.jpg", 100 + n)
        shutil.copytree(spare, folder / "copied")
        time.sleep(2.0)  # quiet time passed: the batch is under way (32 images take several seconds)
    finally:
        code = watch.interrupt()
    assert code == 130, watch.output
    assert "Traceback" not in watch.output
    for key, row in stored_rows(db).items():
        on_disk = os.stat(path_of(key))
        assert (row.size, row.mtime_ns) == (on_disk.st_size, on_disk.st_mtime_ns), key
    done = subprocess.run(
        [sys.executable, "-m", "pixfind", "index", str(folder), "--uri", str(db)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    counts = re.search(r"indexed: (\d+) new, (\d+) updated, (\d+) unchanged, .* (\d+) failed", done.stderr)
    assert counts, done.stderr
    new, updated, unchanged, failed = map(int, counts.groups())
    assert (new + unchanged, updated, failed) == (33, 0, 0), done.stderr
    assert len(stored_rows(db)) == 33


@pytest.fixture(scope="module")
def served_watch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, Path]]:
    """``pixfind serve --watch FOLDER`` on an index that did not exist (one for this module's tests)."""
    root = tmp_path_factory.mktemp("served")
    folder = root / "photos"
    save_photo(folder / "a.jpg", 1)
    server = ServeProcess(["--uri", str(root / "index.db"), "--watch", str(folder)], cli_env(), root)
    try:
        wait_for(lambda: "pixfind: watching" in server.output, 300, f"the first run:\n{server.output}")
        yield server, folder
    finally:
        server.stop()
    assert "Traceback" not in server.output, server.output


def found_by_search(server: ServeProcess, path: Path) -> bool:
    answer = server.get("/api/search", params={"q": "a photo", "k": 100})
    assert answer.status_code == 200, answer.text
    return os.path.realpath(path) in {hit["path"] for hit in answer.json()}


def test_serve_watch_finds_a_file_added_after_it_started(served_watch: tuple[ServeProcess, Path]) -> None:
    server, folder = served_watch
    info = server.get("/api/info").json()
    assert info["watch"]["folders"] == [os.path.realpath(folder)]
    assert info["watch"]["phase"] == "watching" and info["images"] >= 1
    assert found_by_search(server, folder / "a.jpg")  # indexed by the first run
    added = save_photo(folder / "later.jpg", 2)
    wait_for(lambda: found_by_search(server, added), what="the added file found by a search")
    assert "pixfind: watch: indexed: 1 new" in server.output


def test_serve_watch_answers_searches_while_a_batch_is_indexed(served_watch: tuple[ServeProcess, Path]) -> None:
    """A search sent while a batch of 80 images is applied is answered before that batch ends:
    the batch lends the index to waiting searches between model batches."""
    server, folder = served_watch
    for n in range(80):
        save_photo(folder.parent / "spare" / f"{n:02d}.jpg", 200 + n)
    shutil.copytree(folder.parent / "spare", folder / "copied")
    wait_for(lambda: server.get("/api/info").json()["watch"]["applying"], what="the batch begun")
    response = server.get("/api/search", params={"q": "a photo", "k": 5})
    assert response.status_code == 200, response.text
    assert "indexed: 80 new" not in server.output, "the search waited for the whole batch"
    wait_for(lambda: "indexed: 80 new" in server.output, what=f"the batch's summary:\n{server.output}")
    assert found_by_search(server, folder / "copied" / "79.jpg")


def test_watch_refuses_a_file_that_is_no_image(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    done = subprocess.run(
        [sys.executable, "-m", "pixfind", "watch", str(notes), "--uri", str(tmp_path / "i.db")],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "pixfind: error: nothing can be watched in the folder or file given: see why above"
    )
    assert "not an image file" in done.stderr


def test_watch_refuses_a_folder_that_does_not_exist(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pixfind", "watch", str(tmp_path / "nowhere"), "--uri", str(tmp_path / "i.db")],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"pixfind: error: folder not found: {tmp_path / 'nowhere'}: check the path"
    ]
