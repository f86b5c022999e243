"""What does the first index run after upgrading cost, when it adds the filters' fields (date taken,
camera, type, orientation) to the rows of an index built before they existed?

Takes the derived real photos of ``photos.py`` (EXIF as the Debian sources carry it), hard-links
them N/len times into one folder of N files (default 10,000; copies when links are impossible),
stores a row per file as an older pixfind did (random unit vectors, the files' real size, mtime
and fingerprint, no facts), then times, ``--repeat`` times each:

* the backfill run: every file unchanged, every row given its fields (each file's header read,
  its stored vector written back with the richer record; no model is loaded);
* the run after it: nothing to do (what every later run costs, with or without this feature);
* the header reads alone (``ingest.facts.read_facts`` on every file, one thread).

Before each backfill run the rows are rewritten without the fields. The page cache is warm (the
files were just linked and read), as on a machine that indexes often.

    python benchmarks/backfill.py [--n 10000] [--photos 1000] [--workdir /tmp/pixfind-backfill]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import photo_dir

from pixfind.config import ModelSpec
from pixfind.ingest.content import fingerprint
from pixfind.ingest.facts import read_facts
from pixfind.ingest.runner import Indexer
from pixfind.pathkeys import key_of
from pixfind.store import Row, Store


def linked_folder(source: Path, target: Path, count: int) -> list[Path]:
    """``count`` files under ``target``: the photos of ``source`` hard-linked as often as needed."""
    photos = sorted(source.glob("*.jpg"))
    paths: list[Path] = []
    for i in range(count):
        original = photos[i % len(photos)]
        sub = target / f"copy{i // len(photos):02d}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / original.name
        try:
            os.link(original, path)
        except OSError:
            shutil.copyfile(original, path)
        paths.append(path)
    return paths


def old_rows(paths: list[Path]) -> list[Row]:
    """Rows as pixfind wrote them before the filters' fields existed."""
    rng = np.random.default_rng(0)
    rows = []
    for path in paths:
        info = os.stat(path)
        vector = rng.normal(size=512).astype(np.float32)
        vector /= np.linalg.norm(vector)
        print_ = fingerprint(str(path), info.st_size)
        rows.append(Row(key_of(str(path)), vector, info.st_size, info.st_mtime_ns, 640, 480, print_, None))
    return rows


def no_model():  # type: ignore[no-untyped-def]
    raise AssertionError("a backfill must not need the model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--photos", type=int, default=1000, help="derived photos to link (photos.py)")
    parser.add_argument("--workdir", default="/tmp/pixfind-backfill")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    folder = work / "photos"
    paths = linked_folder(photo_dir(args.photos), folder, args.n)
    rows = old_rows(paths)
    store = Store(str(work / "index.db"))
    store.ensure(ModelSpec("ViT-B-32", "openai"), 512)

    backfill_s, idle_s, headers_s = [], [], []
    exif_dates = 0
    for _ in range(args.repeat):
        store.write(rows)
        store.flush()
        started = time.perf_counter()
        report = Indexer(store, no_model).run([str(folder)])
        backfill_s.append(time.perf_counter() - started)
        assert (report.backfilled, report.unchanged, report.embedded) == (args.n, args.n, 0), report

        started = time.perf_counter()
        report = Indexer(store, no_model).run([str(folder)])
        idle_s.append(time.perf_counter() - started)
        assert (report.backfilled, report.unchanged) == (0, args.n), report

        started = time.perf_counter()
        facts = [read_facts(str(path), 640, 480, 0) for path in paths]
        headers_s.append(time.perf_counter() - started)
        exif_dates = sum(fact["taken_from"] == "exif" for fact in facts)
    store.close()

    def median(values: list[float]) -> float:
        return statistics.median(values)

    print(f"{args.n:,} unchanged files ({args.photos:,} derived photos linked), {exif_dates:,} with an EXIF date")
    print(f"  backfill run:        median {median(backfill_s):.2f}s ({args.n / median(backfill_s):,.0f} files/s)")
    print(f"  run after it:        median {median(idle_s):.2f}s ({args.n / median(idle_s):,.0f} files/s)")
    print(f"  header reads alone:  median {median(headers_s):.2f}s ({median(headers_s) / args.n * 1e6:.0f} us a file)")
    print(f"  backfill / nothing-to-do: {median(backfill_s) / median(idle_s):.1f}x")
    print("  runs: " + ", ".join(f"{b:.2f}/{i:.2f}" for b, i in zip(backfill_s, idle_s, strict=True)))


if __name__ == "__main__":
    main()
