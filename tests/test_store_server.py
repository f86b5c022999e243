"""Store behaviour on Milvus Lite and on a real Milvus server (the ``backend`` fixture runs each
test on both; the server runs are marked ``server``), plus server-only cases: authentication,
unreachable URIs, the ANN index and its search parameters."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docs_figures as docs
import numpy as np
import pytest
from conftest import Backend
from milvus_server import MilvusServer

from pixfind.config import ModelSpec
from pixfind.errors import ModelMismatchError, PixfindError, StoreError
from pixfind.pathkeys import key_of, path_of
from pixfind.store import Row, Store, policies
from pixfind.store import records as store_records

DIM = 16
MODEL = ModelSpec("ViT-B-32", "openai")
OTHER = ModelSpec("ViT-B-16", "openai")
SRC = str(Path(__file__).resolve().parent.parent / "src")


def vectors(count: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rows_for(paths: list[str], seed: int = 0, size: int = 100) -> list[Row]:
    vecs = vectors(len(paths), seed)
    return [
        Row(key_of(p), vecs[i], size + i, 1_700_000_000_000_000_000 + i, 640, 480, f"{i:016x}")
        for i, p in enumerate(paths)
    ]


def filled(backend: Backend, paths: list[str], seed: int = 0) -> tuple[Store, list[Row]]:
    store = backend.store()
    store.ensure(MODEL, DIM)
    rows = rows_for(paths, seed)
    store.write(rows)
    return store, rows


# -- behaviour on both backends ---------------------------------------------------------------------


def test_ensure_creates_and_records_model(backend: Backend) -> None:
    with backend.store() as store:
        assert not store.exists() and store.info() is None and store.count() == 0
        info = store.ensure(MODEL, DIM)
        assert (info.model, info.dim) == (MODEL, DIM)
        assert store.ensure(MODEL, DIM) == info  # idempotent
    with backend.store() as store:
        assert store.exists()
        assert store.info() == info


def test_other_model_is_refused(backend: Backend) -> None:
    with backend.store() as store:
        store.ensure(MODEL, DIM)
    with backend.store() as store, pytest.raises(ModelMismatchError, match="ViT-B-32"):
        store.ensure(OTHER, DIM)
    with backend.store() as store, pytest.raises(ModelMismatchError):
        store.ensure(MODEL, DIM * 2)


def test_upsert_replaces_never_duplicates(backend: Backend) -> None:
    paths = [f"/photos/{i}.jpg" for i in range(30)]
    store, _ = filled(backend, paths)
    with store:
        store.write(rows_for(paths, seed=1, size=5000))
        store.write(rows_for(paths[:5], seed=2, size=9000))
        assert store.count() == 30
        stored = store.lookup([key_of(p) for p in paths])
        assert stored[key_of(paths[0])].size == 9000
        assert stored[key_of(paths[10])].size == 5010
        keys = [k for page in store.iter_keys() for k in page]
        assert sorted(keys) == sorted(key_of(p) for p in paths)


def test_lookup_finds_only_stored_keys(backend: Backend) -> None:
    paths = [f"/photos/{i}.jpg" for i in range(10)]
    store, rows = filled(backend, paths)
    with store:
        found = store.lookup([key_of(paths[3]), key_of("/photos/missing.jpg"), key_of(paths[7])])
        assert set(found) == {key_of(paths[3]), key_of(paths[7])}
        assert found[key_of(paths[3])].size == rows[3].size
        assert found[key_of(paths[3])].mtime_ns == rows[3].mtime_ns
        assert found[key_of(paths[3])].fingerprint == rows[3].fingerprint
        assert store.lookup([]) == {}
        fps = store.find_by_fingerprint([rows[2].fingerprint])
        assert [r["path"] for r in fps[rows[2].fingerprint]] == [key_of(paths[2])]


def test_delete_counts_what_was_stored(backend: Backend) -> None:
    paths = [f"/photos/{i}.jpg" for i in range(20)]
    store, _ = filled(backend, paths)
    with store:
        gone = [key_of(p) for p in paths[:5]]
        assert store.delete([*gone, key_of("/photos/never.jpg")]) == 5
        assert store.delete(gone) == 0
        assert store.delete([]) == 0
        assert store.count() == 15
        assert store.lookup(gone) == {}
        hits = store.search(vectors(1)[:1].tolist(), 20)[0]
        assert {h.path for h in hits} == set(paths[5:])


def test_iter_keys_streams_pages(backend: Backend) -> None:
    paths = [f"/big/{i:05d}.jpg" for i in range(2300)] + [f"/other/{i}.jpg" for i in range(7)]
    store, _ = filled(backend, paths)
    with store:
        pages = list(store.iter_keys(batch=1000))
        assert all(0 < len(page) <= 1000 for page in pages) and len(pages) >= 3
        assert sorted(k for page in pages for k in page) == sorted(key_of(p) for p in paths)
        under = [k for page in store.iter_keys(folder="/other") for k in page]
        assert sorted(under) == sorted(key_of(f"/other/{i}.jpg") for i in range(7))


HOSTILE = ["a_b", "aXb", "50%", "50 off", "it's", 'say "hi"', "back\\slash", "ünï cödé", "a_b_c"]


def test_folder_filter_is_literal(backend: Backend) -> None:
    """``_`` and ``%`` are not wildcards, quotes and backslashes are not syntax."""
    paths = [f"/p/{folder}/img{i}.jpg" for folder in HOSTILE for i in range(2)]
    store, rows = filled(backend, paths)
    with store:
        everything = store.search([rows[0].vector], len(paths))[0]
        assert {h.path for h in everything} == set(paths)
        for folder in HOSTILE:
            expected = {f"/p/{folder}/img0.jpg", f"/p/{folder}/img1.jpg"}
            hits = store.search([rows[0].vector], 10, folder=f"/p/{folder}")[0]
            assert {h.path for h in hits} == expected, folder
            assert {path_of(k) for page in store.iter_keys(folder=f"/p/{folder}/") for k in page} == expected


def test_search_ranks_by_cosine(backend: Backend) -> None:
    paths = [f"/s/{i}.jpg" for i in range(50)]
    store, rows = filled(backend, paths)
    with store:
        results = store.search([rows[7].vector, rows[30].vector], 5)
        assert [r[0].path for r in results] == [paths[7], paths[30]]
        assert results[0][0].score == pytest.approx(1.0, abs=1e-4)
        scores = [h.score for h in results[0]]
        assert scores == sorted(scores, reverse=True)
        assert (results[0][0].width, results[0][0].height, results[0][0].size) == (640, 480, rows[7].size)


def test_new_collections_use_inner_product_on_unit_vectors(backend: Backend) -> None:
    paths = [f"/ip/{i}.jpg" for i in range(30)]
    store, rows = filled(backend, paths)
    with store:
        assert store.index_metric() == "IP"
        query = np.asarray(rows[3].vector) * 0.8 + np.asarray(rows[4].vector) * 0.6
        expected = sorted(
            ((float(np.dot(r.vector, query) / np.linalg.norm(query)), p) for r, p in zip(rows, paths, strict=True)),
            reverse=True,
        )[:5]
        for scale in (1.0, 7.5, 0.01):  # any length of query gives the cosine
            hits = store.search([query * scale], 5)[0]
            assert [h.path for h in hits] == [p for _, p in expected]
            assert [h.score for h in hits] == pytest.approx([c for c, _ in expected], abs=1e-5)
        stored = store.vectors_of([rows[0].key])[rows[0].key]
        assert stored == pytest.approx(list(rows[0].vector), abs=1e-7)


def test_collections_made_with_cosine_keep_working(backend: Backend, monkeypatch) -> None:
    """Files written before the IP metric: searches use the index's metric, and a Lite file's
    FLAT index moves to IP at the next restore_index() (each index run)."""
    paths = [f"/cos/{i}.jpg" for i in range(30)]
    monkeypatch.setattr(policies, "METRIC", "COSINE")
    monkeypatch.setattr(policies, "SERVER_INDEX", {**policies.SERVER_INDEX, "metric_type": "COSINE"})
    store, rows = filled(backend, paths)
    monkeypatch.undo()
    store.close()
    with backend.store() as store:
        assert store.index_metric() == "COSINE"
        before = store.search([rows[5].vector], 5)[0]
        assert before[0].path == paths[5] and before[0].score == pytest.approx(1.0, abs=1e-4)
        store.restore_index()
        assert store.index_metric() == ("COSINE" if store.is_server else "IP")
        after = store.search([rows[5].vector], 5)[0]
        assert [h.path for h in after] == [h.path for h in before]
        assert [h.score for h in after] == pytest.approx([h.score for h in before], abs=1e-5)
        assert store.count() == len(paths)


@pytest.mark.parametrize("schema", [1, 2])
def test_both_record_layouts_are_read_and_written(backend: Backend, schema: int) -> None:
    """Schema 2 keeps a file's record in one JSON field; collections made with schema 1 (five
    typed fields) keep their layout and work the same."""
    paths = [f"/layout/{i}.jpg" for i in range(12)]
    with backend.store() as store:
        store._create(store_records.CollectionInfo(MODEL, DIM, schema=schema))
    with backend.store() as store:
        info = store.info()
        assert info is not None and info.schema == schema
        fields = {f["name"] for f in store.client.describe_collection(store.collection)["fields"]}
        expected = {"path", "vector", "meta"} if schema == 2 else {"path", "vector", *store_records.FILE_FIELDS}
        assert fields == expected
        rows = rows_for(paths)
        store.write(rows)
        found = store.lookup([key_of(paths[4])])[key_of(paths[4])]
        assert (found.size, found.mtime_ns, found.fingerprint) == (rows[4].size, rows[4].mtime_ns, rows[4].fingerprint)
        moved = store.find_by_fingerprint([rows[7].fingerprint, "no-such-print"])
        assert list(moved) == [rows[7].fingerprint]
        (candidate,) = moved[rows[7].fingerprint]
        assert candidate["path"] == key_of(paths[7]) and candidate["size"] == rows[7].size
        assert (candidate["width"], candidate["height"]) == (640, 480)
        assert np.allclose(candidate["vector"], rows[7].vector, atol=1e-6)
        hit = store.search([rows[3].vector], 3)[0][0]
        assert (hit.path, hit.width, hit.height, hit.size) == (paths[3], 640, 480, rows[3].size)
        assert store.delete([key_of(paths[0])]) == 1 and store.count() == len(paths) - 1


def test_unit_rows_normalises_only_what_is_not_unit() -> None:
    from pixfind.vectors import unit_rows

    exact = vectors(1)[0]
    assert (unit_rows(exact)[0] == np.asarray(exact, dtype=np.float32)).all()  # bit for bit
    assert np.linalg.norm(unit_rows([3.0, 4.0])[0]) == pytest.approx(1.0)
    assert unit_rows([[3.0, 4.0], [0.0, 2.0]]) == pytest.approx(np.array([[0.6, 0.8], [0.0, 1.0]]))
    assert (unit_rows([0.0, 0.0]) == 0).all()


def test_read_your_writes_in_the_same_store(backend: Backend) -> None:
    with backend.store() as store:
        store.ensure(MODEL, DIM)
        for batch in range(3):
            paths = [f"/ryw/{batch}/{i}.jpg" for i in range(40)]
            rows = rows_for(paths, seed=batch)
            store.write(rows)
            hits = store.search([rows[0].vector], 200)[0]
            assert len(hits) == 40 * (batch + 1)
            assert hits[0].path == paths[0]
            assert store.count() == 40 * (batch + 1)


READER = """
import json, sys, time
from pixfind.store import Store
uri, token, collection, vector = json.loads(sys.argv[1])
began = time.perf_counter()
with Store(uri, token=token, collection=collection) as store:
    hits = store.search([vector], 1000)[0]
    print(json.dumps({"paths": [h.path for h in hits], "count": store.count(),
                      "seconds": time.perf_counter() - began}))
