"""Indexing into a real Milvus Lite file: incremental runs, bad files, moves, filters, models."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_MODEL, draw_photo
from oracle import check_index

from pixfind.config import ModelSpec
from pixfind.errors import ModelMismatchError, PixfindError
from pixfind.pathkeys import key_of, path_of


def stored_paths(idx) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(path_of(key) for page in idx.store.iter_keys() for key in page)


def image_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in {".jpg", ".png", ".gif"})


def test_index_then_search_by_text_and_by_image(index_factory, make_images, tmp_path: Path) -> None:
    photos = make_images(tmp_path / "photos", 6)
    idx = index_factory()
    report = idx.add(tmp_path / "photos")
    assert (report.new, report.failed) == (6, [])
    assert idx.info()["images"] == 6
    hits = idx.search("a white dog", limit=3)
    assert [h.rank for h in hits] == [1, 2, 3]
    assert all(-1 <= h.score <= 1 for h in hits)
    assert hits[0].score >= hits[1].score >= hits[2].score
    same = idx.search_image(photos[2], limit=2)
    assert same[0].path == str(photos[2]) and same[0].score > 0.99
    assert (same[0].width, same[0].height) == (320, 240)
    like = idx.similar(str(photos[4]), limit=5)
    assert len(like) == 5 and str(photos[4]) not in [h.path for h in like]  # never the file itself


def test_incremental_runs_track_the_folder_exactly(index_factory, make_images, tmp_path: Path) -> None:
    folder = tmp_path / "lib"
    make_images(folder, 5)
    make_images(folder / "sub", 3, start=100)
    idx = index_factory()
    assert idx.add(folder).new == 8
    assert stored_paths(idx) == image_files(folder)

    second = idx.add(folder)
    assert (second.new, second.updated, second.unchanged, second.embedded) == (0, 0, 8, 0)

    # add, modify, delete and rename between runs
    make_images(folder / "sub", 2, start=200)
    draw_photo(999).save(folder / "img_0001.jpg")  # new content, same name
    os.utime(folder / "img_0001.jpg", ns=(1, 1_000_000_000))
    (folder / "img_0002.jpg").unlink()
    (folder / "img_0003.jpg").rename(folder / "sub" / "renamed.jpg")
    third = idx.add(folder)
    assert third.new == 2 and third.updated == 1 and third.moved == 1 and third.removed == 1
    assert stored_paths(idx) == image_files(folder)
    check_index(idx.store.uri, image_files(folder), model=SMALL_MODEL, store=idx.store)  # right vectors
    assert idx.info()["images"] == len(image_files(folder))

    shutil.rmtree(folder / "sub")
    fourth = idx.add(folder)
    assert fourth.removed == 6
    assert stored_paths(idx) == image_files(folder)


def test_moved_file_keeps_its_vector_without_embedding(index_factory, make_images, tmp_path: Path) -> None:
    photos = make_images(tmp_path / "a", 2)
    idx = index_factory()
    idx.add(tmp_path / "a")
    before = idx.store.vectors_of([key_of(str(photos[0]))])[key_of(str(photos[0]))]
    target = tmp_path / "a" / "moved here.jpg"
    photos[0].rename(target)
    report = idx.add(tmp_path / "a")
    assert (report.moved, report.embedded, report.removed) == (1, 0, 0)
    assert idx.store.vectors_of([key_of(str(target))])[key_of(str(target))] == before
    assert [h.path for h in idx.similar(str(target), limit=2)] == [str(photos[1])]  # found by its new name
    assert stored_paths(idx) == image_files(tmp_path / "a")
    check_index(idx.store.uri, image_files(tmp_path / "a"), model=SMALL_MODEL, store=idx.store)


def test_bad_files_are_reported_and_everything_else_is_stored(index_factory, make_images, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    good = make_images(folder, 4)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "fake.png").write_text("I am a text file")
    (folder / "cut.jpg").write_bytes(good[0].read_bytes()[:300])
    (folder / "dir.jpg").mkdir()
    make_images(folder / "dir.jpg", 1, start=50)
    (folder / "notes.txt").write_text("ignored: not an image extension")
    idx = index_factory()
    report = idx.add(folder)
    reasons = {Path(p).name: r for p, r in report.failed}
    assert reasons == {"zero.jpg": "empty file", "fake.png": reasons["fake.png"], "cut.jpg": "truncated image"}
    assert "not an image" in reasons["fake.png"]
    assert report.new == 5
    assert len(stored_paths(idx)) == 5
    good_files = [*map(str, good), str(folder / "dir.jpg" / "img_0050.jpg")]
    check_index(idx.store.uri, good_files, model=SMALL_MODEL, store=idx.store)


def test_under_filter_is_exact_for_wildcard_and_quote_folders(index_factory, make_images, tmp_path: Path) -> None:
    names = ["a_b", "axb", "50%", "50x", "it's", 'say "hi"']
    for i, name in enumerate(names):
        make_images(tmp_path / "lib" / name, 2, start=10 * i)
    idx = index_factory()
    assert idx.add(tmp_path / "lib").new == 12
    for name in names:
        hits = idx.search("anything", limit=20, under=str(tmp_path / "lib" / name))
        assert len(hits) == 2, name
        assert all(Path(h.path).parent.name == name for h in hits), name


def test_another_model_is_refused(index_factory, make_images, tmp_path: Path) -> None:
    make_images(tmp_path / "p", 1)
    idx = index_factory()
    idx.add(tmp_path / "p")
    idx.close()
    with pytest.raises(ModelMismatchError, match="was built with ViT-S-32"):
        index_factory(model=ModelSpec("RN50", None), encoder=None).add(tmp_path / "p")


def test_search_uses_the_recorded_model(index_factory, make_images, tmp_path: Path, lite_uri: str) -> None:
    from pixfind.api import ImageIndex

    make_images(tmp_path / "p", 2)
    idx = index_factory()
    idx.add(tmp_path / "p")
    idx.close()
    with ImageIndex(uri=lite_uri) as reopened:  # no model flags at query time
        assert reopened.model_spec() == ModelSpec(SMALL_MODEL, None)
        assert len(reopened.search("a photo", limit=5)) == 2


def test_clear_errors(index_factory, tmp_path: Path) -> None:
    idx = index_factory()
    with pytest.raises(PixfindError, match="folder not found"):
        idx.add(tmp_path / "missing")
    with pytest.raises(PixfindError, match="is empty"):
        idx.search("dog")
    with pytest.raises(PixfindError, match="empty query"):
        idx.store  # noqa: B018 - keep the index open
        from pixfind.search import check_query

        check_query("   ")


def test_a_second_process_on_the_same_file_is_told_who_holds_it(
    index_factory, make_images, lite_uri: str, tmp_path: Path
) -> None:
    from pixfind.errors import IndexLockedError
    from pixfind.store import Store

    index_factory().add(make_images(tmp_path / "p", 1)[0])  # the file is made, and locked
    with pytest.raises(IndexLockedError, match=f"pid {os.getpid()}"):
        Store(lite_uri)


def test_foreign_db_file_is_refused_and_left_intact(tmp_path: Path) -> None:
    from pixfind.store import Store

    foreign = tmp_path / "notes.db"
    foreign.write_bytes(b"my precious data" * 100)
    with pytest.raises(PixfindError, match="not a Milvus Lite index"):
        Store(str(foreign))
    assert foreign.read_bytes() == b"my precious data" * 100


def empty_lite_index(path: Path) -> str:
    """A Lite file holding an empty pixfind collection; returns its URI."""
    from pixfind.store import Store

    with Store(str(path)) as store:
        store.ensure(ModelSpec(SMALL_MODEL, None), 64)
    return str(path)


def test_a_lite_file_left_mid_write_by_a_crash_still_opens(tmp_path: Path) -> None:
    """A crash inside an SQLite write leaves a hot journal; a read-only look cannot roll it back,
    which once made pixfind call a real index "foreign or corrupt"."""
    import subprocess
    import sys

    from pixfind.store import Store, _looks_like_lite

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
    assert _looks_like_lite(Path(uri))
    with Store(uri) as store:  # opens, with the interrupted write rolled back
        assert store.count() == 0
        assert store.info() is not None
    assert not Path(uri + "-journal").exists()


def test_a_lite_file_another_program_holds_is_refused(tmp_path: Path) -> None:
    """Milvus Lite locks ``.NAME.lock`` beside the file; when another program holds it, pixfind
    says so, and does not try a second start (milvus_lite's failed start deletes that lock file)."""
    import subprocess
    import sys

    from pixfind.store import Store

    uri = empty_lite_index(tmp_path / "held.db")
    hold = (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.lockf(f, fcntl.LOCK_EX); "
        "print(1, flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / ".held.db.lock")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"1"
        with pytest.raises(PixfindError, match="a program other than pixfind has it open"):
            Store(uri)
    finally:
        holder.kill()
        holder.wait()
    with Store(uri) as store:  # usable again once the other program is gone
        assert store.count() == 0


def test_lite_engine_start_registers_with_milvus_lite(tmp_path: Path) -> None:
    """pixfind's start (no fixed 0.5 s wait) leaves the engine where MilvusClient finds it."""
    from milvus_lite.server_manager import server_manager_instance

    from pixfind import store as store_module

    db = tmp_path / "quick.db"
    key = str(db.resolve())
    try:
        assert store_module._start_lite_engine(str(db))
        engine = server_manager_instance._servers[key]
        assert engine._p.poll() is None  # running
        assert store_module._start_lite_engine(str(db))  # found, not started twice
        assert server_manager_instance._servers[key] is engine
        with store_module.Store(str(db)) as store:  # MilvusClient reuses that engine
            store.ensure(ModelSpec(SMALL_MODEL, None), 64)
            assert store.count() == 0
    finally:
        server_manager_instance.release_server(key)


def test_lite_engine_that_dies_at_start_is_refused_and_unlocked(tmp_path: Path, monkeypatch) -> None:
    import dataclasses
    import fcntl

    from milvus_lite.server_manager import server_manager_instance

    from pixfind import store as store_module

    real_command = store_module._lite_engine_command
    monkeypatch.setattr(  # an engine that exits at once
        store_module, "_lite_engine_command", lambda key: dataclasses.replace(real_command(key), args=["false"])
    )
    db = tmp_path / "dies.db"
    assert store_module._start_lite_engine(str(db)) is False
    assert str(db.resolve()) not in server_manager_instance._servers
    with open(tmp_path / ".dies.db.lock", "a") as lock:  # nothing holds the file any more
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_lite_engine_command_is_milvus_lites_own(tmp_path: Path) -> None:
    """pixfind starts the engine before importing milvus_lite (~0.1 s), so it builds the command
    itself: it must stay the one milvus_lite's Server would run."""
    from milvus_lite.server import Server

    from pixfind import store as store_module

    key = str((tmp_path / "same.db").resolve())
    ours, theirs = store_module._lite_engine_command(key), Server(key)
    assert ours is not None
    assert ours.args[0] == theirs.milvus_bin and Path(ours.args[0]).exists()
    assert ours.args[1] == str(theirs._db_file)
    assert ours.args[2].startswith("unix:") and ours.args[2].endswith(f"_{Path(key).name}.sock")
    assert ours.args[3:] == [theirs.log_level, theirs._lock_path]
    assert ours.env["LD_LIBRARY_PATH"].split(":")[0] == str(theirs._bin_path)
    assert ours.cwd == str(theirs._work_dir)


def test_collection_requests_match_pymilvus_messages() -> None:
    """The early describe and load are sent as bytes built without pymilvus (not imported yet)."""
    from pymilvus.grpc_gen import milvus_pb2

    from pixfind.store import _collection_request

    for name in ("pixfind", "x", "photos_2024", "c" * 200):  # 200: a two-byte length
        request = _collection_request(name)
        assert request == milvus_pb2.DescribeCollectionRequest(collection_name=name).SerializeToString()
        assert request == milvus_pb2.LoadCollectionRequest(collection_name=name).SerializeToString()


def test_index_opened_to_read_is_described_and_loaded_early(tmp_path: Path) -> None:
    """Opened with create=False (search, info, serve), a Lite index is described and starts
    loading before pymilvus is used; info() is what the normal describe gives."""
    from pymilvus.client.types import LoadState

    from pixfind.pathkeys import key_of
    from pixfind.store import Row, Store

    uri = str(tmp_path / "early.db")
    with Store(uri) as store:
        store.ensure(ModelSpec(SMALL_MODEL, None), 64)
        store.write([Row(key_of("/p/a.jpg"), [1.0] + [0.0] * 63, 10, 20, 30, 40, "fp")])
        described = store.info()
    with Store(uri, create=False) as store:
        assert store._early is not None
        store._early._loading.result(timeout=30)  # the load asked for at start, no call from us
        assert store.client.get_load_state(store.collection)["state"] == LoadState.Loaded
        assert store.info() == described
        assert store.count() == 1
        store.drop()  # the early description is of a collection that is gone
        assert store.info() is None
    with Store(uri) as store:  # create=True (index): nothing asked early
        assert store._early is None


def test_early_read_of_a_missing_collection(tmp_path: Path) -> None:
    from pixfind.store import Store

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
    from pixfind.store import Row, Store

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
    from pixfind import store as store_module
    from pixfind.store import Store

    monkeypatch.setattr(store_module, "LITE_SERVING_MIN_ROWS", 1000)
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
        monkeypatch.setattr(store_module, "LITE_SERVING_MIN_ROWS", 5000)
        assert not reopened.index_for_serving()  # small collections stay exact
        assert reopened.index_type() == "FLAT"


def test_optimize_for_queries_switches_lite_to_ivf_until_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python API's opt-in for long-lived processes: IVF while open, exact index on file after."""
    from pixfind import ImageIndex
    from pixfind import store as store_module
    from pixfind.store import Store

    uri = str(tmp_path / "big.db")
    clustered_lite_index(uri, 1500, seed=5)
    monkeypatch.setattr(store_module, "LITE_SERVING_MIN_ROWS", 2000)
    with ImageIndex(uri=uri, create=False) as index:
        assert not index.optimize_for_queries()  # under the threshold: stays exact
        assert index.store.index_type() == "FLAT"
    monkeypatch.setattr(store_module, "LITE_SERVING_MIN_ROWS", 1000)
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
    from pixfind import store as store_module
    from pixfind.store import Store

    monkeypatch.setattr(store_module, "LITE_SERVING_MIN_ROWS", 1000)
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


class _SlowEncoder:
    """Stands in for a model: records whether a decode ever ran while it was embedding."""

    device, image_size, image_precision, precision_reason, image_runtime = "cpu", 8, None, "", None

    def __init__(self, fills_cpu: bool) -> None:
        self.spec, self.dim, self.draft_side, self.fills_cpu = ModelSpec(SMALL_MODEL, None), 4, 336, fills_cpu
        self.busy = False
        self.decodes_during_inference = 0

    def preprocess(self, image: object) -> np.ndarray:
        return np.zeros((3, 8, 8), dtype=np.float32)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        self.busy = True
        time.sleep(0.03)
        self.busy = False
        return np.ones((len(pixels), 4), dtype=np.float32) / 2


@pytest.mark.parametrize("fills_cpu", [True, False])
def test_decoding_waits_for_a_model_that_fills_the_cpu(
    fills_cpu: bool, make_images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU the model uses every core: decoding beside it would stall its threads, so decode
    threads run between batches; beside a GPU (or spare cores) they overlap inference."""
    from pixfind.ingest import pipeline
    from pixfind.ingest.runner import Indexer
    from pixfind.store import Store

    folder = tmp_path / "photos"
    make_images(folder, 24)
    encoder = _SlowEncoder(fills_cpu)
    real_load = pipeline.load_image

    def load(path: str, min_side: int | None = None, data: bytes | None = None) -> object:
        if encoder.busy:
            encoder.decodes_during_inference += 1
        time.sleep(0.005)
        return real_load(path, min_side=min_side, data=data)

    monkeypatch.setattr(pipeline, "load_image", load)
    with Store(str(tmp_path / "i.db")) as store:
        report = Indexer(store, lambda: encoder, batch_size=4, workers=2).run([str(folder)])
        assert report.new == 24 and store.count() == 24
    if fills_cpu:
        assert encoder.decodes_during_inference == 0
    else:
        assert encoder.decodes_during_inference > 0


class _BatchRecorder(_SlowEncoder):
    """A model "on" ``device`` that records the size of every batch it is given."""

    def __init__(self, device: str) -> None:
        super().__init__(fills_cpu=False)
        self.device = device
        self.batches: list[int] = []

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        self.batches.append(len(pixels))
        return np.ones((len(pixels), 4), dtype=np.float32) / 2


@pytest.mark.parametrize(("device", "expected"), [("cuda:0", 256), ("cpu", 16)])
def test_default_batch_follows_the_models_device(device: str, expected: int, make_images, tmp_path: Path) -> None:
    """The settings say device "auto" (the default): the batch size is chosen once the model is
    loaded, from where it runs (a GPU once got CPU-sized batches of 16 here)."""
    from pixfind import ImageIndex

    make_images(tmp_path / "photos", 300)
    encoder = _BatchRecorder(device)
    with ImageIndex(uri=str(tmp_path / "i.db"), encoder=encoder, model=encoder.spec) as index:
        assert index.settings.device == "auto"
        report = index.add(tmp_path / "photos")
    assert report.new == 300
    assert max(encoder.batches) == expected and sum(encoder.batches) == 300


def test_an_index_made_with_schema_1_keeps_working(make_images, tmp_path: Path) -> None:
    """A collection made before schema 2: indexed into, re-indexed, searches return sizes; it
    keeps its five typed fields. It has no place for a content hash, so a renamed file is
    embedded again rather than trusted on its fingerprint."""
    from pixfind import ImageIndex
    from pixfind.store import CollectionInfo, Store

    uri = str(tmp_path / "old.db")
    encoder = _BatchRecorder("cpu")
    with Store(uri) as store:
        store._create(CollectionInfo(encoder.spec, encoder.dim, schema=1))
    folder = tmp_path / "photos"
    make_images(folder, 6)
    with ImageIndex(uri=uri, encoder=encoder, model=encoder.spec) as index:
        assert index.add(folder).new == 6
        assert index.add(folder).unchanged == 6
        first = sorted(folder.iterdir())[0]
        first.rename(folder / "renamed.jpg")
        report = index.add(folder)
        assert (report.moved, report.copied, report.new, report.removed) == (0, 0, 1, 1)
        assert index.store.count() == 6  # the old path is gone
        hits = index.store.search([np.ones(4, dtype=np.float32).tolist()], 10)[0]
        assert len(hits) == 6 and all(h.width > 0 and h.size > 0 for h in hits)
        info = index.store.info()
        assert info is not None and info.schema == 1


def test_decode_threads_follow_where_the_model_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from pixfind.ingest import runner

    monkeypatch.setattr(runner, "cpu_cores", lambda: 8)
    assert runner.default_workers(SimpleNamespace(device="cuda:0", fills_cpu=False)) == 8  # GPU: CPU decodes
    assert runner.default_workers(SimpleNamespace(device="cpu", fills_cpu=True)) == 8  # turns: all cores
    assert runner.default_workers(SimpleNamespace(device="cpu", fills_cpu=False)) == 4  # beside a CPU model
    assert runner.default_batch(SimpleNamespace(device="cuda:1")) == 256
    assert runner.default_batch(SimpleNamespace(device="cpu")) == 16  # every Encoder says its device
