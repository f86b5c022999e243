"""``pixfind remove PATH...`` / ``ImageIndex.remove``: drop the entries of files and folders,
existing or not, named relatively, absolutely or through links; names escaped in filters."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pixfind.cli import main
from pixfind.errors import PixfindError
from pixfind.pathkeys import path_of


def stored(idx) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(path_of(key) for page in idx.store.iter_keys() for key in page)


def test_a_deleted_folders_entries_can_be_removed(index_factory, make_images, tmp_path: Path, monkeypatch) -> None:
    """`pixfind index` refuses a folder that is gone ("folder not found"): remove drops its
    entries, given relative or absolute, and leaves look-alike names alone."""
    lib = tmp_path / "lib"
    for i, name in enumerate(["a_b", "axb", "50%", "50x", "it's", 'say "hi"', "keep"]):
        make_images(lib / name, 2, start=10 * i)
    idx = index_factory()
    assert idx.add(lib).new == 14
    for name in ("a_b", "50%", "it's", 'say "hi"'):
        shutil.rmtree(lib / name)
    monkeypatch.chdir(lib)
    assert idx.remove("a_b") == 2  # relative, and `_` is no wildcard: axb stays
    assert idx.remove(str(lib / "50%")) == 2  # `%` is no wildcard: 50x stays
    assert idx.remove(lib / "it's", Path('say "hi"')) == 4
    assert stored(idx) == sorted(str(p) for p in lib.rglob("*.jpg"))
    assert idx.remove("a_b") == 0  # nothing left there: nothing else goes
    assert len(stored(idx)) == 6


def test_files_and_paths_through_links(index_factory, make_images, tmp_path: Path) -> None:
    real = tmp_path / "real"
    photos = make_images(real / "sub", 3)
    make_images(real / "other", 2, start=50)
    (tmp_path / "alias").symlink_to(real)
    idx = index_factory()
    assert idx.add(tmp_path / "alias").new == 5  # stored under the resolved folder
    assert idx.remove(tmp_path / "alias" / "sub" / photos[0].name) == 1  # a file, through the link
    assert idx.remove(tmp_path / "alias" / "sub") == 2  # a folder, through the link
    photos[0].parent.rename(tmp_path / "moved-away")
    assert stored(idx) == sorted(str(p) for p in (real / "other").iterdir())
    assert idx.remove("~/no/such/folder") == 0
    with pytest.raises(PixfindError, match="no path given"):
        idx.remove()


def test_remove_command(make_images, tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    uri = str(tmp_path / "index.db")
    make_images(tmp_path / "photos" / "2019", 3)
    make_images(tmp_path / "photos" / "2020", 2, start=9)
    assert main(["index", str(tmp_path / "photos"), "--uri", uri, "-q"]) == 0
    shutil.rmtree(tmp_path / "photos" / "2019")
    capsys.readouterr()
    assert main(["remove", str(tmp_path / "photos" / "2019"), "--uri", uri]) == 0
    assert capsys.readouterr().out.strip() == f"removed 3 images at or under {tmp_path / 'photos' / '2019'}"
    code = main(["remove", str(tmp_path / "photos" / "2019"), "--uri", uri])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("pixfind: error: nothing in the index at or under") and err.count("\n") == 1
    assert main(["info", "--uri", uri, "--json"]) == 0
    assert '"images": 2' in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert main(["remove", "photos", "--uri", uri]) == 0
    assert "removed 2 images at or under photos" in capsys.readouterr().out


def test_delete_paths_on_each_backend(backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The store's filter deletes the same rows on Milvus Lite and on a server."""
    from pixfind.config import ModelSpec
    from pixfind.pathkeys import key_of
    from pixfind.store import Row

    paths = ["/p/a_b/1.jpg", "/p/a_b/2.jpg", "/p/axb/3.jpg", "/p/a_b.jpg", "/p/50%/x.jpg", "/p/it's/y.jpg"]
    with backend.store() as store:
        store.ensure(ModelSpec("x", None), 4)
        store.write([Row(key_of(p), [1.0, 0, 0, 0], 1, 1, 1, 1, "f") for p in paths])
        assert store.delete_paths(["/p/a_b"]) == 2
        assert store.delete_paths(["/p/a_b.jpg", "/p/50%", "/p/it's/y.jpg", "/nothing"]) == 3
        assert sorted(path_of(k) for page in store.iter_keys() for k in page) == ["/p/axb/3.jpg"]
        assert store.count() == 1
