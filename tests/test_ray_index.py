"""``pixfind index --ray``: the index run on a Ray cluster (``local_ray``: loopback, a head without
CPUs and three 1-CPU nodes) into the real Milvus server, with ViT-S-32's random weights.

What is checked, against independent oracles: every image stored exactly once (``oracle``: one
row per file, ``count(*)`` equal to the distinct keys) with open_clip's own reference vector
(cosine >= 0.99999: these files are never decoded reduced) and the vector a local run stores;
bad files reported as a local run reports them; the same after a node is killed mid-run, and
after the driver is killed and the run repeated.

Each test is bounded: a watchdog ends the session with every thread's traceback if one hangs.
"""

from __future__ import annotations

import faulthandler
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import oracle
import pytest
from conftest import SMALL_MODEL, cli_env, draw_photo
from milvus_server import MilvusServer
from ray_cluster import LocalRayCluster

from pixfind.api import ImageIndex
from pixfind.config import ModelSpec
from pixfind.ingest.ray_runner import RayOptions
from pixfind.ingest.report import NoProgress
from pixfind.store import Store

pytestmark = pytest.mark.server

TEST_LIMIT_S = 240  # per test, cluster and server start included
IMAGES = 24
BAD = {"broken.jpg": b"this is not a JPEG", "empty.png": b""}
SMALL_BLOCKS = RayOptions(decode_batch=2, embed_batch=2)  # many tasks: a node lost mid-run loses some
#: Files that fail to decode: the progress counts them too, so only past this many was a row written.
FAILURES = 1 + len(BAD)


@pytest.fixture(autouse=True)
def _watchdog() -> Iterator[None]:
    faulthandler.dump_traceback_later(TEST_LIMIT_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """IMAGES drawn JPEGs (small: never decoded reduced), a truncated JPEG and two non-images."""
    folder = tmp_path_factory.mktemp("ray-photos")
    for seed in range(IMAGES):
        draw_photo(seed, (160 + 8 * seed, 120)).save(folder / f"p{seed:03d}.jpg")
    whole = (folder / "p000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    for name, data in BAD.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def local_run(photos: Path, small_encoder, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """What a local run of the same folder stores and reports (the reference for the Ray runs)."""
    uri = str(tmp_path_factory.mktemp("local") / "local.db")
    with ImageIndex(uri=uri, model=ModelSpec(SMALL_MODEL, None), encoder=small_encoder) as idx:
        report = idx.add(photos)
        keys = [key for page in idx.store.iter_keys() for key in page]
        vectors = idx.store.vectors_of(keys)
    return {"report": report, "vectors": vectors}


def good_files(photos: Path) -> list[str]:
    return sorted(str(photos / f"p{seed:03d}.jpg") for seed in range(IMAGES))


def fresh_collection() -> str:
    return f"ray_{uuid.uuid4().hex[:12]}"


def assert_like_local(
    server: MilvusServer, collection: str, photos: Path, local_run: dict[str, object], strong: bool = False
) -> None:
    """Exactly once, the oracle's vectors, and a local run's vectors (cosine >= 0.99999 each)."""
    oracle.check_index(
        server.uri, good_files(photos), model=SMALL_MODEL, token=server.token, collection=collection, strong=strong
    )
    local_vectors: dict[str, list[float]] = local_run["vectors"]  # type: ignore[assignment]
    with Store(server.uri, server.token, collection, create=False) as store:
        stored = store.vectors_of(list(local_vectors))
    assert set(stored) == set(local_vectors)
    worst = min(float(np.dot(stored[key], local_vectors[key])) for key in local_vectors)
    assert worst >= oracle.EXACT_MIN_COSINE, f"a Ray vector differs from the local run's: cosine {worst}"


class CallOnFirstRows(NoProgress):
    """Progress that calls ``action`` once, as soon as some rows are reported done."""

    def __init__(self, action) -> None:  # type: ignore[no-untyped-def]
        self.action = action
        self.done = 0
        self.called_at: int | None = None

    def embedded(self, count: int) -> None:
        self.done += count
        if self.called_at is None and self.done > 0:
            self.called_at = self.done
            self.action()


def test_ray_run_stores_every_image_once_with_the_local_vectors(
    local_ray: LocalRayCluster, milvus_server: MilvusServer, photos: Path, local_run: dict[str, object]
) -> None:
    collection = fresh_collection()
    with ImageIndex(uri=milvus_server.uri, token=milvus_server.token, collection=collection) as idx:
        report = idx.add(photos, ray=True)
    local = local_run["report"]
    assert (report.new, report.embedded, report.updated) == (IMAGES, IMAGES, 0)
    assert sorted(report.failed) == sorted(local.failed)  # type: ignore[attr-defined]
    assert {Path(path).name for path, _ in report.failed} == {"truncated.jpg", *BAD}
    assert_like_local(milvus_server, collection, photos, local_run)

    # A second run plans against the stored rows: nothing to embed, the bad files again.
    with ImageIndex(uri=milvus_server.uri, token=milvus_server.token, collection=collection) as idx:
        again = idx.add(photos, ray=True)
        with_facts = idx.rows_with_facts()
    # the rows Ray wrote carry the filters' fields: nothing to backfill
    assert (again.new, again.unchanged, again.embedded, again.backfilled) == (0, IMAGES, 0, 0)
    assert with_facts == IMAGES
    assert sorted(again.failed) == sorted(local.failed)  # type: ignore[attr-defined]


def test_a_node_killed_mid_run_still_stores_every_image_once(
    local_ray: LocalRayCluster, milvus_server: MilvusServer, photos: Path, local_run: dict[str, object]
) -> None:
    import ray

    removed: list[str] = []
    progress = CallOnFirstRows(lambda: removed.append(local_ray.remove_worker()))
    collection = fresh_collection()
    try:
        with ImageIndex(uri=milvus_server.uri, token=milvus_server.token, collection=collection) as idx:
            report = idx.add(photos, ray=SMALL_BLOCKS, progress=progress)
        assert removed, "no node was removed"
        assert progress.called_at is not None and progress.called_at < IMAGES + len(BAD) + 1  # mid-run
        assert removed[0] not in {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        assert (report.new, report.embedded, len(report.failed)) == (IMAGES, IMAGES, 1 + len(BAD))
        assert_like_local(milvus_server, collection, photos, local_run)
    finally:
        for _ in removed:
            local_ray.add_worker()
    assert local_ray.cpus() == 3


DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys
    from pixfind.api import ImageIndex
    from pixfind.ingest import ray_runner
    from pixfind.ingest.ray_runner import RayOptions
    from pixfind.ingest.report import NoProgress

    ray_runner.POLL_S = 0.05  # see how far the workers got soon after their first write

    class KillOnFirstRow(NoProgress):
        done = 0

        def embedded(self, count):
            self.done += count
            print(json.dumps({"embedded": self.done}), flush=True)
            if self.done > int(failures):  # the counts include failed files: past them, a row is stored
                os.killpg(os.getpgid(0), signal.SIGKILL)  # the driver dies here, its job mid-run

    uri, token, collection, folder, address, failures = sys.argv[1:]
    with ImageIndex(uri=uri, token=token, collection=collection) as idx:
        options = RayOptions(address=address, decode_batch=2, embed_batch=2)
        report = idx.add(folder, progress=KillOnFirstRow(), ray=options)
    print(json.dumps({"finished": report.new}), flush=True)
    """
)
KILL_ATTEMPTS = 3  # a run that raced to its end before the kill landed proves nothing: run anew


def run_driver_killed_on_its_first_row(args: list[str]) -> int:
    """Run DRIVER to its self-kill; how many files its workers had reported done then, or IMAGES
    and more when the run finished first."""
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, *args, str(FAILURES)],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    timer = threading.Timer(150, driver.kill)  # never wait for a hung driver beyond the test's bound
    timer.start()
    done = 0
    try:
        assert driver.stdout is not None
        for line in driver.stdout:
            event = json.loads(line)
            done = max(done, event.get("embedded", 0), IMAGES + FAILURES if "finished" in event else 0)
    finally:
        timer.cancel()
        driver.kill()
        driver.wait(30)
    assert driver.returncode == -signal.SIGKILL or done >= IMAGES, f"the driver failed ({driver.returncode})"
    return done


