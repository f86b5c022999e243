"""Stored vectors checked against open_clip's own reference (tests/oracle.py), file by file:
after moves of files over 128 KiB, with bad files interleaved and several decode workers, on the
default backend (ONNX Runtime / OpenVINO) through the real CLI, and on a Milvus server.

Counting rows cannot tell a vector from the wrong file, or a stale one, from the right one;
these tests can (each was seen to fail with such a defect put in on purpose)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL_MODEL, Backend, cli_env, draw_photo
from oracle import check_index, image_files, reported_precision
from PIL import Image

FINGERPRINT_SPAN = 2 * 64 * 1024  # README/scanner: a move is recognised by size + first and last 64 KiB


def write_large(folder: Path, seed: int, name: str) -> Path:
    """A picture file over 128 KiB, so that a move is recognised by more than its whole content:
    PNG (lossless, no reduced-size decoding) or a high-quality JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if name.endswith(".png"):
        draw_photo(seed, (400, 300)).save(path)
    else:
        draw_photo(seed, (900, 700)).save(path, quality=95)
    assert path.stat().st_size > FINGERPRINT_SPAN, path
    return path


def test_moves_of_large_files_keep_each_files_own_vector(index_factory, tmp_path: Path) -> None:
    folder = tmp_path / "lib"
    names = ["a.png", "b.png", "c.jpg", "d.png", "e.jpg", "f.png"]
    paths = {name: write_large(folder, seed, name) for seed, name in enumerate(names)}
    idx = index_factory()
    assert idx.add(folder).new == 6
    check_index(idx.store.uri, image_files(folder), model=SMALL_MODEL, store=idx.store)

    (folder / "sub").mkdir()
    paths["a.png"].rename(folder / "sub" / "a moved.png")  # moved into a subfolder
    paths["c.jpg"].rename(folder / "renamed c.jpg")  # renamed
    # two files trade names: each path now holds the other's picture
    paths["b.png"].rename(folder / "swap.tmp")
    paths["d.png"].rename(paths["b.png"])
    (folder / "swap.tmp").rename(paths["d.png"])
    shutil.copy2(paths["e.jpg"], folder / "copy of e.jpg")  # a copy keeps the original too
    report = idx.add(folder)
    assert report.moved == 2 and report.copied == 1 and report.removed == 0, report
    check_index(idx.store.uri, image_files(folder), model=SMALL_MODEL, store=idx.store)


def same_size_head_and_tail(folder: Path) -> tuple[Path, Path]:
    """Two different pictures in files of equal size whose first and last 64 KiB are identical
    (uncompressed BMP: the top and bottom bands match, the middle differs)."""
    folder.mkdir(parents=True, exist_ok=True)
    first, second = draw_photo(1, (400, 400)), draw_photo(2, (400, 400))
    second.paste(first.crop((0, 0, 400, 70)), (0, 0))
    second.paste(first.crop((0, 330, 400, 400)), (0, 330))
    a, b = folder / "first.bmp", folder / "second.bmp"
    first.save(a)
    second.save(b)
    one, two = a.read_bytes(), b.read_bytes()
    span = FINGERPRINT_SPAN // 2
    assert len(one) == len(two) > FINGERPRINT_SPAN and one != two
    assert one[:span] == two[:span] and one[-span:] == two[-span:]
    return a, b


def test_a_new_file_sharing_size_head_and_tail_with_a_stored_one_gets_its_own_vector(
    index_factory, tmp_path: Path
) -> None:
    a, b = same_size_head_and_tail(tmp_path / "made")
    folder = tmp_path / "lib"
    folder.mkdir()
    shutil.copy2(a, folder / a.name)
    idx = index_factory()
    idx.add(folder)
    shutil.copy2(b, folder / b.name)  # a different picture: must be embedded, not "moved"
    idx.add(folder)
    check_index(idx.store.uri, image_files(folder), model=SMALL_MODEL, store=idx.store)


