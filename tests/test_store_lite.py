"""The store on a Milvus Lite file: pixfind's lock, the file checks, the engine pixfind starts
and stops itself, the early read of an index opened to read, and the IVF index while serving."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_MODEL

from pixfind.config import ModelSpec, cache_dir
from pixfind.errors import PixfindError
from pixfind.store import Store, milvus


def test_a_second_process_on_the_same_file_is_told_who_holds_it(
    index_factory, make_images, lite_uri: str, tmp_path: Path
) -> None:
    from pixfind.errors import IndexLockedError

    index_factory().add(make_images(tmp_path / "p", 1)[0])  # the file is made, and locked
    with pytest.raises(IndexLockedError, match=f"pid {os.getpid()}"):
        Store(lite_uri)


def test_foreign_db_file_is_refused_and_left_intact(tmp_path: Path) -> None:
    foreign = tmp_path / "notes.db"
    foreign.write_bytes(b"my precious data" * 100)
    with pytest.raises(PixfindError, match="not a Milvus Lite index"):
        Store(str(foreign))
    assert foreign.read_bytes() == b"my precious data" * 100


def empty_lite_index(path: Path) -> str:
    """A Lite file holding an empty pixfind collection; returns its URI."""
    with Store(str(path)) as store:
        store.ensure(ModelSpec(SMALL_MODEL, None), 64)
    return str(path)


def test_a_lite_file_left_mid_write_by_a_crash_still_opens(tmp_path: Path) -> None:
    """A crash inside an SQLite write leaves a hot journal; a read-only look cannot roll it back,
    which once made pixfind call a real index "foreign or corrupt"."""
    import subprocess
    import sys

    from pixfind.store.lite_files import looks_like_lite

    uri = empty_lite_index(tmp_path / "crashed.db")
    crash_mid_write = (
        "import os, sqlite3, sys; con = sqlite3.connect(sys.argv[1], isolation_level=None); "
        "con.execute('PRAGMA cache_size=1'); con.execute('BEGIN IMMEDIATE'); "
        "con.execute('CREATE TABLE pixfind_test_t (x BLOB)'); "
        "[con.execute('INSERT INTO pixfind_test_t VALUES (randomblob(4096))') for _ in range(200)]; "
        "os._exit(9)"
    )
    subprocess.run([sys.executable, "-c", crash_mid_write, uri], check=False)
    assert Path(uri + "-journal").is_file()  # the hot journal of the interrupted write
    assert looks_like_lite(Path(uri))
    with Store(uri) as store:  # opens, with the interrupted write rolled back
        assert store.count() == 0
        assert store.info() is not None
    assert not Path(uri + "-journal").exists()


def test_a_lite_file_another_program_holds_is_refused(tmp_path: Path) -> None:
    """Milvus Lite locks ``.NAME.lock`` beside the file; when another program holds it, pixfind
    says so, and does not try a second start (milvus_lite's failed start deletes that lock file)."""
    import subprocess
    import sys

    uri = empty_lite_index(tmp_path / "held.db")
    hold = (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.lockf(f, fcntl.LOCK_EX); "
        "print(1, flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / ".held.db.lock")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"1"
        homes = set((cache_dir() / "milvus-lite").glob("engine-*"))
        with pytest.raises(PixfindError, match="a program other than pixfind has it open"):
            Store(uri)
        assert set((cache_dir() / "milvus-lite").glob("engine-*")) == homes  # the refused start left no folder
    finally:
        holder.kill()
        holder.wait()
    with Store(uri) as store:  # usable again once the other program is gone
        assert store.count() == 0


def run_python(code: str, *args: str) -> str:
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parent.parent / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


#: Prints "free" if another process can take the engine's lock on the file, else "held".
TRY_ENGINE_LOCK = (
    "import fcntl, sys; f = open(sys.argv[1], 'a')\n"
    "try:\n    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
    "except OSError:\n    print('held')"
)


def test_lite_engine_is_started_used_and_stopped_by_pixfind(tmp_path: Path) -> None:
    """pixfind's own start (no fixed wait, no milvus_lite registry): the engine holds the file
    while it runs, MilvusClient talks to its socket, and stop() frees the file and cleans up."""
    from pymilvus import MilvusClient

    from pixfind.store.lite_engine import start_engine

    db = tmp_path / "quick.db"
    engine = start_engine(str(db))
    assert engine is not None
    try:
        assert engine.uri.startswith("unix:") and Path(engine.socket_path).exists()
        assert run_python(TRY_ENGINE_LOCK, str(tmp_path / ".quick.db.lock")).strip() == "held"
        assert start_engine(str(db)) is None  # never two engines on one file in this process
        client = MilvusClient(uri=engine.uri)
        client.create_collection("c", dimension=4)
        assert client.has_collection("c")
        client.close()
    finally:
        engine.stop()
    assert not Path(engine.socket_path).exists()
    assert not (tmp_path / ".quick.db.lock").exists()  # as milvus_lite's own stop leaves it
    with Store(str(db)) as store:  # the file is free for the next opener, and kept its data
        assert store.client.has_collection("c")


def test_store_close_stops_its_engine(tmp_path: Path) -> None:
    uri = str(tmp_path / "closed.db")
    with Store(uri) as store:
        store.ensure(ModelSpec(SMALL_MODEL, None), 64)
        assert run_python(TRY_ENGINE_LOCK, str(tmp_path / ".closed.db.lock")).strip() == "held"
    assert not (tmp_path / ".closed.db.lock").exists()
    count = "import sys; from pixfind.store import Store; print(Store(sys.argv[1], create=False).count())"
    assert run_python(count, uri).strip() == "0"  # another process opens it at once


def test_lite_engine_that_dies_at_start_is_refused_and_unlocked(tmp_path: Path, monkeypatch) -> None:
    import dataclasses

    from pixfind.store import lite_engine

    real_command = lite_engine.engine_command
    monkeypatch.setattr(  # an engine that exits at once
        lite_engine, "engine_command", lambda key: dataclasses.replace(real_command(key), args=["false"])
    )
    db = tmp_path / "dies.db"
    assert lite_engine.start_engine(str(db)) is None
    assert run_python(TRY_ENGINE_LOCK, str(tmp_path / ".dies.db.lock")).strip() == "free"
    monkeypatch.undo()
    engine = lite_engine.start_engine(str(db))  # a later start is not refused as "running"
    assert engine is not None
    engine.stop()


def test_lite_engine_command_is_milvus_lites_own(tmp_path: Path) -> None:
    """pixfind starts the engine without importing milvus_lite, so it builds the command itself:
    it must stay the one milvus_lite's Server would run (compared through Server's public API)."""
    from milvus_lite.server import Server

    from pixfind.store.lite_engine import engine_command

    key = str((tmp_path / "same.db").resolve())
    ours, theirs = engine_command(key), Server(key)
    assert ours is not None
    milvus_bin, db_file, _, log_level, lock_path = theirs.args
    assert ours.args[0] == milvus_bin and Path(ours.args[0]).exists()
    assert ours.args[1] == str(db_file)
    assert ours.args[2].startswith("unix:") and ours.args[2].endswith(f"_{Path(key).name}.sock")
    assert ours.args[3:] == [log_level, lock_path] == [log_level, ours.lock_path]
    assert ours.env["LD_LIBRARY_PATH"].split(":")[0] == str(Path(milvus_bin).parent)
    assert ours.cwd == str(Path(key).parent)
    shutil.rmtree(ours.home)  # made for an engine that is not started here


def test_collection_requests_match_pymilvus_messages() -> None:
    """The early describe and load are sent as bytes built without pymilvus (not imported yet)."""
    from pymilvus.grpc_gen import milvus_pb2

    from pixfind.store.lite_engine import collection_request

    for name in ("pixfind", "x", "photos_2024", "c" * 200, "é" * 70):  # 200, 140 bytes: two-byte lengths
        request = collection_request(name)
        assert request == milvus_pb2.DescribeCollectionRequest(collection_name=name).SerializeToString()
        assert request == milvus_pb2.LoadCollectionRequest(collection_name=name).SerializeToString()


def test_index_opened_to_read_is_described_and_loaded_early(tmp_path: Path) -> None:
    """Opened with create=False (search, info, serve), a Lite index is described and starts
    loading before pymilvus is used; info() is what the normal describe gives."""
    from pymilvus.client.types import LoadState

    from pixfind.pathkeys import key_of
    from pixfind.store import Row

    uri = str(tmp_path / "early.db")
    with Store(uri) as store:
        store.ensure(ModelSpec(SMALL_MODEL, None), 64)
        store.write([Row(key_of("/p/a.jpg"), [1.0] + [0.0] * 63, 10, 20, 30, 40, "fp")])
        described = store.info()
    with Store(uri, create=False) as store:
        assert store._policy.early is not None
        store._policy.early._loading.result(timeout=30)  # the load asked for at start, no call from us
        assert store.client.get_load_state(store.collection)["state"] == LoadState.Loaded
        assert store.info() == described
        assert store.count() == 1
        store.drop()  # the early description is of a collection that is gone
        assert store.info() is None
    with Store(uri) as store:  # create=True (index): nothing asked early
        assert store._policy.early is None


def test_early_read_of_a_missing_collection(tmp_path: Path) -> None:
    uri = str(tmp_path / "other.db")
    with Store(uri, collection="first") as store:
        store.ensure(ModelSpec(SMALL_MODEL, None), 64)
    with Store(uri, collection="second", create=False) as store:
        assert store.info() is None
        assert store.count() == 0
    with Store(uri, collection="first", create=False) as store:
        assert store.info() is not None


def clustered_lite_index(uri: str, rows: int, seed: int) -> np.ndarray:
    """A Lite collection of ``rows`` clustered unit vectors at /p/NNNNN.jpg; returns the vectors."""
    from pixfind.pathkeys import key_of
    from pixfind.store import Row

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, 64))
    vectors = centres[rng.integers(0, 20, rows)] + 0.3 * rng.normal(size=(rows, 64))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with Store(uri) as store:
        store.ensure(ModelSpec(SMALL_MODEL, None), 64)
        store.write([Row(key_of(f"/p/{i:05d}.jpg"), v, 1, 1, 1, 1, f"{i:032x}") for i, v in enumerate(vectors)])
    return vectors


