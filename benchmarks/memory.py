"""Does indexing 100k images keep memory flat? (issue 6: RSS under 2 GiB, no growth with count.)

Creates N small distinct JPEGs (default 100,000; a few bytes after the JPEG's end make each
file's content, so its fingerprint, unique), then runs ``ImageIndex.add`` over them into a fresh
Milvus Lite file: the real scanner, planner, decode pool and look-ahead, preprocessing to the
model's 3x224x224 input, rows, upserts, progress and report. Only the model is replaced by a
stand-in that returns random unit vectors (a model's memory is a constant: see
``benchmarks/ingest.py`` for the real one on real photos), so the run takes minutes, not the hours
100k real embeddings take on 2 cores.

Prints the RSS of this process (sampled every 0.25 s) at each tenth of the files embedded, the
growth from the second tenth to the end, the peak (VmHWM) and the Milvus Lite engine's RSS.

    PYTHONPATH=src python benchmarks/memory.py [--n 100000] [--workdir /tmp/pixfind-memory]
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from ingest import children_rss_mib, hwm_mib, rss_mib  # noqa: E402

from pixfind import ImageIndex  # noqa: E402
from pixfind.config import ModelSpec  # noqa: E402
from pixfind.ingest.report import NoProgress  # noqa: E402
from pixfind.vectors import unit_rows  # noqa: E402

DIM = 512
SIZE = 224


class StandInEncoder:
    """The encoder interface with open_clip-sized inputs and outputs, and no model."""

    spec = ModelSpec("ViT-B-32", None)
    dim = DIM
    image_size = SIZE
    draft_side = 336
    fills_cpu = False
    device = "cpu"
    image_precision = None
    precision_reason = ""
    image_runtime = None

    def __init__(self) -> None:
        self._rng = np.random.default_rng(0)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
        return (np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.25

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return unit_rows(self._rng.standard_normal((len(pixels), DIM)).astype(np.float32))


def make_files(folder: Path, count: int) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), (90, 140, 200)).save(buffer, "JPEG")
    content = buffer.getvalue()
    for i in range(count):
        sub = folder / f"{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img_{i:06d}.jpg").write_bytes(content + i.to_bytes(4, "little"))


class RssTrace(NoProgress):
    """The indexer's progress hooks, recording (files embedded so far, RSS) four times a second."""

    def __init__(self) -> None:
        self.done = 0
        self.total = 0
        self.samples: list[tuple[int, float]] = []
        self.lite_peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            self.samples.append((self.done, rss_mib()))
            self.lite_peak = max(self.lite_peak, children_rss_mib())  # the Milvus Lite engine

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def start_embedding(self, total: int) -> None:
        self.total = total

    def embedded(self, count: int) -> None:
        self.done += count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--workdir", default="/tmp/pixfind-memory")
    args = parser.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    folder = work / "photos"
    started = time.perf_counter()
    make_files(folder, args.n)
    print(f"created {args.n:,} distinct JPEGs in {time.perf_counter() - started:.0f} s; RSS {rss_mib():.0f} MiB")

    progress = RssTrace()
    index = ImageIndex(uri=str(work / "memory.db"), encoder=StandInEncoder())
    started = time.perf_counter()
    report = index.add(folder, progress=progress)
    seconds = time.perf_counter() - started
    progress.stop()
    stored = index.store.count()
    index.close()
    print(
        f"indexed {report.embedded:,} (stored {stored:,}, failed {len(report.failed)}) in {seconds:.0f} s "
        f"({report.embedded / seconds:.0f} files/s, decode-bound: tiny files, no model)"
    )
    if report.embedded != args.n or stored != args.n:
        sys.exit("not every file was indexed: the figures below would not mean what they say")

    tenths = []
    for k in range(1, 11):
        upto = [rss for done, rss in progress.samples if done <= k * args.n / 10]
        tenths.append(max(upto) if upto else float("nan"))
    print("RSS max per tenth of the files (MiB): " + ", ".join(f"{x:.0f}" for x in tenths))
    print(f"growth from the 2nd tenth to the last: {tenths[-1] - tenths[1]:+.0f} MiB")
    print(f"peak RSS (VmHWM) {hwm_mib():.0f} MiB; Milvus Lite engine peak RSS {progress.lite_peak:.0f} MiB")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
