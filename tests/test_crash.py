"""Crash and resume: ``pixfind index`` killed (SIGKILL) or interrupted (Ctrl-C) anywhere, then run
again, leaves every image stored exactly once, with nothing lost and nothing half-written.

Each run is the real CLI in a fresh process (tests/crashpoint.py picks the moment), on a real
Milvus Lite file. The default suite kills at a few fixed points; the ``slow`` test (set
PIXFIND_SLOW=1) kills at random points and random times, many times over.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import SMALL_MODEL, draw_photo
from oracle import check_index

import pixfind

HERE = Path(__file__).parent
SRC = str(Path(pixfind.__file__).resolve().parent.parent)
SLOW = pytest.mark.skipif(not os.environ.get("PIXFIND_SLOW"), reason="long randomised run: set PIXFIND_SLOW=1")


def pixfind_env() -> dict[str, str]:
    """The test's environment, with this checkout's pixfind first on the path of child processes."""
    env = {**os.environ, "PIXFIND_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    return env


def run_at(
    point: str,
    count: int,
    action: str,
    folder: Path,
    uri: str,
    write_every: int = 8,
    timeout: float = 300,
    *,
    rows_per_call: int | None = None,
    batch_size: int = 4,
    target: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """One ``pixfind index`` run in its own process group, stopped at ``point`` by ``action``.
    ``rows_per_call``: rows (or keys) per Milvus request; ``target``: more arguments naming the
    index (``--token``, ``--collection``); ``env``: the child's environment (default: torch)."""
    limits = [str(write_every)] + ([str(rows_per_call)] if rows_per_call else [])
    args = [sys.executable, str(HERE / "crashpoint.py"), point, str(count), action, *limits, "--"]
    args += ["index", str(folder), "--uri", uri, "--batch-size", str(batch_size), "--workers", "1", *target]
    proc = subprocess.Popen(
        args,
        env=env or pixfind_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)  # faulthandler prints where it hung
        out, err = proc.communicate()
        pytest.fail(f"pixfind index hung at {point}/{count}/{action}:\n{err[-4000:]}")
    _wait_for_orphans(uri)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _wait_for_orphans(uri: str, limit: float = 10.0) -> None:
    """A Milvus Lite server whose parent was killed exits on its own within milliseconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", f"milvus {uri} "], capture_output=True, text=True).stdout.strip()
        if not found:
            return
        time.sleep(0.05)
    pytest.fail(f"a Milvus Lite server for {uri} outlived its pixfind process")


def make_library(folder: Path, count: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(start, start + count):
        path = folder / f"photo {seed:03d}.jpg"
        draw_photo(seed, (96, 72)).save(path)
        paths.append(path)
    return paths


def good_images(folder: Path) -> set[str]:
    """The images that must be stored: all but the empty and the cut-short ones."""
    return {str(p) for p in folder.rglob("*.jpg") if p.stat().st_size > 0 and p.name != "cut.jpg"}


def stored_state(uri: str) -> tuple[list[str], int]:
    """(every stored key, count(*)), read in this process."""
    from pixfind.store import Store

    with Store(uri) as store:
        exists = store.exists()
        keys = [key for page in store.iter_keys() for key in page] if exists else []
        count = store.count() if exists else 0
    return keys, count  # closing the Store stopped its engine: the next process can open the file


def assert_exactly_once(uri: str, folder: Path) -> None:
    """One row per image file, each with the file's current record and its own vector (checked
    against open_clip's reference embedding of the file: tests/oracle.py)."""
    check_index(uri, good_images(folder), model=SMALL_MODEL)


def stored_count(uri: str) -> int:
    return len(stored_state(uri)[0])


WRITER = """
import random, sys
from pixfind.config import ModelSpec
from pixfind.store import Row, Store
store = Store(sys.argv[1])
store.ensure(ModelSpec("x", None), 64)
for batch in range(10_000):
    store.write([Row(f"/p/{batch}/{i}", [random.random() for _ in range(64)], 1, 1, 1, 1, "f") for i in range(200)])
    print(batch + 1, flush=True)  # acknowledged: upsert returned
"""


@pytest.mark.parametrize("victims", ["pixfind", "pixfind and its Milvus Lite server"])
def test_acknowledged_upserts_survive_sigkill_without_flush(victims: str, tmp_path: Path) -> None:
    """Milvus Lite persists each upsert before it returns: no flush is needed for durability."""
    uri = str(tmp_path / "durable.db")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, uri], env=pixfind_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acked = 0
    while acked < 5:
        acked = int(proc.stdout.readline())
    if victims != "pixfind":
        server = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "milvus"], capture_output=True, text=True)
        for pid in server.stdout.split():
            os.kill(int(pid), signal.SIGKILL)
    proc.kill()
    acked = max([acked, *(int(line) for line in proc.stdout.read().split())])
    proc.wait()
    _wait_for_orphans(uri)
    keys, count = stored_state(uri)
    assert count == len(keys) == len(set(keys))
    assert acked * 200 <= count <= (acked + 1) * 200  # every acknowledged batch; at most one more


