"""How long does re-indexing an unchanged folder take? (No model is loaded on that path.)

Creates N small image files (default 10,000), stores a row for each (random unit vectors, the
files' real size and mtime, as an earlier `pixfind index` would have), then times a full
`pixfind index` pass over the folder, which must find every file unchanged.

    python benchmarks/rescan.py [--n 10000] [--workdir /tmp/pixfind-rescan]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pixfind.config import ModelSpec
from pixfind.ingest.content import fingerprint
from pixfind.ingest.runner import Indexer
from pixfind.pathkeys import key_of
from pixfind.store import Row, Store


def tiny_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 120, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


def make_files(folder: Path, count: int) -> list[Path]:
    paths = []
    content = tiny_jpeg()
    for i in range(count):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img_{i:06d}.jpg"
        path.write_bytes(content + i.to_bytes(4, "little"))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--workdir", default="/tmp/pixfind-rescan")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    folder = work / "photos"
    started = time.perf_counter()
    paths = make_files(folder, args.n)
    print(f"created {len(paths):,} files in {time.perf_counter() - started:.1f}s")

    store = Store(str(work / "index.db"))
    store.ensure(ModelSpec("ViT-B-32", "openai"), 512)
    rng = np.random.default_rng(0)
    rows = []
    for path in paths:
        info = os.stat(path)
        vector = rng.normal(size=512).astype(np.float32)
        vector /= np.linalg.norm(vector)
        rows.append(
            Row(key_of(str(path)), vector, info.st_size, info.st_mtime_ns, 1, 1, fingerprint(str(path), info.st_size))
        )
    started = time.perf_counter()
    store.write(rows)
    print(f"stored {len(rows):,} rows in {time.perf_counter() - started:.1f}s")

    def no_model():  # type: ignore[no-untyped-def]
        raise AssertionError("an unchanged folder must not need the model")

    times = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        report = Indexer(store, no_model).run([str(folder)])
        times.append(time.perf_counter() - started)
        assert report.unchanged == args.n and report.new == report.updated == report.removed == 0, report
    store.close()
    print(
        f"re-index of {args.n:,} unchanged files: median {statistics.median(times):.2f}s "
        f"({args.n / statistics.median(times):,.0f} files/s) over {args.repeat} runs: "
        + ", ".join(f"{t:.2f}s" for t in times)
    )


if __name__ == "__main__":
    main()
