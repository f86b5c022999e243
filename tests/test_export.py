"""``pixfind export`` / ``ImageIndex.export``: one Parquet row per stored image, with the vector
and record that are stored (read back by the oracle's own query, not by the export's code path),
``--under`` restricting, and no half-written or replaced file when it fails or is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import cli_env
from oracle import stored_rows


@pytest.fixture
def indexed(index_factory, make_images, tmp_path: Path):  # type: ignore[no-untyped-def]
    """An open index of 5 images in ``a/`` and 3 in ``b/``."""
    make_images(tmp_path / "a", 5)
    make_images(tmp_path / "b", 3, start=5)
    idx = index_factory()
    idx.add(tmp_path / "a", tmp_path / "b")
    return idx


def test_export_has_one_row_per_image_with_the_stored_vector_and_record(indexed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "out" / "vectors.parquet"
    target.parent.mkdir()
    report = indexed.export(target)
    expected = stored_rows(indexed.store.uri, store=indexed.store)
    table = pq.read_table(target)
    assert report.rows == table.num_rows == len(expected) == 8
    frame = table.to_pandas()
    assert sorted(frame["path"]) == sorted(expected)
    for row in frame.itertuples():
        stored = expected[row.path]
        vector = np.asarray(row.vector)
        assert vector.dtype == np.float32 and vector.shape == (384,)
        assert np.array_equal(vector, stored.vector.astype(np.float32))  # exactly the stored floats
        assert abs(float(np.linalg.norm(vector.astype(np.float64))) - 1.0) < 1e-5
        assert (row.size, row.mtime_ns, row.width, row.height) == (
            stored.size,
            stored.mtime_ns,
            stored.width,
            stored.height,
        )
        assert row.size == os.stat(row.path).st_size
        assert row.content.startswith("blake3:")
        assert os.fsdecode(row.path_bytes) == row.path
    about = table.schema.metadata[b"pixfind"].decode()
    assert '"model": "ViT-S-32"' in about and '"dim": 384' in about


def test_under_restricts_the_export(indexed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "b.parquet"
    assert indexed.export(target, under=str(tmp_path / "b")).rows == 3
    paths = pq.read_table(target, columns=["path"]).column("path").to_pylist()
    assert sorted(paths) == sorted(str(p) for p in (tmp_path / "b").iterdir())


def test_existing_output_is_refused_unless_forced(indexed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pixfind.errors import PixfindError

    target = tmp_path / "keep.parquet"
    target.write_bytes(b"a file the user wants")
    with pytest.raises(PixfindError, match="already exists: pass --force"):
        indexed.export(target)
    assert target.read_bytes() == b"a file the user wants"
    indexed.export(target, force=True)
    assert pq.read_table(target).num_rows == 8


def test_a_failed_export_leaves_no_file_and_keeps_the_old_one(indexed, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The store fails after the first batch (a server that went away): nothing half-written."""
    import pixfind.parquet as parquet
    from pixfind.errors import StoreError

    real = parquet.iter_records

    def failing(store, folder=None, batch=0):  # type: ignore[no-untyped-def]
        pages = real(store, folder, batch=2)
        yield next(pages)
        raise StoreError("lost connection to Milvus")

    monkeypatch.setattr(parquet, "iter_records", failing)
    fresh, kept = tmp_path / "out" / "new.parquet", tmp_path / "out" / "old.parquet"
    fresh.parent.mkdir()
    kept.write_bytes(b"previous export")
    for target in (fresh, kept):
        with pytest.raises(StoreError):
            indexed.export(target, force=True)
    assert sorted(p.name for p in fresh.parent.iterdir()) == ["old.parquet"]
    assert kept.read_bytes() == b"previous export"


def test_names_that_are_not_utf8_keep_their_bytes(index_factory, make_images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "pics"
    (image,) = make_images(folder, 1)
    raw = os.fsencode(folder) + b"/caf\xe9\x1b[2J.jpg"
    os.rename(image, raw)
    idx = index_factory()
    idx.add(folder)
    idx.export(tmp_path / "out.parquet")
    row = pq.read_table(tmp_path / "out.parquet").to_pylist()[0]
    assert row["path_bytes"] == raw
    assert row["path"] == os.fsdecode(raw).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def test_cli_export_is_read_by_pandas(index_factory, make_images, tmp_path: Path, lite_uri: str) -> None:  # type: ignore[no-untyped-def]
    import pandas as pd

    make_images(tmp_path / "pics", 3)
    with index_factory() as idx:  # closed before the CLI opens the Lite file
        idx.add(tmp_path / "pics")
    target = tmp_path / "v.parquet"
    run = _cli("export", str(target), "--uri", lite_uri)
    assert run.returncode == 0, run.stderr
    assert f"exported 3 images to {target}" in run.stderr
    assert len(pd.read_parquet(target)) == 3
    again = _cli("export", str(target), "--uri", lite_uri)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        f"pixfind: error: {target} already exists: pass --force to replace it, or choose another name"
    ]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pixfind", *args], env=cli_env(), capture_output=True, text=True, timeout=300
    )


def test_export_on_each_backend(backend, small_encoder, make_images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """One row per image with the stored vector, from Milvus Lite and from a Milvus server."""
    from pixfind.api import ImageIndex
    from pixfind.config import ModelSpec

    make_images(tmp_path / "pics", 4)
    with ImageIndex(
        uri=backend.uri,
        token=backend.token,
        collection=backend.collection,
        model=ModelSpec("ViT-S-32", None),
        encoder=small_encoder,
    ) as idx:
        idx.add(tmp_path / "pics")
        assert idx.export(tmp_path / "out.parquet").rows == 4
        expected = stored_rows(backend.uri, backend.token, backend.collection, store=idx.store)
    frame = pq.read_table(tmp_path / "out.parquet").to_pandas()
    assert sorted(frame["path"]) == sorted(expected)
    for row in frame.itertuples():
        assert np.array_equal(np.asarray(row.vector), expected[row.path].vector.astype(np.float32))


def test_without_pyarrow_the_export_says_how_to_install_it(indexed, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from pixfind.errors import PixfindError

    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # what an install without the extra does
    with pytest.raises(PixfindError, match=r"^pixfind export needs pyarrow: pip install 'pixfind\[export\]'"):
        indexed.export(tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()