def test_sigkill_at_fixed_points_then_resume_stores_each_image_once(tmp_path: Path) -> None:
    folder = tmp_path / "library"
    photos = make_library(folder, 28)
    (folder / "empty.jpg").write_bytes(b"")  # fails every run, must not stop the others
    uri = str(tmp_path / "index" / "crash.db")

    first = run_at("encode", 3, "kill", folder, uri)  # mid-batch: 12 embedded, 8 written
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert stored_count(uri) == 8

    # killed with its Milvus Lite server inside its 2nd write (rows 17-24 of the library), once
    # the first of that call's two requests was acknowledged: 8 + 8 + 4 rows stored
    second = run_at("upsert", 2, "killall", folder, uri, rows_per_call=4)
    assert second.returncode == -signal.SIGKILL, second.stderr
    assert "crashpoint: killed inside Store.write: 4 of 8 rows acknowledged" in second.stderr, second.stderr
    assert stored_count(uri) == 20

    photos[0].unlink()  # the library changes between runs, as it would
    photos[1].rename(folder / "renamed.jpg")
    make_library(folder / "new", 3, start=100)

    final = run_at("never", 0, "kill", folder, uri)
    assert final.returncode == 0, final.stderr
    assert "1 failed" in final.stderr and "empty file" in final.stderr
    assert_exactly_once(uri, folder)


def test_ctrl_c_stops_after_the_batch_saves_and_exits_130(tmp_path: Path) -> None:
    """SIGINT to the whole process group (a terminal's Ctrl-C also reaches Milvus Lite's server)."""
    folder = tmp_path / "library"
    make_library(folder, 24)
    uri = str(tmp_path / "index" / "int.db")
    stopped = run_at("encode", 3, "sigint", folder, uri, write_every=1000)
    assert stopped.returncode == 130, stopped.stderr
    assert "stopping after the current batch" in stopped.stderr
    assert "stopped early: 12 new" in stopped.stderr  # the batch in hand was finished and saved
    assert "run the same command again" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert stored_count(uri) == 12  # resuming from here is the crash test's final run


@pytest.mark.parametrize("point", ["scan", "model"])
def test_ctrl_c_during_scan_or_model_load_stops_cleanly(point: str, tmp_path: Path) -> None:
    folder = tmp_path / "library"
    make_library(folder, 6)
    uri = str(tmp_path / "index" / "int.db")
    stopped = run_at(point, 1, "sigint", folder, uri)
    assert stopped.returncode == 130, stopped.stderr
    assert "stopped early: 0 new" in stopped.stderr and "Traceback" not in stopped.stderr
    assert stored_count(uri) == 0


@SLOW
@pytest.mark.slow
def test_sigkill_at_random_points_many_times(tmp_path: Path) -> None:
    """Random points, counts and actions, with the library changing between runs; then resume."""
    rng = random.Random(int(os.environ.get("PIXFIND_SEED", "0")) or None)
    folder = tmp_path / "library"
    make_library(folder, 40)
    (folder / "cut.jpg").write_bytes((folder / "photo 000.jpg").read_bytes()[:200])
    uri = str(tmp_path / "index" / "random.db")
    next_seed = 1000
    deadline = time.monotonic() + float(os.environ.get("PIXFIND_SLOW_SECONDS", "600"))
    rounds = 0
    while time.monotonic() < deadline and rounds < 30:
        point = rng.choice(["scan", "decode", "encode", "upsert", "upsert-timer", "delete", "prune"])
        action = rng.choice(["kill", "killall"])
        result = run_at(
            point,
            rng.randint(1, 6),
            action,
            folder,
            uri,
            write_every=rng.choice([4, 8, 16]),
            rows_per_call=rng.choice([2, 3, 1000]),
        )
        assert result.returncode in (0, -signal.SIGKILL), result.stderr
        images = sorted(folder.rglob("photo*.jpg"))
        for path in rng.sample(images, k=min(len(images), rng.randint(0, 3))):
            if rng.random() < 0.5:
                path.unlink()
            else:
                path.rename(path.with_name(f"photo moved {next_seed}.jpg"))
                next_seed += 1
        make_library(folder / f"batch{rounds}", rng.randint(0, 4), start=next_seed)
        next_seed += 10
        rounds += 1
    # and a kill at a random moment in time, not at a named point
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "pixfind", "index", str(folder), "--uri", uri, "--batch-size", "4"],
            env=pixfind_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(rng.uniform(0.5, 15))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _wait_for_orphans(uri)
    final = run_at("never", 0, "kill", folder, uri)
    assert final.returncode == 0, final.stderr
    assert_exactly_once(uri, folder)
