"""The page's duplicates run and the live index's status, through FastAPI's test client: a real
Milvus Lite file, the random-weight test model, pictures and their derived copies drawn here.

The oracle of a run is :meth:`ImageIndex.duplicates` on the same index (tests/test_duplicates.py
checks that one against the pictures); the threshold is that module's, for the reason it gives.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import draw_photo
from fastapi.testclient import TestClient
from test_duplicates import THRESHOLD, derive_copies, drawn

import pixfind.web.jobs as jobs
from pixfind.web.access import Credentials
from pixfind.web.app import create_app

SETTLE_S = 120.0


def wait_for(check: Callable[[], Any], timeout: float = SETTLE_S, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


@pytest.fixture
def library(tmp_path: Path) -> Path:
    """Two pictures with derived copies (two groups), four unrelated pictures."""
    pics = tmp_path / "pics"
    derive_copies(drawn(pics, "beach.jpg", seed=11), pics, "beach")
    derive_copies(drawn(pics / "trip", "lake.jpg", seed=31), pics / "trip", "lake")
    for seed in (1, 2, 3, 4):
        drawn(pics, f"other_{seed}.jpg", seed)
    return pics


@pytest.fixture
def index(index_factory, library: Path):  # type: ignore[no-untyped-def]
    idx = index_factory()
    idx.add(library)
    return idx


@pytest.fixture
def client(index, tmp_path: Path) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with TestClient(create_app(index, tmp_path / "thumbs")) as test_client:
        yield test_client


@pytest.fixture
def slow_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of two stored vectors, each followed by a 0.3 s pause for searches: a run over the
    library's 14 images lasts seconds, long enough to be watched, cancelled, stopped."""
    monkeypatch.setattr(jobs, "SEARCH_BATCH", 2)
    monkeypatch.setattr(jobs, "HANDOFF_S", 0.3)


def finished(client: TestClient) -> dict[str, Any]:
    def state() -> dict[str, Any] | None:
        data = client.get("/api/duplicates").json()
        return data if data["state"] != "running" else None

    return wait_for(state, what="the duplicates run to end")


def job_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "pixfind-duplicates"]


# -- the duplicates run ---------------------------------------------------------------------------


