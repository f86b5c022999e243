"""Bad configuration: foreign collections and files, dimension mismatches, unwritable places and a
full disk each give one clear line, and whatever was stored before is left intact."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import draw_photo

from pixfind.cli import main
from pixfind.config import ModelSpec
from pixfind.errors import PixfindError, StoreError


def release(uri: str) -> None:
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(str(Path(uri).absolute()))


def raw_client(uri: str):  # type: ignore[no-untyped-def]
    from pymilvus import MilvusClient

    return MilvusClient(uri)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code not in (0, 70), err  # a handled error, not an internal one
    assert err.startswith("pixfind: error: ") and err.strip().count("\n") == 0, err
    assert "Traceback" not in out + err
    return err


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    draw_photo(1, (64, 48)).save(folder / "a.jpg")
    return folder


def test_collection_made_by_another_tool_is_left_alone(tmp_path: Path, photos: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    uri = str(tmp_path / "shared.db")
    client = raw_client(uri)
    client.create_collection("pixfind", dimension=8)  # quick setup: int id, 8-d vector, no record
    client.insert("pixfind", [{"id": i, "vector": [0.1] * 8} for i in range(3)])
    client.close()
    release(uri)
    err = one_line_error(capsys, "index", str(photos), "--uri", uri)
    assert "was not created by pixfind" in err and "--collection" in err
    err = one_line_error(capsys, "search", "a dog", "--uri", uri)
    assert "was not created by pixfind" in err
    # another collection name works beside it, and the foreign one keeps its rows
    assert main(["index", str(photos), "--uri", uri, "--collection", "mine"]) == 0
    capsys.readouterr()
    release(uri)
    client = raw_client(uri)
    assert client.query("pixfind", filter="", output_fields=["count(*)"])[0]["count(*)"] == 3
    client.close()
    release(uri)


def test_vector_dimension_unlike_the_record_is_refused(tmp_path: Path, photos: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from pymilvus import DataType, MilvusClient

    from pixfind.store import CollectionInfo

    uri = str(tmp_path / "dim.db")
    record = CollectionInfo(ModelSpec("ViT-S-32", None), dim=384, schema=1).to_description()
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False, description=record)
    schema.add_field("path", DataType.VARCHAR, is_primary=True, max_length=512)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=512)  # not what the record says
    for name in ("size", "mtime_ns"):
        schema.add_field(name, DataType.INT64)
    for name in ("width", "height"):
        schema.add_field(name, DataType.INT32)
    schema.add_field("fingerprint", DataType.VARCHAR, max_length=64)
    client = raw_client(uri)
    index = client.prepare_index_params()
    index.add_index("vector", index_type="FLAT", metric_type="COSINE")
    client.create_collection("pixfind", schema=schema, index_params=index)
    client.close()
    release(uri)
    err = one_line_error(capsys, "index", str(photos), "--uri", uri)
    assert "dimension 384 but stores dimension 512" in err
    err = one_line_error(capsys, "search", "a dog", "--uri", uri)  # described early, before pymilvus
    assert "dimension 384 but stores dimension 512" in err


def test_foreign_sqlite_database_is_not_touched(tmp_path: Path, photos: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    db = tmp_path / "notes.db"
    with contextlib.closing(sqlite3.connect(db)) as con:
        con.execute("CREATE TABLE notes (text)")
        con.execute("INSERT INTO notes VALUES ('precious')")
        con.commit()
    before = digest(db)
    err = one_line_error(capsys, "index", str(photos), "--uri", str(db))
    assert "not a Milvus Lite index" in err
    assert digest(db) == before  # Milvus Lite would have added its tables to it


def test_damaged_index_file_is_refused_and_kept(tmp_path: Path, photos: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from pixfind.store import Row, Store

    good = tmp_path / "good.db"
    with Store(str(good)) as store:
        store.ensure(ModelSpec("x", None), 8)
        store.write([Row(f"/p/{i}", [random.random() for _ in range(8)], 1, 1, 1, 1, "f") for i in range(3000)])
    release(str(good))
    cut = tmp_path / "cut.db"
    shutil.copy(good, cut)
    with cut.open("r+b") as fh:
        fh.truncate(cut.stat().st_size // 2)
    before = digest(cut)
    err = one_line_error(capsys, "info", "--uri", str(cut))
    assert "not a Milvus Lite index (foreign or corrupt file)" in err
    assert digest(cut) == before


@pytest.mark.parametrize(
    ("make_uri", "expected"),
    [
        (lambda tmp: str(tmp / "a-file" / "index.db"), "cannot create folder"),  # parent is a file
        (lambda tmp: str(tmp / "folder.db"), "is a folder, not an index file"),
        (lambda tmp: str(tmp / "my index.db"), "cannot use the file name 'my index.db'"),
        (lambda tmp: str(tmp / ("x" * 40 + ".db")), "at most 36"),
        (lambda tmp: "/proc/pixfind/index.db", "cannot create folder /proc/pixfind"),
    ],
)
def test_unusable_index_locations(make_uri, expected: str, tmp_path: Path, photos: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "folder.db").mkdir()
    err = one_line_error(capsys, "index", str(photos), "--uri", make_uri(tmp_path))
    assert expected in err


@contextlib.contextmanager
def small_filesystem(where: Path, size: str, *options: str) -> Iterator[Path]:
    where.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip() or 'mount failed'})")
    try:
        yield where
    finally:
        release(str(where / "index.db"))
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_read_only_location(tmp_path: Path, photos: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    with small_filesystem(tmp_path / "ro", "1m", "ro") as ro:
        err = one_line_error(capsys, "index", str(photos), "--uri", str(ro / "index.db"))
        assert "not writable" in err or "Read-only" in err


def test_full_disk_says_so_and_keeps_what_was_written(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from pixfind.store import Row, Store, policies

    monkeypatch.setattr(policies, "LITE_CALL_TIMEOUT_S", 3)  # give up on the full disk sooner
    with small_filesystem(tmp_path / "small", "2m") as small:
        uri = str(small / "index.db")
        written = 0
        with Store(uri) as store:
            store.ensure(ModelSpec("x", None), 512)
            with pytest.raises(StoreError, match="no space left for index") as caught:
                for batch in range(100):
                    rows = [Row(f"/p/{batch}/{i}", [random.random()] * 512, 1, 1, 1, 1, "f") for i in range(100)]
                    store.write(rows)
                    written += len(rows)
            assert "\n" not in str(caught.value) and "everything written before is kept" in str(caught.value)
        release(uri)
        assert written > 0
        with Store(uri) as store:
            assert store.count() == written  # every acknowledged row survived; the failed batch is absent
        release(uri)
        # and a fresh run on the full disk is one clear line too
        draw_photo(1, (64, 48)).save(tmp_path / "p.jpg")
        err = one_line_error(capsys, "index", str(tmp_path / "p.jpg"), "--uri", uri, "--collection", "more")
        assert "no space left" in err or "Milvus error" in err
        assert json.loads(main_json(capsys, "info", "--uri", uri))["images"] == written


def main_json(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = main([*args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_store_errors_are_pixfind_errors() -> None:
    assert issubclass(StoreError, PixfindError)
