"""Text-query latency: warm in-process p50/p95 and cold CLI wall time, at 10k and 100k images.

    PYTHONPATH=src python benchmarks/query.py [--sizes 10000,100000] [--rounds 5] [--queries 40] [--server]

Builds one Milvus Lite index per size (fresh temporary files) through :class:`pixfind.store.Store`
as ``pixfind index`` writes it: random unit 512-d vectors, file-like paths
(``/home/user/Pictures/<year>/<month>/IMG_<n>.jpg``), the collection recording ViT-B-32 / weights
none, so queries go through the real ONNX text path (random weights: same compute). Then
``--rounds`` interleaved rounds, each with, per size:

* cold: ``python -m pixfind search "..." --uri DB`` in a fresh process: seconds from spawn to the
  results on stdout, and to the process's exit;
* warm: ``ImageIndex(uri=DB)``, a few untimed queries, then ``--queries`` timed
  ``ImageIndex.search(text)`` calls (tokenise + encode + Milvus search + paths), each a different
  text; beside them, for the breakdown, the text encode alone and the Milvus search alone. At
  50,000+ rows again after ``optimize_for_queries()`` (IVF while the process runs, as
  ``pixfind serve`` does).

Targets (issue 6): warm p50 <= 40 ms at 100k, cold <= 1.5 s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = str(HERE.parent / "src")
sys.path.insert(0, SRC)
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

from search_latency import wait_indexed  # noqa: E402  (also puts tests/ on the path)

from pixfind import ImageIndex  # noqa: E402
from pixfind.config import DEFAULT_COLLECTION, ModelSpec  # noqa: E402
from pixfind.pathkeys import key_of  # noqa: E402
from pixfind.store import Row, Store  # noqa: E402
from pixfind.store.milvus import LITE_SERVING_MIN_ROWS  # noqa: E402

DIM = 512
CHUNK = 5000
SUBJECTS = ["dog", "cat", "beach", "mountain", "city street", "birthday cake", "red car", "forest", "bridge"]
STYLES = ["a photo of a", "a blurry picture of a", "an old photograph of a", "a close-up of a", "my"]
PLACES = ["at night", "in the snow", "at sunset", "in the rain", "on a sunny day", "indoors", ""]


def texts(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{rng.choice(STYLES)} {rng.choice(SUBJECTS)} {rng.choice(PLACES)}".strip() + f" {i}" for i in range(count)]


def file_path(i: int) -> str:
    year, month = 2005 + i % 20, 1 + (i // 20) % 12
    return f"/home/user/Pictures/{year}/{month:02d}/IMG_{i:06d}.jpg"


def build(db: Path | str, rows: int, spec: ModelSpec, token: str | None = None) -> float:
    """Fill a fresh index (a Lite file, or a server URI) with ``rows`` random unit vectors;
    returns seconds (on a server, until its ANN index covers every row)."""
    rng = np.random.default_rng(rows)
    start = time.perf_counter()
    with Store(str(db), token, collection=DEFAULT_COLLECTION) as store:
        store.ensure(spec, DIM)
        for first in range(0, rows, CHUNK):
            n = min(CHUNK, rows - first)
            vecs = rng.standard_normal((n, DIM)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            batch = [
                Row(
                    key_of(file_path(first + j)),
                    vec,
                    150_000 + j,
                    1_700_000_000_000_000_000 + j,
                    4000,
                    3000,
                    f"{first + j:016x}",
                )
                for j, vec in enumerate(vecs)
            ]
            store.write(batch)
        store.flush()
        assert store.count() == rows, store.count()
        assert wait_indexed(store)
    return time.perf_counter() - start


def cold(db: Path | str, text: str, token: str | None = None) -> tuple[float, float]:
    """Seconds from spawning ``pixfind search`` to its results on stdout, and to its exit."""
    env = dict(os.environ, PYTHONPATH=SRC, PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pixfind", "search", text, "--uri", str(db), *(["--token", token] if token else [])],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    shown = time.perf_counter() - start
    rest = proc.stdout.read()  # not communicate(): it would skip what readline() buffered
    errors = proc.stderr.read() if proc.stderr else ""
    proc.wait()
    wall = time.perf_counter() - start
    if proc.returncode != 0 or "/home/user/Pictures/" not in first + rest:
        sys.exit(f"cold search failed (rc {proc.returncode}):\n{(first + rest)[-1500:]}\n{errors[-1500:]}")
    return shown, wall


BREAKDOWN = """
import json, sys, time
t0 = time.perf_counter()
from pixfind import ImageIndex
t1a = time.perf_counter()
import pixfind.cli
t1 = time.perf_counter()
index = ImageIndex(uri=sys.argv[1], create=False)
t2 = time.perf_counter()
index.search("warm up the collection load", limit=1)  # waits for Lite's load; ONNX text tower beside it
t3 = time.perf_counter()
index.search(sys.argv[2], limit=10)
t4 = time.perf_counter()
index.close()
t5 = time.perf_counter()
print(json.dumps({"import pixfind": t1a - t0, "import pixfind.cli (CLI only)": t1 - t1a,
                  "open (engine start, load asked; pymilvus import)": t2 - t1,
                  "first search (rest of the load; text encoder beside)": t3 - t2,
                  "second search": t4 - t3, "close (Lite engine stop)": t5 - t4}))
