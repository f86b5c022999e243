"""Run the real ``pixfind`` CLI, and kill it (or press Ctrl-C on it) at a chosen point.

    python tests/crashpoint.py POINT N ACTION [WRITE_EVERY] -- index FOLDER --uri DB ...

POINT is where, counted N times (1 = the first time the point is reached):

* ``scan``: after the N-th file found by the scanner;
* ``decode``: in a decode thread, when the N-th file is decoded;
* ``encode``: after the N-th batch is embedded, before its rows are written (mid-batch);
* ``upsert``: during the N-th upsert call to Milvus, a random 0-40 ms after it starts;
* ``delete``: during the N-th delete call (removing rows of vanished files);
* ``model``: when the model starts loading;
* ``never``: run to the end (the same harness, for timings).

ACTION is ``kill`` (SIGKILL to this process: the hardest crash), ``killall`` (SIGKILL to this
process and its Milvus Lite server at once), or ``sigint`` (SIGINT to the whole process group, as a
terminal's Ctrl-C does). WRITE_EVERY (optional) lowers the indexer's rows-per-write so a small
test folder is written in several steps. Nothing in pixfind itself is changed: the points are
wrappers around its functions, installed before the CLI runs.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time


def _fire(action: str) -> None:
    if action == "sigint":
        os.killpg(os.getpgid(0), signal.SIGINT)
        return
    if action == "killall":
        children = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split()
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)  # never reached


def install(point: str, count: int, action: str) -> None:
    import pixfind.indexer as indexer
    import pixfind.store as store

    calls = {"n": 0}
    lock = threading.Lock()

    def reached() -> bool:
        with lock:
            calls["n"] += 1
            return calls["n"] == count

    if point == "scan":
        real_scan = indexer.scan

        def scan(root: str):  # type: ignore[no-untyped-def]
            for found in real_scan(root):
                yield found
                if reached():
                    _fire(action)

        indexer.scan = scan
    elif point == "decode":
        real_prepare = indexer._prepare

        def prepare(*args, **kwargs):  # type: ignore[no-untyped-def]
            if reached():
                _fire(action)
            return real_prepare(*args, **kwargs)

        indexer._prepare = prepare
    elif point == "encode":
        real_encode = indexer.Indexer._encode

        def encode(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            rows = real_encode(self, *args, **kwargs)
            if reached():
                _fire(action)
            return rows

        indexer.Indexer._encode = encode
    elif point in ("upsert", "delete"):
        method = "write" if point == "upsert" else "delete"
        real = getattr(store.Store, method)

        def during(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if reached():
                threading.Timer(random.uniform(0, 0.04), _fire, (action,)).start()
            return real(self, *args, **kwargs)

        setattr(store.Store, method, during)
    elif point == "model":
        import pixfind.encoder as encoder

        real_init = encoder.ClipEncoder.__init__

        def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if reached():
                _fire(action)
            real_init(self, *args, **kwargs)

        encoder.ClipEncoder.__init__ = init
    elif point != "never":
        raise SystemExit(f"unknown point {point}")


def main() -> int:
    split = sys.argv.index("--")
    point, count, action, *rest = sys.argv[1:split]
    if rest:
        import pixfind.indexer as indexer

        indexer.WRITE_EVERY = int(rest[0])
    install(point, int(count), action)
    from pixfind.cli import main as cli_main

    return cli_main(sys.argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main())
