"""A stored vector is reused for another path only when the two files' whole contents are equal.

The cheap fingerprint (size, first and last 64 KiB) only finds candidates: two different images
can share it. The oracle for what a file's vector must be is the model's own encoding of that
file, computed here independently of the index.
"""

from __future__ import annotations

import builtins
import os
import shutil
from pathlib import Path

import blake3
import numpy as np
from PIL import Image

from pixfind.ingest.decode import load_image
from pixfind.pathkeys import key_of


def own_vector(encoder, path: Path) -> np.ndarray:  # type: ignore[no-untyped-def]
    """What the model makes of the file, outside the index."""
    image = load_image(path, min_side=encoder.draft_side).image
    vector = encoder.encode_images(encoder.preprocess(image)[None])[0]
    return vector / np.linalg.norm(vector)


def stored_vector(idx, path: Path) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(idx.store.vectors_of([key_of(str(path))])[key_of(str(path))], dtype=np.float32)


def stored_record(idx, path: Path) -> dict:  # type: ignore[no-untyped-def]
    rows = idx.store.client.query(idx.store.collection, filter=f'path == "{key_of(str(path))}"', output_fields=["meta"])
    return rows[0]["meta"]


def twin_bmps(folder: Path) -> tuple[Path, Path]:
    """Two 600x600 BMPs of one size whose first and last 64 KiB are equal: only the middle
    differs (a band of other pixels), so their fingerprints are equal."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (600, 600, 3), dtype=np.uint8)
    other = pixels.copy()
    other[200:400] = rng.integers(0, 256, (200, 600, 3), dtype=np.uint8)
    a, b = folder / "a.bmp", folder / "b.bmp"
    Image.fromarray(pixels).save(a)
    Image.fromarray(other).save(b)
    data_a, data_b = a.read_bytes(), b.read_bytes()
    block = 64 * 1024
    assert len(data_a) == len(data_b) and data_a != data_b
    assert data_a[:block] == data_b[:block] and data_a[-block:] == data_b[-block:]
    return a, b


def test_a_different_image_with_the_same_fingerprint_is_embedded(index_factory, small_encoder, tmp_path: Path) -> None:
    """Measured before: b was taken for a "move" of a, stored with a's vector, and
    `search --similar a` scored b at 1.0."""
    a, b = twin_bmps(tmp_path / "src")
    library = tmp_path / "lib"
    library.mkdir()
    shutil.copy2(a, library / "a.bmp")
    idx = index_factory()
    assert idx.add(library).new == 1
    shutil.copy2(b, library / "b.bmp")
    report = idx.add(library)
    assert (report.new, report.moved) == (1, 0)
    assert report.copied == 0
    va, vb = own_vector(small_encoder, a), own_vector(small_encoder, b)
    assert float(stored_vector(idx, library / "b.bmp") @ vb) > 0.9999
    hits = {h.path: h.score for h in idx.similar(str(library / "a.bmp"), limit=2)}
    assert abs(hits[str(library / "b.bmp")] - float(va @ vb)) < 1e-3  # their own similarity, not 1.0
    assert float(va @ vb) < 0.999


def test_a_copy_reuses_the_vector_and_is_reported_as_copied(
    index_factory, small_encoder, make_images, tmp_path: Path
) -> None:
    library = tmp_path / "lib"
    first, second = make_images(library, 2)
    idx = index_factory()
    idx.add(library)
    shutil.copy2(first, library / "copy.jpg")
    report = idx.add(library)
    assert (report.copied, report.moved, report.new, report.embedded, report.removed) == (1, 0, 0, 0, 0)
    assert float(stored_vector(idx, library / "copy.jpg") @ own_vector(small_encoder, first)) > 0.9999
    assert idx.info()["images"] == 3  # the original stays
    second.rename(library / "renamed.jpg")
    report = idx.add(library)
    assert (report.moved, report.copied, report.new, report.removed) == (1, 0, 0, 0)
    renamed = own_vector(small_encoder, library / "renamed.jpg")
    assert float(stored_vector(idx, library / "renamed.jpg") @ renamed) > 0.9999
    assert report.to_dict()["moved"] == 1 and report.to_dict()["copied"] == 0


def test_the_whole_contents_hash_is_recorded_from_the_bytes_read_once(
    index_factory, make_images, tmp_path: Path, monkeypatch
) -> None:
    """Each file is opened once when embedded: hashed and decoded from the same bytes."""
    photos = make_images(tmp_path / "lib", 3)
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def counting_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(os.fspath(file)) if isinstance(file, (str, Path)) else None
        return real_open(file, *args, **kwargs)

    def counting_os_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(os.fspath(path))
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(os, "open", counting_os_open)
    idx = index_factory()
    assert idx.add(tmp_path / "lib").new == 3
    monkeypatch.undo()
    for photo in photos:
        assert opened.count(str(photo)) == 1, (photo, opened.count(str(photo)))
        record = stored_record(idx, photo)
        assert record["content"] == "blake3:" + blake3.blake3(photo.read_bytes()).hexdigest()
        assert record["size"] == photo.stat().st_size


def test_rows_without_a_content_hash_never_lend_their_vector(index_factory, make_images, tmp_path: Path) -> None:
    """A row from before content hashes (an older index): its file's copy is embedded, not
    trusted on the fingerprint alone."""
    from pixfind.ingest.content import fingerprint
    from pixfind.store import Row

    library = tmp_path / "lib"
    (photo,) = make_images(library, 1)
    idx = index_factory()
    idx.add(library)
    (row,) = idx.store.client.query(idx.store.collection, filter='path != ""', output_fields=["path", "vector", "meta"])
    meta = row["meta"]
    assert meta["fingerprint"] == fingerprint(str(photo), photo.stat().st_size)
    old = Row(
        row["path"], row["vector"], meta["size"], meta["mtime_ns"], meta["width"], meta["height"], meta["fingerprint"]
    )
    idx.store.write([old])  # as an older pixfind wrote it: no content hash
    assert "content" not in stored_record(idx, photo)
    shutil.copy2(photo, library / "copy.jpg")
    report = idx.add(library)
    assert (report.new, report.moved) == (1, 0)
    assert report.copied == 0
    assert stored_record(idx, library / "copy.jpg")["content"].startswith("blake3:")
