"""Insert and search speed, and recall, of pixfind's store on Milvus Lite and on a Milvus server.

Fills a fresh collection with N clustered, unit-length 512-d vectors (CLIP-like: a shared
direction, a cluster direction and noise, so neighbours are close and most pairs are not), through
:class:`pixfind.store.Store` exactly as ``pixfind index`` writes them, then prints one line per
backend: insert rows/s, the flush (seal + index build + read-your-writes) time, p50/p95
latency of single-query searches, batch QPS and recall@10 against exact numpy search.

The server is a Milvus 2.3.5 standalone started by ``tests/milvus_server.py`` (run
``.ci/server-setup.sh`` first), or an existing one with ``--uri``/``--token``.

    python benchmarks/search_latency.py                 # 100k rows, Lite and server
    python benchmarks/search_latency.py --n 1000000     # 1M rows
    python benchmarks/search_latency.py --backends server --ef 16,32,64,128
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

from pixfind.config import ModelSpec, default_search_ef  # noqa: E402
from pixfind.store import Row, Store, policies  # noqa: E402
from pixfind.store.records import VECTOR  # noqa: E402

DIM = 512
MODEL = ModelSpec(name="bench", pretrained="none")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class Clustered:
    """Reproducible clustered vectors: x = unit(0.7 m + 0.75 c_k + 0.45 g), k ~ Zipf-ish."""

    def __init__(self, n: int, dim: int = DIM, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        self.n, self.dim, self.seed = n, dim, seed
        self.clusters = max(16, n // 100)
        self.mean = unit(rng.standard_normal((1, dim)))[0]
        self.centres = unit(rng.standard_normal((self.clusters, dim)))
        weights = 1.0 / np.arange(1, self.clusters + 1) ** 0.5
        self.p = weights / weights.sum()

    def make(self, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        ks = rng.choice(self.clusters, size=count, p=self.p)
        noise = unit(rng.standard_normal((count, self.dim)))
        return unit(0.7 * self.mean + 0.75 * self.centres[ks] + 0.45 * noise), ks

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        rng = np.random.default_rng(self.seed + 1)
        for start in range(0, self.n, size):
            vecs, ks = self.make(min(size, self.n - start), rng)
            yield start, vecs, ks

    def queries(self, count: int) -> np.ndarray:
        return self.make(count, np.random.default_rng(self.seed + 2))[0]


def key(i: int, k: int) -> str:
    return f"/bench/c{k:05d}/img{i:08d}.jpg"


def run_backend(name: str, uri: str, token: str | None, args: argparse.Namespace) -> list[str]:
    gen = Clustered(args.n)
    data = np.empty((args.n, DIM), dtype=np.float32)
    keys: list[str] = []
    collection = f"bench_{int(time.time())}"
    lines = []
    with Store(uri, token=token, collection=collection, search_ef=args.ef[0]) as store:
        store.drop()
        store.ensure(MODEL, DIM)
        insert_s = 0.0
        for start, vecs, ks in gen.chunks(10_000):
            data[start : start + len(vecs)] = vecs
            rows = []
            for j, (vec, k) in enumerate(zip(vecs, ks, strict=True)):
                keys.append(key(start + j, int(k)))
                rows.append(Row(keys[-1], vec, 1000 + j, 0, 640, 480, f"{start + j:016x}"))
            began = time.perf_counter()
            store.write(rows)
            insert_s += time.perf_counter() - began
        began = time.perf_counter()
        store.flush()
        flush_s = time.perf_counter() - began
        print(
            f"{name:6} inserted {args.n:,} rows at {args.n / insert_s:,.0f} rows/s, flush {flush_s:.1f} s",
            flush=True,
        )
        began = time.perf_counter()
        indexed = wait_indexed(store, args.index_timeout)
        build_s = time.perf_counter() - began
        assert store.count() == args.n, store.count()

        queries = gen.queries(args.queries)
        exact = np.argsort(-(queries @ data.T), axis=1)[:, :10]
        index_of = {k: i for i, k in enumerate(keys)}

        def measure(label: str, efs: list[int]) -> None:
            for ef in efs:
                store.search_ef = ef
                for q in queries[:10]:
                    store.search([q], 10)  # warm up
                latencies, hits = [], 0
                for q, truth in zip(queries, exact, strict=True):
                    began = time.perf_counter()
                    result = store.search([q], 10)[0]
                    latencies.append(time.perf_counter() - began)
                    found = {index_of.get(h.path, -1) for h in result}
                    hits += len(found & set(truth.tolist()))
                began = time.perf_counter()
                for start in range(0, len(queries), args.batch):
                    store.search(list(queries[start : start + args.batch]), 10)
                qps = len(queries) / (time.perf_counter() - began)
                p50, p95 = np.percentile(np.array(latencies) * 1000, [50, 95])
                extra = label
                if store.index_type() != "FLAT":
                    extra += f" {store.index_type()} ef={ef}"
                if store.is_server:
                    extra += f" flush {flush_s:.1f} s, index built {build_s:.1f} s{'' if indexed else ' (NOT DONE)'};"
                lines.append(
                    f"{name:6} n={args.n:,}:{extra} insert {args.n / insert_s:,.0f} rows/s; "
                    f"search p50 {p50:.1f} ms, p95 {p95:.1f} ms; batch({args.batch}) {qps:,.0f} q/s; "
                    f"recall@10 {hits / (10 * len(queries)):.3f}"
                )
                print(lines[-1], flush=True)

        if store.is_server:
            measure("", args.ef)
        else:
            measure(" exact (FLAT);", args.ef[:1])
            began = time.perf_counter()
            if store.index_for_serving():  # what `pixfind serve` / optimize_for_queries() do
                switch_s = time.perf_counter() - began
                measure(f" while serving (switch {switch_s:.1f} s)", args.ef)
                began = time.perf_counter()
                store.restore_index()
                print(f"{name:6} restored FLAT in {time.perf_counter() - began:.1f} s", flush=True)
        started = time.perf_counter()
        streamed = sum(len(page) for page in store.iter_keys())
        iter_s = time.perf_counter() - started
        print(f"{name:6} iter_keys: {streamed:,} keys in {iter_s:.1f} s", flush=True)
        store.drop()
    return lines


def wait_indexed(store: Store, timeout: float = 3600) -> bool:
    """Wait until the server's ANN index covers every row (Lite: nothing to wait for)."""
    if not store.is_server:
        return True
    client = store.client
    name = client.list_indexes(store.collection, field_name=VECTOR)[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.describe_index(store.collection, name)
        if info.get("pending_index_rows", 1) == 0 and info.get("indexed_rows") == info.get("total_rows"):
            return True
        time.sleep(0.5)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="rows (default 100000)")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--batch", type=int, default=100, help="queries per batch search")
    parser.add_argument("--backends", default="lite,server")
    parser.add_argument("--ef", default=None, help="server search ef, comma-separated (default: pixfind's)")
    parser.add_argument("--index", default=None, help="server index type to use instead of pixfind's")
    parser.add_argument("--index-params", default=None, help="JSON build params, e.g. '{\"M\": 16}'")
    parser.add_argument("--index-timeout", type=float, default=3600, help="seconds to wait for the index")
    parser.add_argument("--uri", help="use this Milvus server instead of starting one")
    parser.add_argument("--token")
    args = parser.parse_args()
    args.ef = [int(x) for x in args.ef.split(",")] if args.ef else [default_search_ef()]
    if args.index or args.index_params:
        kind = args.index or policies.SERVER_INDEX["index_type"]
        params = {"nlist": 1024} if kind.startswith("IVF") else policies.SERVER_INDEX["params"]
        if args.index_params:
            params = json.loads(args.index_params)
        policies.SERVER_INDEX = {"index_type": kind, "metric_type": policies.METRIC, "params": params}
    lines = []
    for backend in args.backends.split(","):
        if backend == "lite":
            with tempfile.TemporaryDirectory() as tmp:
                lines += run_backend("lite", str(Path(tmp) / "bench.db"), None, args)
        elif backend == "server":
            with contextlib.ExitStack() as stack:
                uri, token = args.uri, args.token
                if uri is None:
                    from milvus_server import MilvusServer

                    server = stack.enter_context(MilvusServer())
                    print(f"server: Milvus 2.3.5 up in {server.start_s:.1f} s at {server.uri}", flush=True)
                    uri, token = server.uri, server.token
                lines += run_backend("server", uri, token, args)
            if args.uri is None:
                print(f"server: stopped in {server.stop_s:.1f} s", flush=True)
        else:
            parser.error(f"unknown backend {backend!r}")
    print("\n".join(["--- summary", *lines]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