"""


def test_read_your_writes_from_another_process(backend: Backend) -> None:
    """A search right after `pixfind index` (another process, no shared client state) sees every
    row that was reported as written, without a flush per batch."""
    paths = [f"/idx/{i}.jpg" for i in range(300)]
    with backend.store() as store:
        store.ensure(MODEL, DIM)
        rows = rows_for(paths)
        for start in range(0, len(rows), 50):
            store.write(rows[start : start + 50])
    args = json.dumps([backend.uri, backend.token, backend.collection, [float(x) for x in rows[0].vector]])
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", READER, args], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["count"] == len(paths)
    assert sorted(seen["paths"]) == sorted(paths)


def test_search_effort_knob(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    with backend.store(search_ef=32) as store:
        assert store.search_ef == 32
        store.ensure(MODEL, DIM)
        params = store._search_params(100)
        if store.is_server:
            assert store.index_type() == policies.SERVER_INDEX["index_type"] == "HNSW"
            assert params["params"] == {"ef": 100}  # never below the number of hits asked
            assert store._search_params(10)["params"] == {"ef": 32}
        else:
            assert "params" not in params  # Lite searches exactly
    monkeypatch.setenv("PIXFIND_SEARCH_EF", "200")
    with backend.store() as store:
        assert store.search_ef == 200
    monkeypatch.setenv("PIXFIND_SEARCH_EF", "lots")
    with pytest.raises(PixfindError, match="PIXFIND_SEARCH_EF must be a whole number"):
        backend.store()


# -- server only -------------------------------------------------------------------------------------


def auth_message(uri: str) -> str:
    return f"authentication failed for {uri}: check --token / PIXFIND_TOKEN"


@pytest.mark.server
@pytest.mark.parametrize("token", [None, "root:wrong", "nobody:secret"])
def test_bad_token_is_one_clear_line(
    milvus_server: MilvusServer, token: str | None, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(StoreError) as err:
        Store(milvus_server.uri, token=token)
    assert str(err.value) == auth_message(milvus_server.uri)
    assert capfd.readouterr().err == ""  # nothing from pymilvus's own logging


@pytest.mark.server
def test_right_token_works(milvus_server: MilvusServer) -> None:
    with Store(milvus_server.uri, token=milvus_server.token, collection="t_right_token") as store:
        assert store.count() == 0


def test_unreachable_uri_fails_fast(capfd: pytest.CaptureFixture[str]) -> None:
    """One line, nothing from pymilvus' logging, within the README's figure (more cases, and the
    silent ones: tests/test_documented_figures.py)."""
    with socket.socket() as bound:  # bound, never listening: refused, and no other process can take it
        bound.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{bound.getsockname()[1]}"
        began = time.monotonic()
        with pytest.raises(StoreError) as err:
            Store(uri, token="root:Milvus")
        assert time.monotonic() - began <= docs.at_most(docs.unreachable_uri_s())
    assert str(err.value) == (
        f"cannot reach Milvus at {uri}: connection refused (is the server running?); check --uri / PIXFIND_URI"
    )
    assert capfd.readouterr().err == ""


def test_unknown_host_is_clear() -> None:
    with pytest.raises(StoreError, match=r"cannot reach Milvus at http://no-such-host\.invalid:19530: unknown"):
        Store("http://no-such-host.invalid:19530")


@pytest.mark.server
def test_released_collection_is_loaded_again(backend_server: Backend) -> None:
    store, rows = filled(backend_server, [f"/r/{i}.jpg" for i in range(20)])
    with store:
        store.client.release_collection(backend_server.collection)
    with backend_server.store() as again:
        assert again.search([rows[3].vector], 1)[0][0].path == "/r/3.jpg"


@pytest.fixture
def backend_server(milvus_server: MilvusServer) -> Iterator[Backend]:
    chosen = Backend("server", milvus_server.uri, milvus_server.token, f"t_{uuid.uuid4().hex[:16]}")
    yield chosen
    with chosen.store() as store:
        store.drop()


# -- the test server itself ------------------------------------------------------------------------


def _listening_inodes(table: str) -> dict[str, str]:
    """inode -> local address of LISTEN sockets in this process's network namespace."""
    out = {}
    for line in Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A":  # TCP_LISTEN
            out[fields[9]] = fields[1]
    return out


@pytest.mark.server
def test_server_is_reachable_on_loopback_only(milvus_server: MilvusServer) -> None:
    from milvus_server import _descendants

    assert milvus_server._proc is not None
    pids = {milvus_server._proc.pid} | _descendants(milvus_server._proc.pid)
    ours = os.readlink("/proc/self/ns/net")
    milvus = [pid for pid in pids if "milvus" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
    assert milvus and all(os.readlink(f"/proc/{pid}/ns/net") != ours for pid in milvus)
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    listening = {**_listening_inodes("tcp"), **_listening_inodes("tcp6")}
    here = {listening[i] for i in inodes if i in listening}
    assert len(here) == 2  # the gRPC port and the health endpoint, nothing else in our namespace
    assert all(addr.startswith("0100007F:") for addr in here), here  # 127.0.0.1


@pytest.mark.server
def test_taken_port_fails_clearly() -> None:
    from milvus_server import ServerStartError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ServerStartError, match=f"cannot listen on 127.0.0.1:{port}"):
            MilvusServer(port=port).start()
