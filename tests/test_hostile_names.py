"""Hostile file names: indexed, found, shown (table and JSON), filtered with ``--under`` exactly;
paths too long to store are skipped with a reason."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import draw_photo

from pixfind.cli import main
from pixfind.pathkeys import MAX_KEY_BYTES, key_of, path_of

NAMES = [
    "with space.jpg",
    "it's.jpg",
    'say "hi".jpg',
    "back\\slash.jpg",
    "100%.jpg",
    "under_score.jpg",
    "new\nline.jpg",
    "tab\there.jpg",
    "emoji 🐶.jpg",
    "^41 caret.jpg",  # the escape character itself
    "`tick`.jpg",
    "[x]*?.jpg",  # glob characters
    os.fsdecode(b"caf\xe9 latin-1.jpg"),  # not UTF-8
    os.fsdecode(b"\xff\xfe.jpg"),
    "long " + "é" * 120 + ".jpg",  # 240+ bytes: near NAME_MAX (255)
]
# folders whose names are Milvus `like` wildcards, next to folders those wildcards would match
FOLDERS = ["a_b", "axb", "50%", "50x", "%", "x", "_", "y", "it's", 'q"uote', "back\\slash", os.fsdecode(b"\xe9t\xe9")]


@pytest.fixture
def library(tmp_path: Path) -> tuple[Path, list[str], dict[str, list[str]]]:
    root = tmp_path / "lib"
    files: list[str] = []
    for seed, name in enumerate(NAMES):
        path = root / "names" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_photo(seed, (64, 48)).save(path, "JPEG")
        files.append(str(path))
    by_folder: dict[str, list[str]] = {}
    for i, folder in enumerate(FOLDERS):
        for j in range(2):
            path = root / folder / f"img {j}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            draw_photo(100 + 2 * i + j, (64, 48)).save(path)
            by_folder.setdefault(folder, []).append(str(path))
            files.append(str(path))
    return root, files, by_folder


def test_hostile_names_round_trip(index_factory, library, lite_uri: str, capsys) -> None:  # type: ignore[no-untyped-def]
    root, files, by_folder = library
    idx = index_factory()
    report = idx.add(root)
    assert report.failed == [] and report.new == len(files)
    stored = sorted(path_of(k) for page in idx.store.iter_keys() for k in page)
    assert stored == sorted(files)

    for path in files:  # each found by its stored vector; every other one found under its exact name
        assert idx.contains(path), path
        assert {h.path for h in idx.similar(path, limit=len(files))} == set(files) - {path}
    assert idx.search_image(files[6], limit=1)[0].path == files[6]  # the one with a newline

    for folder, inside in by_folder.items():  # --under matches that folder only, never a lookalike
        hits = idx.search("anything", limit=50, under=str(root / folder))
        assert sorted(h.path for h in hits) == sorted(inside), folder
    assert len(idx.search("anything", limit=50, under=str(root / "names"))) == len(NAMES)
    assert idx.search("anything", limit=50, under=str(root / "a")) == []  # a prefix is not a folder
    idx.close()

    code = main(["search", "anything", "--uri", lite_uri, "--json", "-k", "100"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(hit["path"] for hit in json.loads(out)) == sorted(files)  # json gives back the exact str
    out.encode("utf-8")  # and it is printable UTF-8 (undecodable bytes as \udcXX escapes)

    code = main(["search", "anything", "--uri", lite_uri, "-k", "100", "--under", str(root / "names")])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = [line for line in out.splitlines() if str(root) in line]
    assert len(lines) == len(NAMES)  # one line per hit: the newline in a name does not split it
    assert any("new\\nline.jpg" in line for line in lines)
    assert any("caf\\xe9 latin-1.jpg" in line for line in lines)  # the byte that is not UTF-8
    assert any("emoji 🐶.jpg" in line for line in lines)

    report_file = root.parent / "report.json"
    code = main(["index", str(root), "--uri", lite_uri, "--report", str(report_file)])
    assert code == 0, capsys.readouterr().err
    assert json.loads(report_file.read_text(encoding="utf-8"))["unchanged"] == len(files)


def _deep(base: Path, name: str, depth: int) -> str:
    """Create ``depth`` nested folders called ``name`` (through directory fds: the full path may
    exceed PATH_MAX) with an image at the bottom; returns the image's full path."""
    fd = os.open(base, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        out = os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        with os.fdopen(out, "wb") as fh:
            draw_photo(1, (32, 32)).save(fh, "JPEG")
    finally:
        os.close(fd)
    return os.path.join(str(base), *([name] * depth), "deep.jpg")


def test_paths_too_long_are_skipped_with_a_reason(index_factory, tmp_path: Path) -> None:
    root = tmp_path / "long"
    root.mkdir()
    draw_photo(0, (32, 32)).save(root / "fine.jpg")
    # under PATH_MAX (4096) as a path, over MAX_KEY_BYTES as a key: each '%' is stored as ^25
    escaped = _deep(root / "", "%" * 200, 14)
    assert len(os.fsencode(escaped)) < 4096 < MAX_KEY_BYTES < len(key_of(escaped).encode())
    # over PATH_MAX: the folder cannot even be listed by its full path
    (root / "z").mkdir()
    beyond = _deep(root / "z", "d" * 250, 17)
    assert len(os.fsencode(beyond)) > 4096
    idx = index_factory()
    report = idx.add(root)
    assert report.new == 1
    reasons = [(p, r) for p, r in report.failed]
    assert any(p == escaped and r.startswith("path too long to store") for p, r in reasons), reasons
    assert any("File name too long" in r for _, r in reasons), reasons
    assert len(reasons) == 2
