"""A million images, honestly: which server index to build, and where Milvus Lite stops.

Two parts, each on the same reproducible clustered 512-d unit vectors as
``benchmarks/search_latency.py`` (CLIP-like: neighbours close, most pairs not), recall@10
measured against exact numpy search over all rows:

* ``server``: one Milvus 2.3.5 standalone (``tests/milvus_server.py``; run ``.ci/server-setup.sh``
  first) holds N rows in pixfind's schema (path key, vector, JSON record); then each index type
  in turn is built on it (drop, create, wait until every row is indexed, load) and searched at
  several efforts. Per index: build and load time, p50/p95 of single queries, batch QPS,
  recall@10 and the server's resident memory once loaded.
* ``lite``: Milvus Lite through ``pixfind.store.Store`` exactly as ``pixfind index`` writes and
  ``pixfind search`` reads (exact FLAT on file): insert time, file size, a cold search (a fresh
  process, as ``pixfind search`` runs; the file is in the page cache), warm p50/p95, the engine's
  memory, and the IVF_FLAT index ``pixfind serve`` switches to (switch time, latency, recall).

Every figure line ends with the 1-minute load average at that moment: the machine may be shared.

    python benchmarks/million.py --part server --n 1000000
    python benchmarks/million.py --part lite --n 250000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from search_latency import DIM, MODEL, Clustered, key  # noqa: E402


#: Index types compared on the server, with the search efforts tried for each (HNSW ``ef``,
#: IVF ``nprobe``). nlist ~4 sqrt(N) is the usual rule; Milvus builds per segment (~250k rows
#: at most here, 4 sqrt = 2000), but on 2 shared cores 1024 lists per segment took ~35 min for
#: the first pass alone, 256 lists 520 s for everything at recall@10 0.987 (docs/scale.md).
def server_indexes(nlist: int, ef_construction: int) -> list[tuple[dict[str, object], str, list[int]]]:
    return [
        ({"index_type": "HNSW", "params": {"M": 16, "efConstruction": ef_construction}}, "ef", [32, 64, 128, 256]),
        ({"index_type": "IVF_FLAT", "params": {"nlist": nlist}}, "nprobe", [8, 16, 32, 64, 128]),
        ({"index_type": "IVF_SQ8", "params": {"nlist": nlist}}, "nprobe", [8, 16, 32, 64, 128]),
    ]


INSERT_ROWS = 5000  # rows per insert call on the server (~10 MiB, under its 64 MiB message cap)


def load_average() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def rss_bytes(pids: Sequence[int]) -> int:
    """Resident memory of these processes (VmRSS), summed; gone processes count 0."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def child_pids(parent: int) -> list[int]:
    """Every descendant of ``parent`` (the Milvus Lite engine is a child of this process)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [parent]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def row_of(path: str) -> int:
    """The row number a benchmark key encodes (``.../img00001234.jpg``)."""
    return int(path.rsplit("img", 1)[1].split(".", 1)[0])


def generate(n: int) -> tuple[np.ndarray, list[str]]:
    data = np.empty((n, DIM), dtype=np.float32)
    keys: list[str] = []
    for start, vecs, ks in Clustered(n).chunks(10_000):
        data[start : start + len(vecs)] = vecs
        keys.extend(key(start + j, int(k)) for j, k in enumerate(ks))
    return data, keys


def exact_top10(data: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Exact inner-product top 10 (the oracle), in chunks of rows to bound memory."""
    best_scores = np.full((len(queries), 10), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 10), dtype=np.int64)
    for start in range(0, len(data), 200_000):
        scores = queries @ data[start : start + 200_000].T
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        cand_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        cand_ids = np.concatenate([best_ids, top + start], axis=1)
        order = np.argsort(-cand_scores, axis=1)[:, :10]
        best_scores = np.take_along_axis(cand_scores, order, axis=1)
        best_ids = np.take_along_axis(cand_ids, order, axis=1)
    return best_ids


def measure_searches(
    search: Callable[[list[np.ndarray]], list[list[str]]], queries: np.ndarray, truth: np.ndarray, batch: int
) -> str:
    """p50/p95 of single queries, batch QPS and recall@10 of one search function."""
    for q in queries[:5]:
        search([q])  # warm up
    latencies, hits = [], 0
    for q, expected in zip(queries, truth, strict=True):
        began = time.perf_counter()
        found = search([q])[0]
        latencies.append(time.perf_counter() - began)
        hits += len({row_of(p) for p in found} & set(expected.tolist()))
    began = time.perf_counter()
    for start in range(0, len(queries), batch):
        search(list(queries[start : start + batch]))
    qps = len(queries) / (time.perf_counter() - began)
    p50, p95 = np.percentile(np.array(latencies) * 1000, [50, 95])
    recall = hits / (10 * len(queries))
    return f"p50 {p50:.1f} ms, p95 {p95:.1f} ms; batch({batch}) {qps:,.0f} q/s; recall@10 {recall:.3f}"