def test_a_killed_driver_and_the_run_repeated_store_every_image_once(
    local_ray: LocalRayCluster, milvus_server: MilvusServer, photos: Path, local_run: dict[str, object]
) -> None:
    for _ in range(KILL_ATTEMPTS):
        collection = fresh_collection()
        args = [milvus_server.uri, milvus_server.token or "", collection, str(photos), local_ray.cluster.address]
        killed_after = run_driver_killed_on_its_first_row(args)
        if killed_after < IMAGES:
            break
    assert FAILURES < killed_after < IMAGES, f"the driver was not killed mid-run ({killed_after} done)"

    time.sleep(1)  # let the cluster end the dead driver's job
    kept = oracle.stored_rows(milvus_server.uri, milvus_server.token, collection, strong=True)
    assert kept, "the killed driver's workers wrote nothing"
    with ImageIndex(uri=milvus_server.uri, token=milvus_server.token, collection=collection) as idx:
        report = idx.add(photos, ray=SMALL_BLOCKS)
    # the repeated run may still see the collection as empty (a server read is bounded-stale, as
    # for a local run killed the same way) and embed those files again: upserts, so once each
    assert report.new + report.unchanged == IMAGES
    assert_like_local(milvus_server, collection, photos, local_run, strong=True)


def test_cli_ray_on_a_lite_file_writes_from_the_driver(
    local_ray: LocalRayCluster, photos: Path, local_run: dict[str, object], tmp_path: Path
) -> None:
    uri = str(tmp_path / "lite.db")
    command = [
        sys.executable,
        "-m",
        "pixfind",
        "index",
        str(photos),
        "--uri",
        uri,
        "--ray-address",
        local_ray.cluster.address,
    ]
    done = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"indexed: {IMAGES} new, 0 updated" in done.stderr
    assert sum("  skipped " in line for line in done.stderr.splitlines()) == 1 + len(BAD)
    oracle.check_index(uri, good_files(photos), model=SMALL_MODEL)


def test_without_ray_installed_ray_is_one_line_naming_the_extra(photos: Path, tmp_path: Path) -> None:
    code = "import sys; sys.modules['ray'] = None; from pixfind.cli import run; sys.argv[0] = 'pixfind'; run()"
    args = ["index", str(photos), "--uri", str(tmp_path / "x.db"), "--ray"]
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=cli_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'pixfind[ray]'" in lines[0], done.stderr
    assert not (tmp_path / "x.db").exists()