def test_a_run_finds_what_image_index_duplicates_finds(client: TestClient, index) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/api/duplicates").json()["state"] == "idle"
    started = client.post("/api/duplicates", params={"threshold": THRESHOLD})
    assert started.status_code == 202, started.text
    assert started.json()["threshold"] == THRESHOLD
    done = finished(client)
    assert done["state"] == "done", done
    expected = index.duplicates(THRESHOLD)  # the oracle: the API on the same index
    assert len(expected) == 2
    assert done["groups_total"] == len(expected) and done["groups_found"] == len(expected)
    assert done["scanned"] == done["total"] == 14
    for got, want in zip(done["groups"], expected, strict=True):
        assert [f["path"] for f in got["files"]] == [f.path for f in want.files]  # largest first
        assert [(f["size"], f["width"], f["height"]) for f in got["files"]] == [
            (f.size, f.width, f.height) for f in want.files
        ]
        assert got["similarity"] == pytest.approx(want.similarity, abs=1e-6)
        assert got["reclaimable_bytes"] == want.reclaimable
    assert done["reclaimable_bytes"] == sum(g.reclaimable for g in expected)
    for item in done["groups"][0]["files"]:  # thumbnails through the route that serves indexed files only
        thumb = client.get(item["thumb"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert job_threads() == []


def test_under_and_paging_of_the_groups(client: TestClient, index, library: Path) -> None:  # type: ignore[no-untyped-def]
    client.post("/api/duplicates", params={"threshold": THRESHOLD, "under": str(library / "trip")})
    done = finished(client)
    assert [{f["path"] for f in g["files"]} for g in done["groups"]] == [
        {f.path for f in g.files} for g in index.duplicates(THRESHOLD, under=str(library / "trip"))
    ]
    client.post("/api/duplicates", params={"threshold": THRESHOLD})
    finished(client)
    first, second = (client.get("/api/duplicates", params={"offset": n, "limit": 1}).json() for n in (0, 1))
    assert first["groups_total"] == 2 and len(first["groups"]) == len(second["groups"]) == 1
    assert first["groups"][0]["files"] != second["groups"][0]["files"]


def test_progress_is_reported_while_it_runs(client: TestClient, slow_batches: None) -> None:
    client.post("/api/duplicates", params={"threshold": THRESHOLD})
    seen: list[tuple[int, int, int]] = []
    while (data := client.get("/api/duplicates").json())["state"] == "running":
        seen.append((data["scanned"], data["total"], data["groups_found"]))
        time.sleep(0.05)
    assert data["state"] == "done"
    scanned = [s for s, _, _ in seen]
    assert scanned == sorted(scanned), seen
    assert any(0 < s < 14 for s, total, _ in seen if total == 14), seen
    assert max(groups for _, _, groups in seen) >= 1  # groups so far, before the end


def test_one_run_at_a_time_and_searches_meanwhile(client: TestClient, slow_batches: None) -> None:
    first = client.post("/api/duplicates", params={"threshold": THRESHOLD}).json()
    second = client.post("/api/duplicates", params={"threshold": 0.5})
    assert second.status_code == 409
    assert second.json()["state"] == "running"
    assert (second.json()["threshold"], second.json()["started_at"]) == (THRESHOLD, first["started_at"])
    assert len(job_threads()) == 1
    wait_for(lambda: client.get("/api/duplicates").json()["scanned"] > 0, what="a first batch")
    search = client.get("/api/search", params={"q": "a beach", "k": 3})  # answered between two batches
    answered = time.time()
    assert search.status_code == 200 and len(search.json()) == 3
    done = finished(client)
    assert done["state"] == "done" and done["finished_at"] > answered  # the search did not wait for the run


def test_cancel_stops_the_run_and_its_thread(client: TestClient, slow_batches: None) -> None:
    client.post("/api/duplicates", params={"threshold": THRESHOLD})
    wait_for(lambda: client.get("/api/duplicates").json()["scanned"] > 0, what="a first batch")
    client.delete("/api/duplicates")
    done = finished(client)
    assert done["state"] == "cancelled" and done["scanned"] < 14 and "groups" not in done
    wait_for(lambda: not job_threads(), 30, "the run's thread to end")
    again = client.post("/api/duplicates", params={"threshold": THRESHOLD})  # a new run may start
    assert again.status_code == 202


def test_a_server_stopped_during_a_run_leaves_no_thread(index, tmp_path: Path, slow_batches: None) -> None:  # type: ignore[no-untyped-def]
    app = create_app(index, tmp_path / "thumbs")
    with TestClient(app) as client:
        client.post("/api/duplicates", params={"threshold": THRESHOLD})
        wait_for(lambda: client.get("/api/duplicates").json()["scanned"] > 0, what="a first batch")
    assert job_threads() == []  # joined at shutdown, before the caller closes the index
    assert app.state.pixfind.duplicates.status.state == "cancelled"
    assert index.search("a beach", limit=1)  # the index is still usable


def test_pages_of_other_sites_cannot_start_or_cancel_a_run(client: TestClient) -> None:
    others = ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"})
    for headers in others:
        for method in ("POST", "DELETE"):
            refused = client.request(method, "/api/duplicates", params={"threshold": THRESHOLD}, headers=headers)
            assert refused.status_code == 403, (headers, method)
            assert refused.json()["detail"] == "refused: this request comes from another site's page"
    assert client.get("/api/duplicates").json()["state"] == "idle"
    own = client.post("/api/duplicates", headers={"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"})
    assert own.status_code == 202


def test_a_password_protects_the_run(index, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    app = create_app(index, tmp_path / "thumbs", credentials=Credentials("a-long-password"))
    with TestClient(app) as client:
        assert client.post("/api/duplicates").status_code == 401
        assert client.get("/api/duplicates").status_code == 401
        assert client.get("/api/watch").status_code == 401
        assert client.post("/api/duplicates", auth=("pixfind", "a-long-password")).status_code == 202


def test_a_bad_threshold_and_an_empty_index_are_one_line(index_factory, tmp_path: Path, client: TestClient) -> None:  # type: ignore[no-untyped-def]
    for bad in ("0", "1.5", "-1"):
        answer = client.post("/api/duplicates", params={"threshold": bad})
        assert answer.status_code == 400
        assert answer.json()["detail"] == f"bad request: --threshold {float(bad)} is not a cosine in (0, 1]: try 0.95"
    empty = index_factory(uri=str(tmp_path / "empty.db"))
    with TestClient(create_app(empty, tmp_path / "thumbs2")) as other:
        other.post("/api/duplicates")
        done = finished(other)
    assert done["state"] == "failed" and "is empty: run `pixfind index FOLDER` first" in done["error"]
    assert "\n" not in done["error"]


# -- the live index -------------------------------------------------------------------------------


def test_without_watch_the_status_says_inactive(client: TestClient) -> None:
    assert client.get("/api/watch").json() == {"active": False}
    assert "watch" not in client.get("/api/info").json()


def test_a_file_added_under_a_watched_folder_shows_in_the_status(index_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pixfind.ingest.watch import watching_in_background
    from pixfind.web.server import _watcher

    folder = tmp_path / 'watched <img src=x onerror="alert(1)">'
    drawn(folder, "first.jpg", seed=5)
    index = index_factory()
    app = create_app(index, tmp_path / "thumbs")
    lines: list[str] = []
    watcher = _watcher(index, app, [str(folder)], None)
    assert watcher is not None
    with TestClient(app) as client, watching_in_background(watcher, lines.append):
        wait_for(lambda: client.get("/api/watch").json()["phase"] == "watching", what="the first run")
        status = client.get("/api/watch").json()
        assert status["active"] and status["folders"] == [os.path.realpath(folder)]  # the name exactly
        assert status["last_batch"]["new"] == 1 and status["missing"] == [] and status["error"] is None
        first_at = status["last_batch"]["at"]
        draw_photo(6, (320, 240)).save(folder / "added.jpg")
        added = wait_for(
            lambda: (s := client.get("/api/watch").json())["last_batch"]["at"] > first_at and s,
            30,
            "the added file in the status",
        )
        assert (added["last_batch"]["new"], added["last_batch"]["failed"], added["batches"]) == (1, 0, 1)
        assert added["last_batch"]["at"] <= time.time()
        (folder / "broken.jpg").write_bytes(b"not a picture")
        broken = wait_for(
            lambda: (s := client.get("/api/watch").json())["last_batch"]["failed"] and s, 30, "the failed file"
        )
        assert broken["last_batch"]["problems"][0].startswith(str(folder / "broken.jpg"))
        shutil.rmtree(folder)
        gone = wait_for(lambda: client.get("/api/watch").json()["missing"], 30, "the folder gone")
        assert gone == [os.path.realpath(folder)]


def test_at_each_batch_every_queued_request_goes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock is not fair: released and taken again at once it often stays with the run. At a
    batch boundary the run keeps it released while requests are counted as waiting for it."""
    monkeypatch.setattr(jobs, "MAX_LEND_S", 60.0)
    lock, queued = threading.Lock(), [1]
    job = jobs.DuplicatesJob(index=None, lock=lock, waiting=lambda: queued[0])  # type: ignore[arg-type]
    lock.acquire()  # as the run holds it
    lending = threading.Thread(target=job._lend_lock)
    lending.start()
    time.sleep(0.5)  # far longer than the handoff's own pause
    assert lending.is_alive() and not lock.locked()  # still lent: one request is queued
    queued[0] = 0
    lending.join(30)
    assert not lending.is_alive() and lock.locked()  # taken back once the queue is empty
    lock.release()


# -- a stop while requests wait for the index -----------------------------------------------------


def test_a_request_waiting_for_the_index_answers_503_once_the_server_begins_to_stop(client: TestClient) -> None:
    service = client.app.state.pixfind  # type: ignore[attr-defined]
    answers: list[Any] = []
    with service.lock:  # a long batch of the watch, say, holds the index
        asking = threading.Thread(target=lambda: answers.append(client.get("/api/search", params={"q": "sea"})))
        asking.start()
        wait_for(lambda: service.waiting == 1, what="the search to wait for the index")
        service.begin_stop()
        asking.join(SETTLE_S)
        assert not asking.is_alive(), "the waiting search was not answered once the stop began"
    assert answers[0].status_code == 503
    assert "stopping" in answers[0].json()["detail"]


def test_a_stop_asked_of_the_server_is_told_before_its_grace_period() -> None:
    import signal

    from fastapi import FastAPI

    from pixfind.web.server import make_server

    told: list[str] = []
    server = make_server(FastAPI(), on_stop=[lambda: told.append("stop")])
    server.handle_exit(signal.SIGTERM, None)
    assert told == ["stop"] and server.should_exit