"""


def breakdown(db: Path, text: str) -> dict[str, float]:
    """Where a fresh process's time goes (same steps as the CLI, timed from inside)."""
    env = dict(os.environ, PYTHONPATH=SRC, PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", BREAKDOWN, str(db), text], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"breakdown failed:\n{out.stderr[-2000:]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    data["spawn -> exit wall"] = wall
    return data


def warm(
    db: Path | str, queries: list[str], optimize: bool, warmup: int = 3, token: str | None = None
) -> dict[str, list[float]]:
    """Timed in-process searches; ``optimize``: through ``optimize_for_queries()`` (IVF)."""
    times: dict[str, list[float]] = {"search": [], "encode": [], "milvus": []}
    with ImageIndex(uri=str(db), token=token) as index:
        if optimize:
            assert index.optimize_for_queries()
        encoder = index.query_encoder()
        assert type(encoder).__name__ == "OnnxClipEncoder", type(encoder)
        for q in queries[:warmup]:
            index.search(q)
        for q in queries[warmup:]:
            t = time.perf_counter()
            hits = index.search(q, limit=10)
            times["search"].append(time.perf_counter() - t)
            assert len(hits) == 10 and hits[0].path.startswith("/home/user/Pictures/")
        for q in queries[warmup:]:
            t = time.perf_counter()
            vec = encoder.encode_texts([q])[0]
            times["encode"].append(time.perf_counter() - t)
            t = time.perf_counter()
            index.store.search([vec], 10)
            times["milvus"].append(time.perf_counter() - t)
    return times


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--rounds", type=int, default=5, help="cold runs per size = rounds")
    parser.add_argument("--queries", type=int, default=40, help="timed warm queries per size per round")
    parser.add_argument("--breakdown", type=int, default=3, help="rounds with a timed-from-inside cold run")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument(
        "--server",
        action="store_true",
        help="also the largest size on a Milvus 2.3.5 standalone server (tests/milvus_server.py; "
        "run .ci/server-setup.sh first): cold and warm, for comparison with Milvus Lite",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    os.environ["PIXFIND_PRETRAINED"] = "none"
    spec = ModelSpec(args.model, None)
    from pixfind.config import Settings
    from pixfind.models import load_query_encoder

    if load_query_encoder(spec, Settings.from_env()) is None:
        from pixfind.models import load_encoder

        print("no ONNX export yet: exporting (torch) ...", flush=True)
        load_encoder(spec, Settings.from_env(backend="onnx"))
        assert load_query_encoder(spec, Settings.from_env()) is not None

    work = Path(tempfile.mkdtemp(prefix="pixfind-query-"))
    dbs = {}
    print(f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs")
    for n in sizes:
        dbs[n] = work / f"q{n}.db"
        took = build(dbs[n], n, spec)
        print(f"built {n:,}-row Lite index in {took:.1f} s ({n / took:,.0f} rows/s)", flush=True)

    warm_t: dict[int, dict[str, list[float]]] = {n: {} for n in sizes}
    fast_t: dict[int, dict[str, list[float]]] = {n: {} for n in sizes}  # optimize_for_queries()
    cold_t: dict[int, list[float]] = {n: [] for n in sizes}
    shown_t: dict[int, list[float]] = {n: [] for n in sizes}
    parts: dict[int, dict[str, list[float]]] = {n: {} for n in sizes}
    loads = []
    for r in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for n in sizes:
            shown, wall = cold(dbs[n], f"a photo of a dog on a beach {r}")
            shown_t[n].append(shown)
            cold_t[n].append(wall)
            if r < args.breakdown:
                for key, value in breakdown(dbs[n], f"a red car at night {r}").items():
                    parts[n].setdefault(key, []).append(value)
            for key, values in warm(dbs[n], texts(args.queries + 3, seed=r * 7 + n), optimize=False).items():
                warm_t[n].setdefault(key, []).extend(values)
            if n >= LITE_SERVING_MIN_ROWS:
                for key, values in warm(dbs[n], texts(args.queries + 3, seed=r * 5 + n), optimize=True).items():
                    fast_t[n].setdefault(key, []).extend(values)
        line = "; ".join(
            f"{n:,}: cold {cold_t[n][-1]:.2f} s, warm p50 {pct(warm_t[n]['search'][-args.queries :], 50):.1f} ms"
            for n in sizes
        )
        print(
            f"round {r + 1}/{args.rounds}: {line}; load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True
        )
    loads.append(os.getloadavg()[0])

    print(
        f"\n{args.model} random weights, ONNX text path, Milvus Lite (FLAT, exact); {args.rounds} interleaved "
        f"rounds; load average (1 min) at round starts and end: {', '.join(f'{x:.1f}' for x in loads)}"
    )
    print(
        f"{'rows':>8s}  {'warm search p50':>15s} {'p95':>6s} {'(n)':>5s}  {'encode p50':>10s} {'milvus p50':>10s} "
        f"{'p95':>6s}  {'cold: results':>13s} {'exit':>6s}  cold runs to results (s)"
    )
    for n in sizes:
        for label, w in (("", warm_t[n]), (" IVF", fast_t[n])):
            if not w:
                continue
            cold_part = (
                f"{statistics.median(shown_t[n]):11.2f} s {statistics.median(cold_t[n]):6.2f}  "
                f"{', '.join(f'{x:.2f}' for x in shown_t[n])}"
                if not label
                else "(optimize_for_queries(): approximate, in-process only)"
            )
            print(
                f"{n:8,d}{label:4s}{pct(w['search'], 50):8.1f} ms {pct(w['search'], 95):6.1f} {len(w['search']):5d}  "
                f"{pct(w['encode'], 50):7.1f} ms {pct(w['milvus'], 50):7.1f} ms {pct(w['milvus'], 95):6.1f}  "
                f"{cold_part}"
            )
    if args.breakdown:
        print(f"\ncold process, timed from inside (median of {min(args.breakdown, args.rounds)}), seconds:")
        print(f"  {'step':48s} " + " ".join(f"{n:>10,d}" for n in sizes))
        for key in parts[sizes[0]]:
            print(f"  {key:48s} " + " ".join(f"{statistics.median(parts[n][key]):10.3f}" for n in sizes))
    print("\ntargets: warm p50 <= 40 ms at 100k, cold <= 1.5 s")
    for n in sizes:
        exact, fast = pct(warm_t[n]["search"], 50), pct(fast_t[n]["search"], 50) if fast_t[n] else None
        shown = statistics.median(shown_t[n])
        print(
            f"  {n:>7,}: warm exact {exact:.1f} ms ({'met' if exact <= 40 else 'NOT met'})"
            + (f", warm optimized {fast:.1f} ms ({'met' if fast <= 40 else 'NOT met'})" if fast is not None else "")
            + f"; cold to results {shown:.2f} s ({'met' if shown <= 1.5 else 'NOT met'}),"
            f" to exit {statistics.median(cold_t[n]):.2f} s"
        )
    shutil.rmtree(work, ignore_errors=True)
    if args.server:
        on_server(max(sizes), spec, args.rounds, args.queries)


def on_server(rows: int, spec: ModelSpec, rounds: int, queries: int) -> None:
    """Cold and warm queries against a Milvus server holding ``rows`` vectors (HNSW): the server
    keeps the collection loaded, so a cold search pays no load, unlike a Lite file."""
    from milvus_server import MilvusServer

    with MilvusServer() as server:
        took = build(server.uri, rows, spec, server.token)
        print(f"\nserver: Milvus 2.3.5 standalone, {rows:,} rows written and indexed (HNSW) in {took:.1f} s")
        shown_t, warm_t = [], []
        for r in range(rounds):
            shown_t.append(cold(server.uri, f"a photo of a dog on a beach {r}", server.token)[0])
            got = warm(server.uri, texts(queries + 3, seed=r * 11 + rows), optimize=False, token=server.token)
            warm_t.extend(got["search"])
        print(
            f"  {rows:>7,}: warm p50 {pct(warm_t, 50):.1f} ms, p95 {pct(warm_t, 95):.1f} ms (n {len(warm_t)}); "
            f"cold to results {statistics.median(shown_t):.2f} s ({', '.join(f'{x:.2f}' for x in shown_t)})"
        )


if __name__ == "__main__":
    main()
