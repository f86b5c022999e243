"""Each ingest stage on its own, as a runner other than the local one would call it.

The expectations come from outside the stages: open_clip's reference encoding (tests/oracle.py)
for vectors and the picture a file shows, BLAKE3 of the file's bytes for the content hash,
``os.stat`` for size and mtime, and what the test itself did to the files for the plan.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import blake3
import numpy as np
import pytest
from oracle import EXACT_MIN_COSINE, picture, reference

from pixfind.ingest.content import fingerprint
from pixfind.ingest.pipeline import Decoded, Failed, decode_item, embed_batch, write_rows
from pixfind.ingest.plan import WorkItem, known_gone, plan
from pixfind.ingest.report import IndexReport
from pixfind.ingest.scan import FileEntry
from pixfind.pathkeys import key_of
from pixfind.store import Row, Store


def work_item(path: Path, is_update: bool = False) -> WorkItem:
    info = path.stat()
    return WorkItem(FileEntry(str(path), info.st_size, info.st_mtime_ns), key_of(str(path)), is_update)


class CountingTurn:
    """A ``turn`` that records how often a stage entered it."""

    def __init__(self) -> None:
        self.entered = 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self.entered += 1
        yield


# -- decode -------------------------------------------------------------------------------------


def test_decode_of_a_good_file_gives_the_models_pixels_and_the_files_record(
    small_encoder, make_images, tmp_path: Path
) -> None:
    (photo,) = make_images(tmp_path, 1, size=(320, 240))  # shorter side under 2x draft: no reduction
    turn = CountingTurn()
    decoded = decode_item(work_item(photo), small_encoder.preprocess, small_encoder.draft_side, turn)
    assert isinstance(decoded, Decoded)
    expected = small_encoder.preprocess(picture(photo))  # the oracle's own decoding of the file
    assert np.array_equal(decoded.pixels, expected)  # the model's own preprocess of that picture
    info = os.stat(photo)
    assert (decoded.width, decoded.height) == (320, 240)
    assert (decoded.size, decoded.mtime_ns) == (info.st_size, info.st_mtime_ns)
    assert decoded.content == "blake3:" + blake3.blake3(photo.read_bytes()).hexdigest()
    assert decoded.fingerprint == fingerprint(str(photo), info.st_size)
    assert decoded.item.key == key_of(str(photo))
    assert turn.entered == 1
    again = pickle.loads(pickle.dumps(decoded))  # what a distributed runner ships between workers
    assert np.array_equal(again.pixels, decoded.pixels) and again.content == decoded.content


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncate", "truncated image"),
        ("text", "not an image (unknown or corrupt format)"),
        ("vanish", "file vanished before it could be read"),
    ],
)
def test_decode_of_a_bad_file_is_a_failure_with_its_reason(
    damage: str, reason: str, small_encoder, make_images, tmp_path: Path
) -> None:
    (photo,) = make_images(tmp_path, 1)
    item = work_item(photo)
    if damage == "truncate":
        photo.write_bytes(photo.read_bytes()[: photo.stat().st_size // 2])
    elif damage == "text":
        photo.write_text("not a picture at all\n")
    else:
        photo.unlink()
    result = decode_item(item, small_encoder.preprocess, small_encoder.draft_side)
    assert result == Failed(str(photo), reason)
    assert pickle.loads(pickle.dumps(result)) == result


# -- embed --------------------------------------------------------------------------------------


def test_embed_gives_each_file_its_own_reference_vector(small_encoder, make_images, tmp_path: Path) -> None:
    photos = make_images(tmp_path, 3)
    batch = [decode_item(work_item(p), small_encoder.preprocess, small_encoder.draft_side) for p in photos]
    assert all(isinstance(d, Decoded) for d in batch)
    turn = CountingTurn()
    rows = embed_batch(small_encoder, batch, turn)  # type: ignore[arg-type]
    assert turn.entered == 1  # one model call for the whole batch
    assert [row.key for row in rows] == [key_of(str(p)) for p in photos]
    oracle = reference(small_encoder.spec.name)
    for photo, row in zip(photos, rows, strict=True):
        vector = np.asarray(row.vector, dtype=np.float64)
        assert abs(np.linalg.norm(vector) - 1) < 1e-3
        cosines = [float(vector @ oracle.embed(p)) for p in photos]
        assert cosines[photos.index(photo)] >= EXACT_MIN_COSINE
        assert cosines.index(max(cosines)) == photos.index(photo)  # its own file's, not a neighbour's
        info = photo.stat()
        assert (row.size, row.mtime_ns, row.width, row.height) == (info.st_size, info.st_mtime_ns, 320, 240)
        assert row.content == "blake3:" + blake3.blake3(photo.read_bytes()).hexdigest()


# -- write --------------------------------------------------------------------------------------


def test_write_then_lookup_finds_every_row(small_encoder, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rows = [
        Row(
            key_of(f"/photos/{n}.jpg"),
            rng.normal(size=small_encoder.dim).astype(np.float32),
            100 + n,
            7 + n,
            4,
            3,
            f"fp{n}",
        )
        for n in range(5)
    ]
    with Store(str(tmp_path / "i.db")) as store:
        store.ensure(small_encoder.spec, small_encoder.dim)
        assert write_rows(store, []) == 0 and store.count() == 0
        assert write_rows(store, rows) == 5
        found = store.lookup([row.key for row in rows] + [key_of("/photos/missing.jpg")])
        assert sorted(found) == sorted(row.key for row in rows)
        for row in rows:
            assert (found[row.key].size, found[row.key].mtime_ns, found[row.key].fingerprint) == (
                row.size,
                row.mtime_ns,
                row.fingerprint,
            )
        vectors = store.vectors_of([rows[2].key])
        assert np.allclose(vectors[rows[2].key], unit(np.asarray(rows[2].vector)), atol=1e-6)
        assert write_rows(store, rows[:1]) == 1 and store.count() == 5  # written twice: replaced


# -- plan ---------------------------------------------------------------------------------------


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def stored_row(path: Path, vector: np.ndarray) -> Row:
    """The row an earlier run would have written for ``path`` as it is now."""
    info, data = path.stat(), path.read_bytes()
    digest = "blake3:" + blake3.blake3(data).hexdigest()
    return Row(
        key_of(str(path)),
        vector,
        info.st_size,
        info.st_mtime_ns,
        320,
        240,
        fingerprint(str(path), info.st_size),
        digest,
    )


def test_plan_sorts_files_into_unchanged_changed_new_moved_copied_and_gone(
    small_encoder, make_images, tmp_path: Path
) -> None:
    library = tmp_path / "lib"
    same, changed, to_move, original, gone = make_images(library, 5)
    rng = np.random.default_rng(2)
    vectors = {p: unit(rng.normal(size=small_encoder.dim)) for p in (same, changed, to_move, original, gone)}
    with Store(str(tmp_path / "i.db")) as store:
        store.ensure(small_encoder.spec, small_encoder.dim)
        store.write([stored_row(p, v) for p, v in vectors.items()])
        # what happened to the library since that run:
        changed.write_bytes(changed.read_bytes() + b"edited")
        moved = library / "moved.jpg"
        to_move.rename(moved)
        copy = library / "copy.jpg"
        shutil.copy2(original, copy)
        gone.unlink()
        (new,) = make_images(library, 1, start=50)
        report = IndexReport()
        counts: list[int] = []
        chunks = list(
            plan(
                store,
                [str(library)],
                report,
                compare=True,
                stop=threading.Event(),
                hash_workers=2,
                found=counts.append,
            )
        )
        assert counts == [6]  # same, changed, moved, original, copy, new
        assert len(chunks) == 1
        (chunk,) = chunks
        assert {(item.entry.path, item.is_update) for item in chunk.embed} == {(str(changed), True), (str(new), False)}
        reused = {row.key: row for row in chunk.reused}
        assert sorted(reused) == sorted([key_of(str(moved)), key_of(str(copy))])
        assert np.allclose(reused[key_of(str(moved))].vector, vectors[to_move], atol=1e-6)
        assert np.allclose(reused[key_of(str(copy))].vector, vectors[original], atol=1e-6)
        assert reused[key_of(str(copy))].size == copy.stat().st_size
        assert chunk.moved_from == [key_of(str(to_move))]
        assert (report.unchanged, report.moved, report.copied) == (2, 1, 1)  # same and original
        assert store.count() == 5  # planning only reads
        # the move's old name is deleted by the runner before the prune; the removed file's row
        # and the moved file's old one are both known to be gone:
        assert sorted(known_gone(store, str(library), report)) == sorted([key_of(str(gone)), key_of(str(to_move))])
        assert known_gone(store, str(same), report) == []  # a single file named: nothing to prune


def test_a_plan_without_rows_to_compare_embeds_every_file(make_images, tmp_path: Path) -> None:
    photos = make_images(tmp_path / "lib", 3)
    with Store(str(tmp_path / "i.db")) as store:
        report = IndexReport()
        folders, found = [str(tmp_path / "lib")], []
        stop = threading.Event()
        chunks = list(plan(store, folders, report, compare=False, stop=stop, hash_workers=1, found=found.append))
    assert found == [3]
    embed = [item for chunk in chunks for item in chunk.embed]
    assert [item.entry.path for item in embed] == [str(p) for p in photos]
    assert not any(item.is_update for item in embed)
    assert report.roots_read == 1 and report.unchanged == 0
