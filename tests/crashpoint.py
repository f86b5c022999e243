"""Run the real ``pixfind`` CLI, and kill it (or press Ctrl-C on it) at a chosen point.

    python tests/crashpoint.py POINT N ACTION [WRITE_EVERY [ROWS_PER_CALL]] -- index FOLDER --uri DB ...

POINT is where, counted N times (1 = the first time the point is reached):

* ``scan``: after the N-th file found by the scanner;
* ``decode``: in a decode thread, when the N-th file is decoded;
* ``encode`` (or ``embed``): after the N-th batch is embedded, before its rows are written;
* ``upsert``: inside the N-th ``Store.write`` call, held there: once Milvus has acknowledged the
  first of the call's upsert requests and before the next is sent, this wrapper fires the kill
  itself, so the call is known to be half done (ROWS_PER_CALL makes one write several requests);
* ``prune``: inside the prune (rows of vanished files deleted), after its N-th delete request is
  acknowledged and before the rest are sent (ROWS_PER_CALL keys per request);
* ``upsert-timer`` / ``delete``: a random 0-40 ms into the N-th upsert / delete call (anywhere:
  the randomised slow test uses these);
* ``model``: when the model starts loading;
* ``never``: run to the end (the same harness, for timings).

Before a kill at ``upsert`` or ``prune`` the wrapper prints one line to stderr,
``crashpoint: killed inside ... K of M rows ...``, which the tests read: they then know exactly
which rows were written. ACTION is ``kill`` (SIGKILL to this process: the hardest crash),
``killall`` (SIGKILL to this process and its Milvus Lite server at once), or ``sigint`` (SIGINT to
the whole process group, as a terminal's Ctrl-C does). WRITE_EVERY lowers the index run's
rows-per-write so a small test folder is written in several steps; ROWS_PER_CALL lowers the rows
(or keys) per Milvus request. Nothing in pixfind itself is changed: the points are wrappers
around its functions (and pymilvus' client methods), installed before the CLI runs.
"""

from __future__ import annotations

import os
import random
import re
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


def announce_the_runtime() -> None:
    """Say once, on stderr, what embedded the first batch (``torch``, ``onnxruntime`` or
    ``openvino``), so that a test knows which backend it exercised."""
    import pixfind.models.load as load

    real_load = load.load_encoder

    def load_encoder(*args, **kwargs):  # type: ignore[no-untyped-def]
        encoder = real_load(*args, **kwargs)
        real_encode = encoder.encode_images

        def encode_images(pixels):  # type: ignore[no-untyped-def]
            vectors = real_encode(pixels)
            if encoder.encode_images is encode_images:
                encoder.encode_images = real_encode  # once is enough
                _say(f"images embedded on {encoder.image_runtime or 'torch'}")
            return vectors

        encoder.encode_images = encode_images
        return encoder

    load.load_encoder = load_encoder


