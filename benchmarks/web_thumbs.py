"""What checking every thumbnail request against the index costs: a page of 50 thumbnails.

    PYTHONPATH=src python benchmarks/web_thumbs.py [--photos 50] [--rounds 10] [--before SRC]

Indexes ``--photos`` real photos (the first of ``benchmarks/photos.py``'s set, copied to a
temporary folder; ViT-S-32 with random weights: the model plays no part in a thumbnail), starts
``pixfind serve`` on it and loads the page's thumbnails as a browser does, over 6 kept-alive
connections: once to make them (first view), then ``--rounds`` times from the server's disk cache
(the browser's cache off: every request is answered and checked), then as revalidations
(``If-None-Match``: 304s). With ``--before SRC`` (the ``src`` folder of an older checkout) the
same is measured, interleaved round by round, against that server too, and the ratio printed.

Since the trust review a thumbnail request looks up the file's index row (no 30 s cache) and
opens the file to compare its size, mtime and fingerprint (first and last 64 KiB); the in-process
part below times those two steps alone.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote, urlsplit

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))
sys.path.insert(0, str(HERE))

CONNECTIONS = 6  # what a browser opens per host


def build(folder: Path, db: Path) -> list[str]:
    from pixfind.api import ImageIndex
    from pixfind.config import ModelSpec

    with ImageIndex(uri=str(db), model=ModelSpec("ViT-S-32", None), device="cpu") as index:
        index.add(str(folder))
    return sorted(str(p) for p in folder.iterdir())


def start(src: Path, db: Path, workdir: Path) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": str(src), "PIXFIND_CACHE_DIR": str(workdir / "cache"), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pixfind", "serve", "--uri", str(db), "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        match = re.search(r" at (http://\S+:\d+/)", line)
        if match:
            threading.Thread(target=drain, args=(process.stdout,), daemon=True).start()
            return process, match.group(1)
    raise SystemExit(f"pixfind serve ({src}) did not start")


def drain(stream: object) -> None:
    """Read what the server prints, so it never blocks on a full pipe."""
    for _ in stream:  # type: ignore[attr-defined]
        pass


def load_page(url: str, paths: list[str], etags: dict[str, str] | None = None) -> tuple[float, dict[str, str], int]:
    """Fetch every thumbnail over CONNECTIONS kept-alive connections; seconds, ETags, 304s."""
    parts = urlsplit(url)
    local = threading.local()
    found: dict[str, str] = {}
    revalidated = 0
    lock = threading.Lock()

    def one(path: str) -> None:
        nonlocal revalidated
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        headers = {"If-None-Match": etags[path]} if etags else {}
        local.conn.request("GET", f"/api/thumb?path={quote(path)}", headers=headers)
        response = local.conn.getresponse()
        response.read()
        assert response.status in (200, 304), (response.status, path)
        with lock:
            found[path] = response.getheader("ETag") or ""
            revalidated += response.status == 304

    started = time.perf_counter()
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        list(pool.map(one, paths))
    return time.perf_counter() - started, found, revalidated


def in_process_steps(db: Path, paths: list[str]) -> dict[str, float]:
    """Milliseconds per thumbnail for the two checks a request now makes, alone."""
    from pixfind.ingest.content import fingerprint
    from pixfind.pathkeys import key_of
    from pixfind.store import Store

    with Store(str(db), create=False) as store:
        store.lookup([key_of(paths[0])])  # load the collection
        started = time.perf_counter()
        for _ in range(5):
            for path in paths:
                assert store.lookup([key_of(path)])
        lookup = (time.perf_counter() - started) / (5 * len(paths))
    started = time.perf_counter()
    for _ in range(5):
        for path in paths:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                fingerprint(f"/proc/self/fd/{fd}", os.fstat(fd).st_size)
            finally:
                os.close(fd)
    check = (time.perf_counter() - started) / (5 * len(paths))
    return {"row lookup (Milvus Lite)": lookup * 1000, "open + fstat + fingerprint": check * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--before", type=Path, help="src folder of the checkout to compare with")
    args = parser.parse_args()

    from photos import photo_dir

    source = sorted(p for p in photo_dir(300).iterdir() if p.suffix == ".jpg")[: args.photos]
    work = Path(tempfile.mkdtemp(prefix="pixfind-thumbs-"))
    try:
        folder = work / "photos"
        folder.mkdir()
        for photo in source:
            shutil.copyfile(photo, folder / photo.name)
        sizes = [p.stat().st_size for p in folder.iterdir()]
        print(f"{len(sizes)} photos, {statistics.median(sizes) / 1e6:.2f} MB median file size")
        servers = {"now": SRC}
        if args.before:
            servers["before"] = args.before.resolve()
        dbs = {}
        for name in servers:
            dbs[name] = work / f"{name}.db"
        paths = build(folder, dbs["now"])
        for name in servers:
            if name != "now":
                shutil.copyfile(dbs["now"], dbs[name])
        steps = in_process_steps(dbs["now"], paths)
        running = {name: start(src, dbs[name], work / name) for name, src in servers.items()}
        try:
            first, warm, revalidate = {}, {n: [] for n in servers}, {n: [] for n in servers}
            etags = {}
            for name, (_, url) in running.items():
                first[name], etags[name], _ = load_page(url, paths)
            for _ in range(args.rounds):
                for name, (_, url) in running.items():
                    warm[name].append(load_page(url, paths)[0])
                    seconds, _, count = load_page(url, paths, etags[name])
                    assert count == len(paths)
                    revalidate[name].append(seconds)
        finally:
            for process, _ in running.values():
                process.terminate()
                process.wait(30)
        print(f"page of {len(paths)} thumbnails, {CONNECTIONS} connections, median of {args.rounds} rounds:")
        for name in servers:
            print(
                f"  {name:6}  first view {first[name] * 1000:7.0f} ms   from the disk cache "
                f"{statistics.median(warm[name]) * 1000:6.0f} ms   revalidated (304) "
                f"{statistics.median(revalidate[name]) * 1000:6.0f} ms"
            )
        if "before" in servers:
            ratio = statistics.median(warm["now"]) / statistics.median(warm["before"])
            ratio_304 = statistics.median(revalidate["now"]) / statistics.median(revalidate["before"])
            print(f"  now / before: {ratio:.2f} from the disk cache, {ratio_304:.2f} revalidated")
        for step, ms in steps.items():
            print(f"  {step}: {ms:.2f} ms per thumbnail ({ms * len(paths):.0f} ms for the page, serialised)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