def test_serving_index_on_lite_is_switched_and_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pixfind serve` on a large Lite file searches an IVF index, and leaves the exact one behind."""

    monkeypatch.setattr(milvus, "LITE_SERVING_MIN_ROWS", 1000)
    uri = str(tmp_path / "big.db")
    vectors = clustered_lite_index(uri, 2000, seed=3)
    with Store(uri) as store:
        assert store.index_for_serving()
        assert store.index_type() == "IVF_FLAT"
        for i in range(0, 2000, 100):
            assert store.search([vectors[i]], limit=1)[0][0].path == f"/p/{i:05d}.jpg"
        store.restore_index()
        assert store.index_type() == "FLAT"
        assert store.count() == 2000
    with Store(uri) as reopened:
        assert reopened.index_type() == "FLAT"
        monkeypatch.setattr(milvus, "LITE_SERVING_MIN_ROWS", 5000)
        assert not reopened.index_for_serving()  # small collections stay exact
        assert reopened.index_type() == "FLAT"


def test_optimize_for_queries_switches_lite_to_ivf_until_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python API's opt-in for long-lived processes: IVF while open, exact index on file after."""
    from pixfind import ImageIndex

    uri = str(tmp_path / "big.db")
    clustered_lite_index(uri, 1500, seed=5)
    monkeypatch.setattr(milvus, "LITE_SERVING_MIN_ROWS", 2000)
    with ImageIndex(uri=uri, create=False) as index:
        assert not index.optimize_for_queries()  # under the threshold: stays exact
        assert index.store.index_type() == "FLAT"
    monkeypatch.setattr(milvus, "LITE_SERVING_MIN_ROWS", 1000)
    index = ImageIndex(uri=uri, create=False)
    try:
        exact = [h.path for h in index.similar("/p/00007.jpg", limit=5)]
        assert index.optimize_for_queries() and index.optimize_for_queries()  # once, then a no-op
        assert index.store.index_type() == "IVF_FLAT"
        approximate = [h.path for h in index.similar("/p/00007.jpg", limit=5)]
        assert "/p/00007.jpg" not in exact + approximate  # never the file itself
        assert len(set(approximate) & set(exact)) >= 4
    finally:
        index.close()
    with Store(uri, create=False) as reopened:
        assert reopened.index_type() == "FLAT"
        assert reopened.count() == 1500


def test_an_ivf_index_left_by_a_killed_server_is_adopted_then_restored(
    make_images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pixfind serve` killed before restoring FLAT leaves IVF on file: the next serve uses it (and
    restores FLAT on exit), the next index run restores FLAT."""
    from pixfind import ImageIndex

    monkeypatch.setattr(milvus, "LITE_SERVING_MIN_ROWS", 1000)
    uri = str(tmp_path / "big.db")
    clustered_lite_index(uri, 1200, seed=7)
    for restart in ("serve", "index"):
        with Store(uri) as store:
            assert store.index_for_serving()  # ... and the process dies without restore_index()
        with Store(uri) as store:
            assert store.index_type() == "IVF_FLAT"
        with ImageIndex(uri=uri, create=False) as index:
            if restart == "serve":
                assert index.optimize_for_queries()  # adopted, not rebuilt
                assert index.store.index_type() == "IVF_FLAT"
            else:
                folder = tmp_path / "empty"
                folder.mkdir()
                index.add(folder)
        with Store(uri) as store:
            assert store.index_type() == "FLAT"
            assert store.count() == 1200


def test_each_engine_works_in_a_folder_of_its_own(tmp_path: Path) -> None:
    """Engines share nothing on disk but their index file: one stopping (it empties its mmap
    folder) must not pull the folder from under another still writing, which then failed every
    write with "Mmap manager has not been init" (seen when a killed run's engine stopped while
    the next run started)."""
    from pixfind.store import lite_engine

    spec, rng = ModelSpec(SMALL_MODEL, None), np.random.default_rng(0)
    first, second = Store(str(tmp_path / "first.db")), Store(str(tmp_path / "second.db"))
    try:
        homes = []
        for store in (first, second):
            store.ensure(spec, 8)
            store.write(rows(rng, "a", 20))
            store.flush()
            homes.append(_engine_home_of(store))
        assert homes[0] != homes[1] and all(Path(home, ".cache").is_dir() for home in homes)
        first.close()
        assert not Path(homes[0]).exists()  # removed with its engine
        for batch in range(3):  # the other engine keeps writing and searching
            second.write(rows(rng, f"b{batch}", 20))
            second.flush()
        assert second.count() == 80
    finally:
        first.close()
        second.close()
    assert not Path(homes[1]).exists()
    stale = Path(homes[1]).parent / "engine-stale"  # left by a run whose engine was killed
    stale.mkdir()
    (stale / "pid").write_text("999999999")
    os.utime(stale, (0, 0))
    shutil.rmtree(lite_engine.engine_home())  # the next start sweeps it
    assert not stale.exists()


def rows(rng: np.random.Generator, prefix: str, n: int) -> list:  # type: ignore[type-arg]
    from pixfind.store import Row

    vectors = rng.standard_normal((n, 8)).astype(np.float32)
    return [Row(f"/photos/{prefix}-{i}.jpg", vectors[i], 1, 1, 1, 1, "f") for i in range(n)]


def _engine_home_of(store: Store) -> str:
    """The HOME the store's engine process was started with (from /proc)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if str(Path(store.uri).resolve()).encode() in cmdline:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                return next(v[5:].decode() for v in environ if v.startswith(b"HOME="))
        except (OSError, StopIteration):
            continue
    raise AssertionError(f"no engine process for {store.uri}")