def install(point: str, count: int, action: str) -> None:
    import pixfind.ingest.plan as plan
    import pixfind.ingest.runner as runner
    import pixfind.store as store

    announce_the_runtime()

    calls = {"n": 0}
    lock = threading.Lock()

    def reached() -> bool:
        with lock:
            calls["n"] += 1
            return calls["n"] == count

    if point == "scan":
        real_scan = plan.scan

        def scan(root: str):  # type: ignore[no-untyped-def]
            for found in real_scan(root):
                yield found
                if reached():
                    _fire(action)

        plan.scan = scan
    elif point == "decode":
        real_decode = runner.decode_item

        def decode_item(*args, **kwargs):  # type: ignore[no-untyped-def]
            if reached():
                _fire(action)
            return real_decode(*args, **kwargs)

        runner.decode_item = decode_item
    elif point in ("encode", "embed"):
        real_encode = runner.Indexer._embed_batch

        def encode(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            rows = real_encode(self, *args, **kwargs)
            if reached():
                _fire(action)
            return rows

        runner.Indexer._embed_batch = encode
    elif point in ("upsert-timer", "delete"):
        method = "write" if point == "upsert-timer" else "delete"
        real = getattr(store.Store, method)

        def during(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if reached():
                threading.Timer(random.uniform(0, 0.04), _fire, (action,)).start()
            return real(self, *args, **kwargs)

        setattr(store.Store, method, during)
    elif point == "upsert":
        _inside_writes(store, reached, action)
    elif point == "prune":
        _inside_prune(runner, reached, action)
    elif point == "model":
        import pixfind.models.torch_clip as torch_clip

        real_init = torch_clip.ClipEncoder.__init__

        def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if reached():
                _fire(action)
            real_init(self, *args, **kwargs)

        torch_clip.ClipEncoder.__init__ = init
    elif point != "never":
        raise SystemExit(f"unknown point {point}")


def _say(line: str) -> None:
    print(f"crashpoint: {line}", file=sys.stderr, flush=True)


def _inside_writes(store, reached, action: str) -> None:  # type: ignore[no-untyped-def]
    """Kill inside the N-th Store.write, between two of its acknowledged upsert requests."""
    from pymilvus import MilvusClient

    real_write, real_upsert = store.Store.write, MilvusClient.upsert
    held = {"rows": 0, "acked": 0}

    def write(self, rows, *args, **kwargs):  # type: ignore[no-untyped-def]
        if reached():
            held["rows"], held["acked"] = len(rows), 0
        try:
            return real_write(self, rows, *args, **kwargs)
        finally:
            held["rows"] = 0

    def upsert(client, collection_name, data, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = real_upsert(client, collection_name, data, *args, **kwargs)
        if held["rows"]:
            held["acked"] += len(data)
            if held["acked"] < held["rows"]:
                _say(f"killed inside Store.write: {held['acked']} of {held['rows']} rows acknowledged")
                _fire(action)
        return result

    store.Store.write = write
    MilvusClient.upsert = upsert


def _inside_prune(runner, reached, action: str) -> None:  # type: ignore[no-untyped-def]
    """Kill inside the prune, after its N-th acknowledged delete request, with more to send."""
    from pymilvus import MilvusClient

    from pixfind.ingest.scan import Presence, PresenceCheck

    real_prune, real_delete = runner.Indexer._prune, MilvusClient.delete
    pruning = {"on": False, "deleted": 0, "gone": 0}
    real_check = PresenceCheck.__call__

    def counting_check(self, path: str):  # type: ignore[no-untyped-def]  # how many rows the prune will delete
        verdict = real_check(self, path)
        if pruning["on"] and verdict.presence is Presence.GONE:
            pruning["gone"] += 1
        return verdict

    def prune(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        pruning["on"] = True
        try:
            return real_prune(self, *args, **kwargs)
        finally:
            pruning["on"] = False

    def delete(client, collection_name, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = real_delete(client, collection_name, *args, **kwargs)
        if pruning["on"]:
            pruning["deleted"] += len(re.findall(r'"[^"]*"', kwargs.get("filter", "")))  # keys are quoted
            if reached() and pruning["deleted"] < pruning["gone"]:
                _say(f"killed inside the prune: {pruning['deleted']} of {pruning['gone']} rows deleted")
                _fire(action)
        return result

    PresenceCheck.__call__ = counting_check
    runner.Indexer._prune = prune
    MilvusClient.delete = delete


def main() -> int:
    split = sys.argv.index("--")
    point, count, action, *rest = sys.argv[1:split]
    if rest:
        import pixfind.ingest.runner as runner

        runner.WRITE_EVERY = int(rest[0])
    if len(rest) > 1:
        import pixfind.store.milvus as store
        import pixfind.store.policies as policies

        policies.WRITE_BATCH = policies.SERVER_WRITE_ROWS = store.LOOKUP_BATCH = int(rest[1])
    install(point, int(count), action)
    from pixfind.cli import main as cli_main

    return cli_main(sys.argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main())