def interleaved_library(folder: Path) -> list[Path]:
    """Good pictures with bad files between them in name order (so failures fall inside
    batches), in several formats and sizes; returns the good ones."""
    folder.mkdir(parents=True)
    good: list[Path] = []
    bad = {
        "empty": b"",
        "text": b"not a picture at all\n" * 20,
        "cut": None,  # filled below: a JPEG cut short
    }
    for i in range(14):
        name = f"{i:02d}"
        if i % 3 == 1:
            kind = list(bad)[(i // 3) % len(bad)]
            data = bad[kind]
            if data is None:
                buffer_path = folder / "tmp.jpg"
                draw_photo(900 + i, (200, 150)).save(buffer_path)
                data = buffer_path.read_bytes()[:400]
                buffer_path.unlink()
            (folder / f"{name} {kind}.jpg").write_bytes(data)
            continue
        path = folder / f"{name} good.{('jpg', 'png', 'webp')[i % 3]}"
        draw_photo(i, (160 + 8 * i, 120)).save(path)
        good.append(path)
    return good


def test_bad_files_interleaved_with_several_decode_workers(index_factory, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    good = interleaved_library(folder)
    idx = index_factory()
    report = idx.add(folder, workers=3, batch_size=3)
    assert len(report.failed) == 14 - len(good)
    check_index(idx.store.uri, good, model=SMALL_MODEL, store=idx.store)


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pixfind", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done


def target_args(backend: Backend) -> list[str]:
    args = ["--uri", backend.uri, "--collection", backend.collection]
    return args + (["--token", backend.token] if backend.token else [])


def test_default_backend_through_the_cli_stores_each_files_vector(
    backend: Backend, onnx_cache: Path, tmp_path: Path
) -> None:
    """`pixfind index` as a user runs it (PIXFIND_BACKEND unset: the exported towers on ONNX
    Runtime / OpenVINO), on Milvus Lite and on a Milvus server; then the library changes (new
    content under an old name, a rename, a deletion, a new file) and a second run follows it."""
    folder = tmp_path / "lib"
    good = interleaved_library(folder)
    write_large(folder, 50, "large.png")
    draw_photo(51, (1400, 1000)).save(folder / "draft.jpg", quality=90)  # decoded at reduced size
    env = cli_env(onnx_cache, PIXFIND_PRECISION="auto")  # as a user runs it: bf16 where the CPU computes it
    first = run_cli(env, "index", str(folder), *target_args(backend), "--workers", "2", "--batch-size", "4")
    precision = reported_precision(first.stderr)
    expected = [*map(str, good), str(folder / "large.png"), str(folder / "draft.jpg")]
    where = {"token": backend.token, "collection": backend.collection, "precision": precision}
    check_index(backend.uri, expected, model=SMALL_MODEL, **where)

    draw_photo(777, (200, 150)).save(good[0])  # same name, new picture
    os.utime(good[0], ns=(1, 2_000_000_000))  # even with an older mtime
    good[1].rename(folder / "renamed.png")
    good[2].unlink()
    draw_photo(778, (90, 90)).save(folder / "new.jpg")
    second = run_cli(env, "index", str(folder), *target_args(backend))
    assert "1 updated" in second.stderr and "1 moved" in second.stderr, second.stderr
    expected = [p for p in expected if Path(p).exists()] + [str(folder / "renamed.png"), str(folder / "new.jpg")]
    check_index(backend.uri, expected, model=SMALL_MODEL, **where)


def test_the_oracle_sees_a_wrong_or_stale_vector(index_factory, tmp_path: Path) -> None:
    """The check itself: a row given another file's vector, or left with an old picture's vector
    under a fresh record, is reported (the defects it exists to catch)."""
    from pixfind.pathkeys import key_of
    from pixfind.store import Row

    folder = tmp_path / "lib"
    photos = [folder / f"{i}.jpg" for i in range(3)]
    folder.mkdir()
    for i, path in enumerate(photos):
        draw_photo(i, (120, 90)).save(path)
    idx = index_factory()
    idx.add(folder)
    store = idx.store
    vectors = store.vectors_of([key_of(str(p)) for p in photos])

    def rewrite(path: Path, vector: list[float]) -> None:
        info = path.stat()
        with Image.open(path) as img:
            width, height = img.size
        store.write([Row(key_of(str(path)), vector, info.st_size, info.st_mtime_ns, width, height, "x")])

    rewrite(photos[0], vectors[key_of(str(photos[1]))])
    with pytest.raises(AssertionError, match=r"0\.jpg: cosine .* below"):
        check_index(store.uri, photos, model=SMALL_MODEL, store=store)
    rewrite(photos[0], vectors[key_of(str(photos[0]))])
    check_index(store.uri, photos, model=SMALL_MODEL, store=store)

    old = vectors[key_of(str(photos[2]))]
    draw_photo(99, (120, 90)).save(photos[2])  # the file changes; its row keeps the old vector
    rewrite(photos[2], old)
    with pytest.raises(AssertionError, match=r"2\.jpg: cosine"):
        check_index(store.uri, photos, model=SMALL_MODEL, store=store)
