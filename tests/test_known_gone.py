"""A row goes only when its file is known to be gone: a folder that cannot be read, or an empty
folder where an index holds images (a drive that is not mounted), keeps its rows and is reported.

Root reads every file whatever its mode, so each permission case runs the real CLI (or a small
script) in a child process whose capability bounding set lacks CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH: still uid 0, owner of the files, but the mode bits now apply to it. As any
other user, mode bits apply anyway. Nothing here is skipped: a root that cannot give up those
capabilities fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_crash import pixfind_env

from pixfind.pathkeys import path_of

#: util-linux's setpriv drops the two capabilities from the bounding set, then execs ``args``: no
#: ctypes, and no ``preexec_fn`` (children started with one from this gRPC-talking process are safe
#: only because tests/grpc_fork.py turns gRPC's fork handlers off; this needs no such help).
DROP_READ_OVERRIDE = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


def unprivileged(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` where mode bits apply (as root: without the capabilities that bypass them)."""
    prefix = DROP_READ_OVERRIDE if os.geteuid() == 0 else []
    result = subprocess.run([*prefix, *args], env=env or pixfind_env(), capture_output=True, text=True, timeout=timeout)
    assert not result.stderr.startswith("setpriv:"), f"cannot make mode bits apply to root: {result.stderr}"
    return result


def pixfind_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pixfind", *args]


@pytest.fixture
def library(index_factory, make_images, tmp_path: Path) -> Iterator[Path]:
    """12 indexed images in three folders (a, b, c); every mode is restored afterwards."""
    root = tmp_path / "lib"
    for i, name in enumerate("abc"):
        make_images(root / name, 4, start=10 * i)
    idx = index_factory()
    assert idx.add(root).new == 12
    idx.close()
    try:
        yield root
    finally:
        for folder in (root, *root.iterdir()):
            os.chmod(folder, 0o755)


def stored(uri: str) -> list[str]:
    from pixfind.store import Store

    with Store(uri, create=False) as store:
        return sorted(path_of(key) for page in store.iter_keys() for key in page)


def index_report(root: Path, uri: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict]:
    report = tmp_path / "report.json"
    report.unlink(missing_ok=True)
    result = unprivileged(pixfind_cli("index", str(root), "--uri", uri, "--report", str(report)))
    return result, json.loads(report.read_text()) if report.exists() else {}


def test_an_unreadable_subfolder_keeps_its_rows_and_is_reported(library: Path, lite_uri: str, tmp_path: Path) -> None:
    before = stored(lite_uri)
    os.chmod(library / "b", 0)
    result, report = index_report(library, lite_uri, tmp_path)
    assert result.returncode == 0, result.stderr
    assert report["removed"] == 0 and report["unchanged"] == 8
    assert report["unreadable"] == [
        {"path": str(library / "b"), "reason": "cannot list folder: Permission denied", "kept": 4}
    ]
    assert "1 unreadable" in result.stderr
    assert f"unreadable {library / 'b'}: cannot list folder: Permission denied (4 indexed images kept)" in result.stderr
    assert stored(lite_uri) == before


@pytest.mark.parametrize(("mode", "reason"), [(0o600, "cannot enter folder"), (0o000, "cannot list folder")])
def test_an_unreadable_root_keeps_every_row_and_fails(
    library: Path, lite_uri: str, tmp_path: Path, mode: int, reason: str
) -> None:
    """The root made unenterable (r, no x) or unreadable: nothing read, so nothing removed and a
    non-zero exit; `info` still counts every image."""
    before = stored(lite_uri)
    os.chmod(library, mode)
    result, report = index_report(library, lite_uri, tmp_path)
    assert result.returncode == 1, result.stderr
    assert "pixfind: error: nothing could be indexed" in result.stderr
    assert report["removed"] == 0 and report["nothing_read"] is True
    assert [(u["path"], u["kept"]) for u in report["unreadable"]] == [(str(library), 12)]
    assert report["unreadable"][0]["reason"].startswith(reason)
    assert report["failed"] == []  # not 12 "permission denied" files: one folder, said once
    info = unprivileged(pixfind_cli("info", "--uri", lite_uri, "--json"))
    assert json.loads(info.stdout)["images"] == 12
    assert stored(lite_uri) == before


