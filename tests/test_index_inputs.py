"""What `pixfind index` is given: a file that is no image, a run that fails before storing
anything, an unknown URI scheme, a symlinked index, a home folder that cannot be written."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from conftest import draw_photo
from test_crash import pixfind_env
from test_known_gone import pixfind_cli, unprivileged

from pixfind.cli import main
from pixfind.config import ModelSpec
from pixfind.errors import IndexLockedError, PixfindError


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.err


def test_a_file_that_is_no_image_is_said_so(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list")
    uri = str(tmp_path / "idx" / "index.db")
    code, err = run(capsys, "index", str(notes), "--uri", uri)
    assert code == 1, err
    assert f"skipped {notes}: not an image file (extension '.txt'" in err
    assert "pixfind: error: nothing could be indexed" in err
    draw_photo(1, (64, 48)).save(tmp_path / "photo.jpg")
    code, err = run(capsys, "index", str(notes), str(tmp_path / "photo.jpg"), "--uri", uri)
    assert code == 0, err  # something was indexed: the failure is listed, the run succeeds
    assert "1 new" in err and "1 failed" in err and "not an image file" in err


@pytest.mark.parametrize(
    "flags",
    [["--model", "NoSuchModel-B-1"], ["--checkpoint", "no-such-weights.pt"]],
    ids=["unknown model", "no weights"],
)
def test_a_failed_run_creates_nothing(flags: list[str], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    draw_photo(1, (64, 48)).save(tmp_path / "photo.jpg")
    index_folder = tmp_path / "new" / "deeper"
    uri = str(index_folder / "index.db")
    code, err = run(capsys, "index", str(tmp_path / "photo.jpg"), "--uri", uri, *flags)
    assert code == 1 and err.startswith("pixfind: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "new").exists()  # no folder, no .db, no .lock, no engine lock
    code, err = run(capsys, "info", "--uri", uri)
    assert code == 1 and "no index at" in err


def test_nothing_to_store_creates_nothing(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "empty").mkdir()
    uri = tmp_path / "idx" / "index.db"
    code, err = run(capsys, "index", str(tmp_path / "empty"), "--uri", str(uri))
    assert code == 0, err
    assert not uri.parent.exists()


def test_one_writer_when_two_runs_create_one_file(tmp_path: Path) -> None:
    """Deferred creation keeps the lock guarantee: the lock is taken before the file is made,
    and a run that finds it held (or the file made meanwhile) is refused, or waits."""
    from pixfind.store import Store

    uri = str(tmp_path / "new" / "index.db")
    first, second = Store(uri, defer=True), Store(uri, defer=True)  # both planned on nothing
    assert not (tmp_path / "new").exists()
    try:
        first.ensure(ModelSpec("x", None), 4)  # makes the file, holding the lock
        with pytest.raises(IndexLockedError, match=f"pid {os.getpid()}"):
            second.ensure(ModelSpec("x", None), 4)
        assert not second.exists()  # still waiting to make it: usable, and empty
        with pytest.raises(IndexLockedError):
            Store(uri, defer=True)  # a third one, once the file exists
        first.close()
        second.ensure(ModelSpec("x", None), 4)  # free again: it opens what the first one made
        assert second.exists()
    finally:
        second.close()
        first.close()


def test_a_pending_run_is_refused_while_another_creates_the_file(tmp_path: Path) -> None:
    """The lock file exists and is held, the index file not yet: refused at once, not after a
    scan and a model load."""
    import fcntl

    from pixfind.store import Store

    uri = tmp_path / "index.db"
    with open(f"{uri}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        with pytest.raises(IndexLockedError, match="pid 4242"):
            Store(str(uri), defer=True)
    assert not uri.exists()


@pytest.mark.parametrize("uri", ["nonsense://foo", "file:///tmp/x.db", "HTTP://localhost:19530", "s3://bucket/x.db"])
def test_unknown_uri_schemes_are_refused_by_name(uri: str, tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    draw_photo(1, (64, 48)).save(tmp_path / "photo.jpg")
    scheme = uri.split(":")[0]
    for args in (["index", "photo.jpg"], ["search", "a dog"], ["info"], ["remove", "photo.jpg"]):
        code, err = run(capsys, *args, "--uri", uri)
        assert code == 1 and err.count("\n") == 1, err
        assert f"pixfind: error: unknown URI scheme '{scheme}' in '{uri}'" in err
    assert sorted(os.listdir(tmp_path)) == ["photo.jpg"]  # no folder named "nonsense:" made


def test_server_and_file_uris_are_told_apart() -> None:
    from pixfind.config import is_server_uri

    for uri in ("http://h:19530", "https://x.zillizcloud.com", "tcp://h:1", "grpc://h:1", "unix:/tmp/m.sock"):
        assert is_server_uri(uri)
    for uri in ("pixfind.db", "./a/b.db", "/abs/x.db", "~/x.db", "C:index.db", "my:index.db"):
        assert not is_server_uri(uri)
    with pytest.raises(PixfindError, match="unknown URI scheme 'ftp'"):
        is_server_uri("ftp://host/x.db")


def test_a_symlinked_index_shares_the_real_files_lock(tmp_path: Path) -> None:
    from pixfind.store import Store

    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "index.db"
    alias = tmp_path / "alias.db"
    alias.symlink_to(real)
    with Store(str(real)) as holder:
        holder.ensure(ModelSpec("x", None), 4)
        with pytest.raises(IndexLockedError, match=f"pid {os.getpid()}"):
            Store(str(alias))
    assert not (tmp_path / "alias.db.lock").exists()
    with Store(str(alias)) as through_link:  # and once free, the link opens the same index
        assert through_link.exists()
    assert (tmp_path / "real" / "index.db.lock").exists()


def test_index_with_a_home_folder_that_cannot_be_written(make_images, tmp_path: Path) -> None:
    """A service account or a locked-down container: Milvus Lite's engine keeps its mmap folder
    in $HOME/.cache/milvus and used to fail every write with `Mmap manager has not been init`."""
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    make_images(tmp_path / "photos", 3)
    data = tmp_path / "data"
    data.mkdir()
    env = {k: v for k, v in pixfind_env().items() if not k.startswith("XDG_")}
    env["HOME"] = str(home)
    env.pop("PIXFIND_CACHE_DIR")  # the default cache folder is in that home too
    env["PIXFIND_DATA_DIR"] = str(data)
    result = unprivileged(pixfind_cli("index", str(tmp_path / "photos")), env=env)
    assert result.returncode == 0, result.stderr
    assert "3 new" in result.stderr
    info = unprivileged(pixfind_cli("info", "--json"), env=env)
    assert json.loads(info.stdout)["images"] == 3
    assert os.listdir(home) == []  # nothing was (or could be) put there
