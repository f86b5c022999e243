"""Local runner vs ``--ray`` on the same real photos, in the same run: Ray's overhead, as a ratio.

Both index the same folder into fresh collections of one Milvus server (tests/milvus_server.py,
loopback only), with the same model settings; the Ray run uses a loopback cluster
(tests/ray_cluster.py: a head without CPUs and ``--nodes`` worker nodes of ``--cpus`` CPUs).
Each figure is end to end: ``ImageIndex.add`` from call to return (scan, plan, model load, embed,
write, flush); for Ray the cluster is started before (its start time is printed on its own).

On a machine of few cores the Ray shape matters: the embedder actor reserves ``--actor-cpus`` and
runs ``--threads`` model threads; decode tasks take one CPU each. The cluster's resident memory
(every Ray process and the driver, summed: shared pages counted in each) is sampled while it
works.

    python benchmarks/ray_ingest.py [--photos 300 | --folder DIR] [--nodes 1 --cpus 2] [--threads 2] [--repeat 1]

Absolute rates depend on what else the machine runs: compare the ratio, taken in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from ray_cluster import MIB, LocalRayCluster  # noqa: E402  (sets Ray's loopback switch before ray is imported)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--folder", type=Path, help="photos to index (default: photos.py's set of --photos)")
    parser.add_argument("--nodes", type=int, default=1, help="Ray worker nodes")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs per worker node")
    parser.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs reserved by the embedder actor")
    parser.add_argument("--threads", type=int, default=2, help="model threads of the local run")
    parser.add_argument("--ray-threads", type=int, default=1, help="model threads of the Ray actor")
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1, help="local/Ray pairs")
    args = parser.parse_args()

    os.environ.setdefault("PIXFIND_PRETRAINED", "none")  # no weights offline: same compute as real ones
    os.environ["PIXFIND_THREADS"] = str(args.threads)
    from milvus_server import MilvusServer
    from photos import photo_dir

    from pixfind.api import ImageIndex
    from pixfind.ingest.ray_runner import RayOptions

    folder = args.folder or photo_dir(args.photos)
    count = sum(1 for _ in folder.glob("*.jpg"))
    print(f"{count} photos in {folder}; load {os.getloadavg()[0]:.1f}; {os.cpu_count()} cores", flush=True)
    with ImageIndex(uri=str(Path("/tmp") / f"warm-{uuid.uuid4().hex[:8]}.db")) as warm:
        warm.load_encoder()  # a first run's export for the CPU, cached for both runs (not timed)
    options = RayOptions(decode_batch=args.decode_batch, actor_cpus=args.actor_cpus, threads=args.ray_threads)
    results = []
    with MilvusServer(auth=True) as server, LocalRayCluster(workers=args.nodes, cpus_per_worker=args.cpus) as cluster:
        print(f"Ray cluster up in {cluster.start_s:.1f} s ({cluster.cpus():.0f} CPUs)", flush=True)
        for _ in range(args.repeat):
            pair = {}
            for mode in ("local", "ray"):
                peak = [0]
                done = threading.Event()

                def sample(peak: list[int] = peak, done: threading.Event = done) -> None:
                    while not done.wait(0.5):
                        peak[0] = max(peak[0], cluster.rss_bytes())

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                collection = f"bench_{mode}_{uuid.uuid4().hex[:8]}"
                began = time.perf_counter()
                with ImageIndex(uri=server.uri, token=server.token, collection=collection) as idx:
                    report = idx.add(folder, ray=options if mode == "ray" else False)
                seconds = time.perf_counter() - began
                done.set()
                sampler.join()
                pair[mode] = {
                    "seconds": round(seconds, 2),
                    "images_per_s": round(report.embedded / seconds, 2),
                    "embedded": report.embedded,
                    "failed": len(report.failed),
                    "rss_mib_peak": peak[0] // MIB,
                    "load": round(os.getloadavg()[0], 1),
                }
                print(mode, json.dumps(pair[mode]), flush=True)
            pair["ratio_ray_to_local"] = round(pair["ray"]["images_per_s"] / pair["local"]["images_per_s"], 3)
            print(f"ratio (ray / local, end to end): {pair['ratio_ray_to_local']}", flush=True)
            results.append(pair)
        idle = cluster.rss_bytes() // MIB
    print(json.dumps({"args": vars(args), "runs": results, "cluster_rss_idle_mib": idle}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
