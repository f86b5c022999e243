"""Two processes on one embedded (Milvus Lite) index: the second is told who holds it, or waits.

Milvus Lite 2.5 cannot share a file between processes (and its own lock is unreliable: a failed
second opener deletes the lock file it never held), so pixfind takes an ``fcntl`` lock on
``INDEX.db.lock`` first. Measured behaviour, asserted here:

* a second ``pixfind index`` exits at once with code 75 and one line naming the holder's pid;
* a ``pixfind search`` or ``info`` during an index run does the same (searches while indexing
  need a Milvus server); with ``--wait`` each waits for the holder to finish, then runs;
* a holder that dies (even by SIGKILL) frees the lock at once: the kernel drops it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_crash import make_library, pixfind_env

from pixfind.cli import main
from pixfind.errors import IndexLockedError

HOLD = """
import sys, time
from pixfind.store import Store
store = Store(sys.argv[1])
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
store.close()
print("released", flush=True)
"""


def hold(uri: str, seconds: float) -> subprocess.Popen[str]:
    """Another process that opens the index and keeps it for ``seconds``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, uri, str(seconds)],
        env=pixfind_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_second_opener_in_another_process_is_told_the_pid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pixfind.store import Store

    uri = str(tmp_path / "shared.db")
    holder = hold(uri, 60)
    try:
        with pytest.raises(IndexLockedError, match=f"being used by pid {holder.pid}"):
            Store(uri)
        make_library(tmp_path / "photos", 1)
        for args in (["index", str(tmp_path / "photos")], ["search", "a dog"], ["info"]):
            code = main([*args, "--uri", uri])
            err = capsys.readouterr().err
            assert code == 75, err
            assert f"is being used by pid {holder.pid}" in err and "--wait" in err
            assert err.strip().count("\n") == 0 and "Traceback" not in err
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL of the holder frees the lock at once
    with Store(uri) as store:
        assert not store.exists()


def test_wait_flag_waits_for_the_holder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = str(tmp_path / "shared.db")
    holder = hold(uri, 2.0)
    started = time.monotonic()
    try:
        code = main(["info", "--uri", uri, "--wait", "--json"])
    finally:
        holder.wait(30)
    assert code == 0, capsys.readouterr().err
    assert time.monotonic() - started >= 1.0  # it did wait
    assert holder.stdout is not None and holder.stdout.read().strip() == "released"


def test_search_while_a_real_index_run_holds_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``pixfind index`` in another process; a search meanwhile fails clearly, then --wait works."""
    folder = tmp_path / "library"
    make_library(folder, 8)
    uri = str(tmp_path / "live.db")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pixfind", "index", str(folder), "--uri", uri, "--batch-size", "2"],
        env=pixfind_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        lock = Path(uri + ".lock")
        deadline = time.monotonic() + 120
        while not (Path(uri).exists() and lock.exists() and lock.read_text().strip() == str(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline, "the index run did not start"
            time.sleep(0.05)
        code = main(["search", "a dog", "--uri", uri])
        err = capsys.readouterr().err
        assert code == 75 and f"being used by pid {proc.pid}" in err, err
        code = main(["search", "a dog", "--uri", uri, "--wait", "--json", "-k", "20"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert proc.wait(120) == 0, proc.stderr.read() if proc.stderr else ""
        assert out.count('"path"') == 8  # the search ran after the index run, and saw every image
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
