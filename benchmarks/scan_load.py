"""Load test: scan and plan a tree of many files; print time, peak memory and progress reports.

    python benchmarks/scan_load.py [--files 200000] [--tree /tmp/pixfind-scan-load] [--stored]

The tree holds empty files: half with image extensions (what pixfind looks at), half other files
(what it must skip cheaply), 200 per folder, folders two levels deep. Each phase runs in a fresh
process so its peak RSS (``ru_maxrss``) is its own:

* ``scan``: :func:`pixfind.ingest.scan.scan` over the tree, nothing kept;
* ``plan``: ``Indexer.run`` on a new Milvus Lite index, stopped when embedding would start: the
  scan, the per-chunk lookups and the to-do list the embedding phase would work through;
* ``replan`` (with ``--stored``): the same after a row was stored for every image file with its
  size and mtime, as on a re-run over an unchanged library: every file is looked up, all unchanged.

Progress: how many times ``progress.scanning`` was called during the scan, and after how long
the first call came.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

PER_FOLDER = 200
IMAGE_EXTS = [".jpg", ".png", ".JPEG", ".webp", ".gif"]
OTHER_EXTS = [".txt", ".xmp", ".mov", ".json", ""]


def build(tree: Path, files: int) -> None:
    marker = tree / f".built-{files}"
    if marker.exists():
        return
    made = 0
    folder_index = 0
    while made < files:
        folder = tree / f"d{folder_index // 50:03d}" / f"e{folder_index % 50:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(min(PER_FOLDER, files - made)):
            ext = IMAGE_EXTS[i % 5] if i % 2 == 0 else OTHER_EXTS[i % 5]
            (folder / f"file {i:04d}{ext}").touch()
        made += min(PER_FOLDER, files - made)
        folder_index += 1
    marker.touch()


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


def phase_scan(tree: str) -> dict[str, object]:
    from pixfind.ingest.scan import FileEntry, scan

    base = rss_mib()
    started = time.perf_counter()
    found = sum(1 for item in scan(tree) if isinstance(item, FileEntry))
    return {"found": found, "seconds": round(time.perf_counter() - started, 2), "rss_before_mib": round(base)}


class Recorder:
    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.started = time.perf_counter()
        self.scanning_calls = 0
        self.first_s: float | None = None
        self.last_found = 0
        self.to_embed = 0

    def scanning(self, found: int) -> None:
        self.scanning_calls += 1
        self.last_found = found
        if self.first_s is None and found > 0:
            self.first_s = time.perf_counter() - self.started

    def start_embedding(self, total: int) -> None:
        self.to_embed = total
        self.stop.set()  # measure scan and plan only

    def embedded(self, count: int) -> None:
        pass

    def finish(self) -> None:
        pass


def phase_plan(tree: str, uri: str) -> dict[str, object]:
    from pixfind.config import ModelSpec
    from pixfind.ingest.runner import Indexer
    from pixfind.store import Store

    class NoModel:  # the model is never reached: the run stops when embedding would start
        spec = ModelSpec("ViT-S-32", None)
        dim = 384
        draft_side = 224

    stop = threading.Event()
    progress = Recorder(stop)
    with Store(uri) as store:
        store.ensure(NoModel.spec, NoModel.dim)
        base = rss_mib()
        started = progress.started = time.perf_counter()
        report = Indexer(store, NoModel, progress=progress, stop=stop).run([tree])
        seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 2),
        "rss_before_mib": round(base),
        "unchanged": report.unchanged,
        "to_embed": progress.to_embed,
        "scanning_calls": progress.scanning_calls,
        "first_progress_s": round(progress.first_s or 0, 3),
        "last_found": progress.last_found,
    }


def phase_store(tree: str, uri: str) -> dict[str, object]:
    """Store a row for every image file (random vector, its real size and mtime)."""
    import numpy as np

    from pixfind.config import ModelSpec
    from pixfind.ingest.scan import FileEntry, scan
    from pixfind.pathkeys import key_of
    from pixfind.store import Row, Store

    rng = np.random.default_rng(0)
    started = time.perf_counter()
    rows: list[Row] = []
    stored = 0
    with Store(uri) as store:
        store.ensure(ModelSpec("ViT-S-32", None), 384)
        for item in scan(tree):
            if isinstance(item, FileEntry):
                vector = rng.standard_normal(384).astype(np.float32)
                vector /= np.linalg.norm(vector)
                rows.append(Row(key_of(item.path), vector, item.size, item.mtime_ns, 1, 1, "-"))
                if len(rows) == 2000:
                    store.write(rows)
                    stored += len(rows)
                    rows = []
        store.write(rows)
        stored += len(rows)
    return {"stored": stored, "seconds": round(time.perf_counter() - started, 2)}


def child(phase: str, tree: str, uri: str) -> None:
    result = {"scan": phase_scan, "plan": phase_plan, "replan": phase_plan, "store": phase_store}[phase](
        *((tree,) if phase == "scan" else (tree, uri))
    )
    result["peak_rss_mib"] = round(peak_mib())
    print(json.dumps(result))


def run_phase(phase: str, tree: Path, uri: Path) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", phase, "--tree", str(tree), "--uri", str(uri)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{phase} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--tree", type=Path, default=Path("/tmp/pixfind-scan-load"))
    parser.add_argument("--uri", type=Path, default=None)
    parser.add_argument("--stored", action="store_true", help="also measure a re-run with every image stored")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, str(args.tree), str(args.uri))
        return
    started = time.perf_counter()
    build(args.tree, args.files)
    print(f"tree: {args.files:,} files under {args.tree} (built in {time.perf_counter() - started:.1f} s)")
    uri = args.uri or args.tree.parent / f"{args.tree.name}-index" / "load.db"
    if uri.exists():
        uri.unlink()
    phases = ["scan", "plan"] + (["store", "replan"] if args.stored else [])
    for phase in phases:
        print(f"{phase:>7}: {json.dumps(run_phase(phase, args.tree, uri))}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PIXFIND_PRETRAINED", "none")
    main()
