"""Load: scanning and planning a large tree streams (flat memory) and reports progress while it
scans. 20k files by default; the 200k run of benchmarks/scan_load.py with PIXFIND_SLOW=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from pixfind.config import ModelSpec
from pixfind.ingest.runner import Indexer
from pixfind.store import Store

BENCH = Path(__file__).parent.parent / "benchmarks" / "scan_load.py"
sys.path.insert(0, str(BENCH.parent))
from scan_load import Recorder, build  # noqa: E402

SLOW = pytest.mark.skipif(not os.environ.get("PIXFIND_SLOW"), reason="long run: set PIXFIND_SLOW=1")


class NoModel:
    """Never asked to embed: the run is stopped when embedding would start."""

    spec = ModelSpec("ViT-S-32", None)
    dim = 384
    draft_side = 224
    device = "cpu"
    fills_cpu = True


def test_scan_of_20k_files_streams_and_reports_progress(tmp_path: Path, lite_uri: str) -> None:
    tree = tmp_path / "tree"
    build(tree, 20_000)  # 10k empty image files, 10k other files, 100 folders
    stop = threading.Event()
    progress = Recorder(stop)
    with Store(lite_uri) as store:
        store.ensure(NoModel.spec, NoModel.dim)
        tracemalloc.start()
        started = progress.started = time.perf_counter()
        try:
            report = Indexer(store, NoModel, progress=progress, stop=stop).run([str(tree)])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    elapsed = time.perf_counter() - started
    assert progress.to_embed == 10_000 and report.failed == []
    assert progress.scanning_calls >= 20 and progress.last_found == 10_000  # every 500 files
    assert progress.first_s is not None and progress.first_s < elapsed / 4  # early, not at the end
    assert peak < 24 * 2**20, f"{peak / 2**20:.1f} MiB of Python objects for 20k files"
    assert elapsed < 30  # ~2 s on 2 busy cores: a bound against hangs, not a benchmark


@SLOW
@pytest.mark.slow
def test_scan_of_200k_files_stays_within_a_few_hundred_mib(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent.parent / "src")]))}
    out = subprocess.run(
        [sys.executable, str(BENCH), "--files", "200000", "--tree", str(tmp_path / "tree"), "--stored"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
        check=True,
    ).stdout
    phases = {line.split(":", 1)[0].strip(): json.loads(line.split(":", 1)[1]) for line in out.splitlines()[1:]}
    for name in ("scan", "plan", "replan"):
        assert phases[name]["peak_rss_mib"] < 400, (name, phases[name])
    assert phases["plan"]["scanning_calls"] >= 200
    assert phases["replan"]["unchanged"] == 100_000