FRESH_RUN = r"""
import os, sys
import numpy as np
from pixfind.ingest.report import NoProgress
from pixfind.ingest.runner import Indexer
from pixfind.store import Store
from pixfind.config import ModelSpec

class Model:
    spec, dim, draft_side = ModelSpec("test", None), 4, 32
    device, fills_cpu, image_size, image_precision, precision_reason, image_runtime = "cpu", False, 8, None, "", None
    def preprocess(self, image):
        return np.zeros((3, 8, 8), dtype=np.float32)
    def encode_images(self, pixels):
        return np.ones((len(pixels), 4), dtype=np.float32) / 2

class LockOutAtTheEnd(NoProgress):
    "Once every image is embedded (before the last write and the prune), a folder becomes unreadable."
    def start_embedding(self, total):
        self.left = total
    def embedded(self, count):
        self.left -= count
        if self.left == 0:
            os.chmod(sys.argv[3], 0)

with Store(sys.argv[2]) as store:
    report = Indexer(store, Model, batch_size=2, workers=1, progress=LockOutAtTheEnd()).run([sys.argv[1]])
    print(report.new, report.removed, store.count())
    print(getattr(report, "kept", None))
"""


def test_a_folder_locked_during_a_fresh_run_keeps_the_rows_just_written(
    make_images, tmp_path: Path, lite_uri: str
) -> None:
    """Measured before: a folder made unreadable while a first run was embedding lost the rows
    that run had just written, in its own prune."""
    root = tmp_path / "lib"
    make_images(root / "a", 3)
    make_images(root / "b", 3, start=10)
    try:
        result = unprivileged([sys.executable, "-c", FRESH_RUN, str(root), lite_uri, str(root / "b")])
    finally:
        os.chmod(root / "b", 0o755)
    assert result.returncode == 0, result.stderr
    counts, kept = result.stdout.splitlines()
    assert counts == "6 0 6"  # new, removed, stored
    assert kept == str({str(root / "b"): 3})


def test_a_root_emptied_like_an_unmounted_drive_keeps_its_rows(index_factory, make_images, tmp_path: Path) -> None:
    """An empty folder where the index holds images (a removable drive not mounted) is not
    taken as proof that they are gone: the rows stay, and the summary says how to drop them."""
    from pixfind.render import summary_lines

    drive = tmp_path / "media" / "usb"
    make_images(drive / "trip", 5)
    idx = index_factory()
    assert idx.add(drive).new == 5
    for photo in sorted((drive / "trip").iterdir()):
        photo.unlink()
    (drive / "trip").rmdir()  # the mount point, with nothing mounted on it
    report = idx.add(drive)
    assert (report.removed, idx.info()["images"]) == (0, 5)
    assert (report.empty, report.roots_read) == ({str(drive): 5}, 1)
    assert any(
        f"folder {drive} is empty but the index has 5 images under it: not removing them" in line
        and f"`pixfind remove {drive}` drops them" in line
        for line in summary_lines(report)
    )
    assert report.to_dict()["empty_folders"] == [{"path": str(drive), "kept": 5}]
    (drive / "note.txt").write_text("the drive is back, its photos elsewhere")  # not empty: known gone
    assert idx.add(drive).removed == 5


def test_presence_is_known_only_where_it_can_be(tmp_path: Path) -> None:
    """The rule itself, on plain paths (root may read everything: mode cases are above)."""
    from pixfind.ingest.scan import Presence, PresenceCheck

    root = tmp_path / "root"
    (root / "kept").mkdir(parents=True)
    (root / "kept" / "a.jpg").write_bytes(b"x")
    (root / "kept" / "notes.txt").write_text("x")
    (root / "kept" / "folder.jpg").mkdir()
    (root / "empty").mkdir()
    (root / "file").write_text("x")
    check = PresenceCheck(top=str(root))
    assert check(str(root / "kept" / "a.jpg")).presence is Presence.PRESENT
    gone = ["kept/missing.jpg", "kept/notes.txt", "kept/folder.jpg", "deleted/deeper/b.jpg", "file/c.jpg"]
    for name in gone:
        assert check(str(root / name)).presence is Presence.GONE, name
    empty = check(str(root / "empty" / "sub" / "d.jpg"))
    assert (empty.presence, empty.folder) == (Presence.EMPTY_FOLDER, str(root / "empty"))
    (root / "drive").symlink_to(tmp_path / "unmounted" / "photos")  # a link to a drive not mounted
    (root / "e.jpg").symlink_to(tmp_path / "unmounted" / "e.jpg")
    for name in ("drive/trip/f.jpg", "e.jpg"):
        dangling = check(str(root / name))
        assert (dangling.presence, dangling.folder) == (Presence.UNREADABLE, str(root / name.split("/")[0])), name
        assert "symbolic link" in dangling.reason