# -- server -------------------------------------------------------------------------------------


def run_server(n: int, args: argparse.Namespace, out: list[str]) -> None:
    from milvus_server import MilvusServer
    from pymilvus import DataType, MilvusClient

    data, keys = generate(n)
    queries = Clustered(n).queries(args.queries)
    truth = exact_top10(data, queries)
    with MilvusServer() as server:
        client = MilvusClient(uri=server.uri, token=server.token or "", timeout=900)
        idle = rss_bytes(sorted(server.process_ids()))
        emit(out, f"server n={n:,}: Milvus 2.3.5 up in {server.start_s:.1f} s, RSS {gib(idle)} empty; {load_average()}")
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("path", DataType.VARCHAR, is_primary=True, max_length=1024)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
        schema.add_field("meta", DataType.JSON)
        client.create_collection("million", schema=schema, consistency_level="Bounded")
        began = time.perf_counter()
        for start in range(0, n, INSERT_ROWS):
            rows = [
                {"path": keys[i], "vector": data[i].tolist(), "meta": {"size": i, "width": 640, "height": 480}}
                for i in range(start, min(n, start + INSERT_ROWS))
            ]
            client.insert("million", rows)
        insert_s = time.perf_counter() - began
        began = time.perf_counter()
        client.flush("million")
        emit(
            out,
            f"server n={n:,}: insert {n / insert_s:,.0f} rows/s ({insert_s:.0f} s), flush "
            f"{time.perf_counter() - began:.1f} s; {load_average()}",
        )
        for index in server_indexes(args.nlist, args.ef_construction):
            if not args.indexes or index[0]["index_type"] in args.indexes:
                measure_server_index(client, server, index, n, queries, truth, args, out)
        client.close()


def measure_server_index(
    client: Any,
    server: Any,
    index: tuple[dict[str, object], str, list[int]],
    n: int,
    queries: np.ndarray,
    truth: np.ndarray,
    args: argparse.Namespace,
    out: list[str],
) -> None:
    """Build one index type on the loaded rows, then search it at each effort."""
    config, knob, efforts = index
    kind = str(config["index_type"])
    client.release_collection("million")
    for name in client.list_indexes("million"):
        client.drop_index("million", name)
    index = client.prepare_index_params()
    index.add_index("vector", metric_type="IP", **config)
    began = time.perf_counter()
    client.create_index("million", index)
    indexed = wait_indexed(client, args.index_timeout)
    build_s = time.perf_counter() - began
    began = time.perf_counter()
    client.load_collection("million")
    load_s = time.perf_counter() - began
    rss = rss_bytes(sorted(server.process_ids()))
    label = f"{kind} {json.dumps(config['params'], separators=(',', ':'))}"
    emit(
        out,
        f"server n={n:,} {label}: built in {build_s:.0f} s{'' if indexed else ' (NOT DONE)'}, loaded in "
        f"{load_s:.1f} s, server RSS {gib(rss)}; {load_average()}",
    )
    for effort in efforts:

        def search(vectors: list[np.ndarray], effort: int = effort) -> list[list[str]]:
            result = client.search(
                "million",
                data=[v.tolist() for v in vectors],
                limit=10,
                output_fields=["path"],
                search_params={"metric_type": "IP", "params": {knob: effort}},
            )
            return [[hit["entity"]["path"] for hit in hits] for hits in result]

        figures = measure_searches(search, queries, truth, args.batch)
        emit(out, f"server n={n:,} {label} {knob}={effort}: {figures}; {load_average()}")


