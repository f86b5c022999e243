"""Two source trees side by side: CPU seconds and wall time of ``pixfind index`` and a cold
``pixfind search``, interleaved round by round.

    python benchmarks/compare_trees.py --before OLD/src --after src --photos DIR [--rounds 4]

CPU seconds (user + system of the pixfind process and its Milvus Lite child) change much less
than wall time when other jobs share the machine, so a restructuring or a refactor can be shown
not to cost anything on a busy box. Each round indexes DIR into a fresh Milvus Lite file with
each tree (random weights, the default runtime and precision), then searches it once, cold.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def timed(src: str, args: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child processes) of ``python -m pixfind ARGS``."""
    env = dict(os.environ, PYTHONPATH=src, PIXFIND_PRETRAINED="none")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pixfind", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"pixfind {args[0]} failed with {src}: {done.stderr.strip()[-500:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the src folder of the older tree")
    parser.add_argument("--after", required=True, help="the src folder of the newer tree")
    parser.add_argument("--photos", required=True, help="a folder of images to index")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    sides = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    figures: dict[tuple[str, str], list[tuple[float, float]]] = {}
    work = tempfile.mkdtemp(prefix="pixfind-compare-")
    try:
        for round_ in range(args.rounds):
            for side, src in sides.items():
                db = os.path.join(work, f"{side}-{round_}.db")
                index = timed(src, ["index", args.photos, "--uri", db, "--quiet"])
                search = timed(src, ["search", "a white dog", "--uri", db, "-k", "5"])
                figures.setdefault((side, "index"), []).append(index)
                figures.setdefault((side, "search"), []).append(search)
                print(
                    f"round {round_} {side:6}: index {index[0]:6.1f} s wall {index[1]:5.1f} s CPU; "
                    f"cold search {search[0]:5.2f} s wall {search[1]:5.2f} s CPU; "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for task in ("index", "search"):
        (wall_b, cpu_b), (wall_a, cpu_a) = (
            tuple(statistics.median(f[i] for f in figures[(side, task)]) for i in (0, 1)) for side in sides
        )
        print(
            f"{task:6}: CPU median {cpu_b:.2f} -> {cpu_a:.2f} s (after/before {cpu_a / cpu_b:.3f}); "
            f"wall median {wall_b:.2f} -> {wall_a:.2f} s ({wall_a / wall_b:.3f})"
        )


if __name__ == "__main__":
    main()
