"""``pixfind duplicates`` and ``pixfind export`` at scale: time, peak memory, and whether the
known duplicate groups are found.

    PYTHONPATH=src python benchmarks/duplicates.py [--rows 100000] [--groups 2000] [--keep DIR]

Builds a Milvus Lite index through :class:`pixfind.store.Store`, as ``pixfind index`` writes
it (the collection records ViT-B-32 / weights none; no model is loaded by either command):
``--rows`` synthetic 512-d unit vectors, clustered, with ``--groups`` known duplicate groups of
2-6 members.

* Unique vectors: 200 cluster centres, each vector its centre plus noise of equal norm (cosine
  ~0.5 within a cluster, ~0 across), so near neighbours exist but stay far below the threshold.
* Duplicate groups: a unique vector plus members at noise 0.15 (cosine ~0.98 to it and ~0.96
  between members), above the default threshold 0.95; one group in five has a byte-for-byte
  copy (the same vector).

Then, each in a fresh process (so its peak RSS is its own): opening the index and counting its
rows (the baseline), ``ImageIndex.duplicates()`` (found
groups against the known ones: every known group found whole, no other group) and
``ImageIndex.export()`` to Parquet (rows/s, rows checked against the index). Peak RSS of the
process (``ru_maxrss``) and of the Milvus Lite engine it started (``RUSAGE_CHILDREN``, after the
engine stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = str(HERE.parent / "src")
sys.path.insert(0, SRC)

DIM = 512
CHUNK = 5000
CENTRES = 200
MEMBER_NOISE = 0.15


def file_path(i: int) -> str:
    year, month = 2005 + i % 20, 1 + (i // 20) % 12
    return f"/home/user/Pictures/{year}/{month:02d}/IMG_{i:06d}.jpg"


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def plan_groups(rows: int, groups: int, rng: np.random.Generator) -> list[list[int]]:
    """Row numbers of each known group: the first is the original, the others its copies."""
    sizes = rng.integers(2, 7, groups)
    assert sizes.sum() < rows, "more duplicate members than rows"
    originals = rng.choice(rows - int(sizes.sum()), groups, replace=False)
    extra = rows - int(sizes.sum()) + np.arange(int(sizes.sum()))  # copies take the last rows
    out, at = [], 0
    for original, size in zip(originals, sizes, strict=True):
        members = extra[at : at + size - 1]
        at += size - 1
        out.append([int(original), *map(int, members)])
    return out


def vectors(rows: int, known: list[list[int]], rng: np.random.Generator) -> np.ndarray:
    centres = unit(rng.standard_normal((CENTRES, DIM)))
    out = np.empty((rows, DIM), np.float32)
    for start in range(0, rows, CHUNK):
        n = min(CHUNK, rows - start)
        noise = unit(rng.standard_normal((n, DIM)))
        out[start : start + n] = unit(centres[rng.integers(0, CENTRES, n)] + noise)
    for number, group in enumerate(known):
        original = out[group[0]]
        for index, member in enumerate(group[1:]):
            if number % 5 == 0 and index == 0:
                out[member] = original  # a byte-for-byte copy: the same vector
            else:
                out[member] = unit((original + MEMBER_NOISE * unit(rng.standard_normal((1, DIM)))[0])[None])[0]
    return out


def build(db: Path, rows: int, groups: int) -> tuple[float, list[list[str]]]:
    from pixfind.config import DEFAULT_COLLECTION, ModelSpec
    from pixfind.pathkeys import key_of
    from pixfind.store import Row, Store

    rng = np.random.default_rng(rows + groups)
    known = plan_groups(rows, groups, rng)
    data = vectors(rows, known, rng)
    start = time.perf_counter()
    with Store(str(db), collection=DEFAULT_COLLECTION) as store:
        store.ensure(ModelSpec("ViT-B-32", None), DIM)
        for first in range(0, rows, CHUNK):
            batch = [
                Row(key_of(file_path(i)), data[i], 150_000 + i, 1_700_000_000_000_000_000 + i, 4000, 3000, f"{i:016x}")
                for i in range(first, min(rows, first + CHUNK))
            ]
            store.write(batch)
        store.flush()
        assert store.count() == rows
    return time.perf_counter() - start, [[file_path(i) for i in group] for group in known]


CHILD = """
import json, resource, sys, time
from pixfind import ImageIndex
task, db, out = sys.argv[1:4]
started = time.perf_counter()
index = ImageIndex(uri=db, create=False)
if task == "duplicates":
    groups = index.duplicates()
    result = {"groups": [[f.path for f in g.files] for g in groups]}
elif task == "export":
    report = index.export(out)
    result = {"rows": report.rows}
else:  # baseline: open the index and count its rows
    result = {"rows": index.info()["images"]}
result["work_s"] = time.perf_counter() - started
index.close()  # duplicates: Lite's exact index is put back here
elapsed = time.perf_counter() - started
result.update(
    seconds=elapsed,
    rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    engine_rss_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
)
print(json.dumps(result))
"""


def child(task: str, db: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=SRC, PYTHONWARNINGS="ignore")
    run = subprocess.run(
        [sys.executable, "-c", CHILD, task, str(db), str(out)], env=env, capture_output=True, text=True
    )
    if run.returncode != 0:
        sys.exit(f"{task} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--groups", type=int, default=2_000)
    parser.add_argument(
        "--keep", type=Path, help="build (or reuse) the index in this folder instead of a temporary one"
    )
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="pixfind-dupes-"))
    work.mkdir(parents=True, exist_ok=True)
    db = work / f"dupes{args.rows}.db"
    known_file = work / f"dupes{args.rows}.groups.json"
    print(f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs", flush=True)
    if not db.exists() or not known_file.exists():
        took, known = build(db, args.rows, args.groups)
        known_file.write_text(json.dumps(known))
        print(f"built {args.rows:,}-row Lite index in {took:.1f} s", flush=True)
    known = json.loads(known_file.read_text())

    base = child("baseline", db, work / "unused")
    print(
        f"baseline (open the index, count its rows): peak RSS {base['rss_mib']:.0f} MiB "
        f"(Milvus Lite engine {base['engine_rss_mib']:.0f} MiB)"
    )
    found = child("duplicates", db, work / "unused")
    expected = {frozenset(group) for group in known}
    got = {frozenset(group) for group in found["groups"]}
    print(
        f"duplicates: {found['seconds']:.1f} s ({args.rows / found['seconds']:,.0f} rows/s; "
        f"{found['work_s']:.1f} s until the groups, the rest putting Lite's exact index back), peak RSS "
        f"{found['rss_mib']:.0f} MiB (Milvus Lite engine {found['engine_rss_mib']:.0f} MiB); "
        f"{len(got):,} groups found, {len(expected):,} known: {len(expected & got):,} found whole, "
        f"{len(got - expected):,} not known, {len(expected - got):,} known not found"
    )

    parquet = work / "export.parquet"
    parquet.unlink(missing_ok=True)
    done = child("export", db, parquet)
    import pyarrow.parquet as pq

    rows = pq.ParquetFile(parquet).metadata.num_rows
    print(
        f"export: {done['rows']:,} rows in {done['seconds']:.1f} s ({done['rows'] / done['seconds']:,.0f} rows/s), "
        f"{parquet.stat().st_size / 2**20:.0f} MiB file ({rows:,} rows read back), peak RSS "
        f"{done['rss_mib']:.0f} MiB (Milvus Lite engine {done['engine_rss_mib']:.0f} MiB)"
    )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if expected != got or rows != args.rows:
        sys.exit("FAILED: the known groups were not found exactly, or the export lost rows")


if __name__ == "__main__":
    main()
