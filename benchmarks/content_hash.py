"""What does confirming moves and copies by a whole-file hash cost?

Two figures, on real photos (``photos.py``, derived JPEGs of 0.3-12 MP):

* ``--part decode``: per photo, what an index run does before the model: the old path
  (fingerprint: 128 KiB read, then Pillow decodes from the file) against the new one (the file
  read once, fingerprint and BLAKE3 of those bytes, Pillow decodes the same bytes). One thread.
* ``--part moves``: a re-index after N files (default 10,000) were moved: rows are stored as an
  index run would have stored them (random vectors, each file's real size, mtime, fingerprint
  and, where this pixfind records one, content hash), the folder is renamed, then a timed
  ``Indexer.run`` finds every file moved. Run it once with this checkout and once with an older
  one on ``PYTHONPATH`` for the before/after pair (the older pixfind takes fingerprints alone).
  The N files are the 1,000 photos, each written N/1000 times with a different trailer after
  the JPEG data, so every file's content (and its last 64 KiB) is its own.

    python benchmarks/content_hash.py --part decode
    python benchmarks/content_hash.py --part moves [--n 10000] [--workdir /tmp/pixfind-moves]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from photos import photo_dir

from pixfind.config import ModelSpec
from pixfind.ingest import content
from pixfind.ingest.decode import load_image
from pixfind.ingest.runner import Indexer
from pixfind.pathkeys import key_of
from pixfind.store import Row, Store

DRAFT_SIDE = 336  # ViT-B-32's 224 x 1.5, as an index run decodes


def decode_part(photos: list[Path], rounds: int) -> None:
    def old(path: str) -> None:
        content.fingerprint(path, os.path.getsize(path))
        load_image(path, min_side=DRAFT_SIDE)

    def new(path: str) -> None:
        raw = content.read_file(path)
        raw.digests()
        load_image(path, min_side=DRAFT_SIDE, data=raw.data)

    def hash_only(path: str) -> None:
        content.read_file(path).digests()

    sizes = [p.stat().st_size for p in photos]
    print(f"{len(photos)} photos, {sum(sizes) / len(sizes) / 1e6:.2f} MB on average (files in the page cache)")
    timings: dict[str, list[float]] = {"old: fingerprint + decode": [], "new: read once, hash, decode": []}
    timings["of which read + hashes"] = []
    for _ in range(rounds):  # interleaved, so that a busy neighbour slows both alike
        for name, step in zip(timings, (old, new, hash_only), strict=True):
            started = time.perf_counter()
            for photo in photos:
                step(str(photo))
            timings[name].append((time.perf_counter() - started) / len(photos) * 1000)
    for name, values in timings.items():
        rounds = ", ".join(f"{v:.2f}" for v in values)
        print(f"  {name:32s} {statistics.median(values):6.2f} ms/photo (rounds: {rounds})")


def make_files(photos: list[Path], folder: Path, count: int) -> list[Path]:
    paths = []
    copies = -(-count // len(photos))
    for copy in range(copies):
        sub = folder / f"set{copy:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        for photo in photos:
            if len(paths) == count:
                return paths
            path = sub / photo.name
            path.write_bytes(photo.read_bytes() + f"pixfind-benchmark-copy-{copy}".encode())
            paths.append(path)
    return paths


def moves_part(photos: list[Path], count: int, work: Path) -> None:
    records_content = hasattr(content, "content_hash")
    shutil.rmtree(work, ignore_errors=True)
    before, after = work / "before", work / "after"
    started = time.perf_counter()
    paths = make_files(photos, before, count)
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths):,} files ({total / 1e9:.2f} GB) in {time.perf_counter() - started:.1f}s")
    store = Store(str(work / "index.db"))
    store.ensure(ModelSpec("ViT-B-32", "openai"), 512)
    rng = np.random.default_rng(0)
    rows = []
    started = time.perf_counter()
    for path in paths:
        info = os.stat(path)
        vector = rng.normal(size=512).astype(np.float32)
        print_ = content.fingerprint(str(path), info.st_size)
        row = Row(key_of(str(path)), vector / np.linalg.norm(vector), info.st_size, info.st_mtime_ns, 1, 1, print_)
        if records_content:
            row.content = content.content_hash(path=str(path))
        rows.append(row)
    store.write(rows)
    print(f"stored {len(rows):,} rows in {time.perf_counter() - started:.1f}s (content hash: {records_content})")
    before.rename(after)

    def no_model():  # type: ignore[no-untyped-def]
        raise AssertionError("moved files must not need the model")

    started = time.perf_counter()
    report = Indexer(store, no_model).run([str(work)])
    elapsed = time.perf_counter() - started
    assert report.moved == count and report.new == report.removed == 0, report
    assert store.count() == count
    store.close()
    print(f"re-index after {count:,} files were moved: {elapsed:.2f}s ({count / elapsed:,.0f} files/s)")
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["decode", "moves"], required=True)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/pixfind-moves")
    args = parser.parse_args()
    photos = sorted(photo_dir(args.photos).glob("*.jpg"))
    if args.part == "decode":
        decode_part(photos, args.rounds)
    else:
        moves_part(photos, args.n, Path(args.workdir))


if __name__ == "__main__":
    main()