def wait_indexed(client: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.describe_index("million", client.list_indexes("million")[0])
        if info.get("pending_index_rows", 1) == 0 and info.get("indexed_rows") == info.get("total_rows"):
            return True
        time.sleep(1)
    return False


# -- Milvus Lite --------------------------------------------------------------------------------

COLD_SEARCH = """
import sys, time, json
began = time.perf_counter()
sys.path.insert(0, {src!r})
import numpy as np
from pixfind.store import Store
query = np.load({queries!r})[0]
with Store({uri!r}, create=False) as store:
    opened = time.perf_counter()
    hits = store.search([query], 10)
    done = time.perf_counter()
figures = {{"open_s": opened - began, "search_s": done - opened, "total_s": done - began, "hits": len(hits[0])}}
print(json.dumps(figures))
"""


def run_lite(n: int, args: argparse.Namespace, out: list[str]) -> None:
    from pixfind.errors import StoreError
    from pixfind.store import Row, Store

    data, keys = generate(n)
    queries = Clustered(n).queries(args.queries)
    truth = exact_top10(data, queries)
    with tempfile.TemporaryDirectory(prefix="pixfind-million-") as tmp:
        uri = str(Path(tmp) / "index" / "pixfind.db")
        began = time.perf_counter()
        with Store(uri) as store:
            store.ensure(MODEL, DIM)
            for start in range(0, n, 10_000):
                end = min(n, start + 10_000)
                store.write([Row(keys[i], data[i], 1000 + i, 0, 640, 480, f"{i:016x}") for i in range(start, end)])
            store.flush()
        insert_s = time.perf_counter() - began
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        emit(
            out,
            f"lite   n={n:,}: insert {n / insert_s:,.0f} rows/s ({insert_s:.0f} s), files {gib(size)}; "
            f"{load_average()}",
        )
        qfile = str(Path(tmp) / "queries.npy")
        np.save(qfile, queries)
        try:
            cold = [cold_search(uri, qfile) for _ in range(3)]
        except subprocess.CalledProcessError as exc:  # what `pixfind search` would meet
            lines = exc.stderr.strip().splitlines() or ["(no output)"]
            emit(out, f"lite   n={n:,}: cold search FAILED: {lines[-1]}; {load_average()}")
            return
        med = sorted(cold, key=lambda c: c["total_s"])[1]
        each = ", ".join(f"{c['total_s']:.2f}" for c in cold)
        emit(
            out,
            f"lite   n={n:,}: cold search (fresh process, file cached) {med['total_s']:.2f} s to results "
            f"(open+load {med['open_s']:.2f} s, search {med['search_s'] * 1000:.0f} ms), median of 3 "
            f"[{each}]; {load_average()}",
        )
        with Store(uri, create=False) as store:
            store.count()

            def search(vectors: list[np.ndarray]) -> list[list[str]]:
                return [[h.path for h in hits] for hits in store.search(vectors, 10)]

            figures = measure_searches(search, queries[: args.lite_queries], truth[: args.lite_queries], args.batch)
            engine = rss_bytes(child_pids(os.getpid()))
            emit(out, f"lite   n={n:,} FLAT (exact): {figures}; engine RSS {gib(engine)}; {load_average()}")
            began = time.perf_counter()
            try:
                switched = store.index_for_serving()
            except StoreError as exc:  # reported as measured: what `pixfind serve` would meet
                emit(out, f"lite   n={n:,}: IVF_FLAT switch FAILED after {time.perf_counter() - began:.0f} s: {exc}")
                return
            switch_s = time.perf_counter() - began
            if switched:
                figures = measure_searches(search, queries, truth, args.batch)
                engine = rss_bytes(child_pids(os.getpid()))
                emit(
                    out,
                    f"lite   n={n:,} IVF_FLAT (pixfind serve; switch {switch_s:.0f} s): {figures}; "
                    f"engine RSS {gib(engine)}; {load_average()}",
                )
                began = time.perf_counter()
                store.restore_index()
                emit(out, f"lite   n={n:,}: back to FLAT in {time.perf_counter() - began:.0f} s; {load_average()}")


def cold_search(uri: str, qfile: str) -> dict[str, float]:
    code = COLD_SEARCH.format(src=str(REPO / "src"), queries=qfile, uri=uri)
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=900)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - began
    return result


def emit(out: list[str], line: str) -> None:
    out.append(line)
    print(line, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["server", "lite"], required=True)
    parser.add_argument("--n", default="1000000", help="rows, comma-separated (default 1000000)")
    parser.add_argument("--queries", type=int, default=300, help="queries per measurement")
    parser.add_argument("--lite-queries", type=int, default=100, help="queries for Lite's exact search (slow)")
    parser.add_argument("--batch", type=int, default=100, help="queries per batch search")
    parser.add_argument("--indexes", default="", help="server index types to build (default: all)")
    parser.add_argument("--nlist", type=int, default=256, help="IVF lists per segment (default 256)")
    parser.add_argument("--ef-construction", type=int, default=100, help="HNSW efConstruction (default 100)")
    parser.add_argument("--index-timeout", type=float, default=7200, help="seconds to wait for an index")
    args = parser.parse_args()
    args.indexes = [x for x in args.indexes.split(",") if x]
    out: list[str] = [f"# {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, {load_average()} at start"]
    for n in (int(x) for x in args.n.split(",")):
        (run_server if args.part == "server" else run_lite)(n, args, out)
    print("\n".join(["--- summary", *out]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
