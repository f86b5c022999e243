"""How long a photo written into a watched folder takes to be found by a search, and how long a
search waits while ``pixfind serve --watch`` indexes a batch.

    PYTHONPATH=src python benchmarks/watch_latency.py [--model ViT-B-32] [--files 10] [--batch 48]

A real ``pixfind serve --watch`` process (random weights: the compute of the real model, the
default CPU runtime) on a temporary index; real photos from ``benchmarks/photos.py``. Each photo is
written as a program saving a file does (beside, then renamed into place), one at a time, and
``/api/search`` is asked every 50 ms until it returns that photo: write-to-searchable is the
debounce's quiet time (``QUIET_S``), a tick of the loop, decoding, one model call and the write.
Then ``--batch`` photos are copied at once and searches are timed while the batch is applied.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from photos import photo_dir

SRC = str(Path(__file__).resolve().parent.parent / "src")


class Serve:
    def __init__(self, db: Path, folder: Path, model: str) -> None:
        env = {**os.environ, "PYTHONPATH": SRC, "PIXFIND_PRETRAINED": "none", "PIXFIND_MODEL": model}
        command = [sys.executable, "-m", "pixfind", "serve", "--uri", str(db), "--watch", str(folder), "--port", "0"]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait(r"(http://[^\s/]+:\d+/)", 900).group(1)
        self._wait(r"pixfind: watching", 900)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def _wait(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                found = re.search(pattern, line)
                if found:
                    return found
            if self.process.poll() is not None:
                sys.exit("pixfind serve ended:\n" + "".join(self.lines))
            time.sleep(0.1)
        sys.exit(f"no {pattern!r} from pixfind serve:\n" + "".join(self.lines))

    def paths_found(self, k: int = 100) -> tuple[set[str], float]:
        started = time.perf_counter()
        answer = httpx.get(f"{self.url}api/search", params={"q": "a photo", "k": k}, timeout=300)
        answer.raise_for_status()
        return {hit["path"] for hit in answer.json()}, time.perf_counter() - started

    def applying(self) -> bool:
        return bool(httpx.get(f"{self.url}api/info", timeout=300).json()["watch"]["applying"])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def save(source: Path, target: Path) -> None:
    part = target.with_name(target.name + ".part")
    shutil.copyfile(source, part)
    os.replace(part, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--batch", type=int, default=48)
    args = parser.parse_args()
    photos = sorted(photo_dir(300).glob("*.jpg"))
    print(f"load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs (shared); model {args.model} (random weights)")
    with tempfile.TemporaryDirectory(prefix="pixfind-watch-") as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        save(photos[0], folder / "first.jpg")
        started = time.perf_counter()
        serve = Serve(Path(tmp) / "index.db", folder, args.model)
        print(f"serve --watch up, first run done, in {time.perf_counter() - started:.1f} s")
        try:
            latencies = []
            for n, source in enumerate(photos[1 : 1 + args.files], 1):
                target = folder / f"new_{n:03d}.jpg"
                written = time.perf_counter()
                save(source, target)
                while str(target.resolve()) not in serve.paths_found()[0]:
                    time.sleep(0.05)
                latencies.append(time.perf_counter() - written)
                time.sleep(1.5)  # the next write starts a batch of its own
            median = statistics.median(latencies)
            print(
                f"write -> searchable, {len(latencies)} photos one at a time: median {median:.2f} s, "
                f"min {min(latencies):.2f}, max {max(latencies):.2f}"
            )
            batch = folder / "batch"
            batch.mkdir()
            copied = time.perf_counter()
            for n, source in enumerate(photos[100 : 100 + args.batch]):
                save(source, batch / f"{n:03d}.jpg")
            while not serve.applying():
                time.sleep(0.05)
            waits = []
            while serve.applying():
                waits.append(serve.paths_found(5)[1])
            last = str((batch / f"{args.batch - 1:03d}.jpg").resolve())
            while last not in serve.paths_found(200)[0]:
                time.sleep(0.05)
            print(
                f"batch of {args.batch} photos: searchable {time.perf_counter() - copied:.1f} s after the copy began; "
                f"{len(waits)} searches during it: median {statistics.median(waits):.2f} s, max {max(waits):.2f} "
                "(each waits for the model batch in hand)"
            )
            print(f"load average at the end {os.getloadavg()[0]:.2f}")
        finally:
            serve.stop()


if __name__ == "__main__":
    main()
