"""Indexing on a GPU: fp16 model-only images/s at large batches, end-to-end ``ImageIndex.add`` with
its decode pool, and the GPU's utilisation during each (sampled with ``nvidia-smi``).

For a session lent a GPU machine (the device tool): one prepared run, e.g.

    PYTHONPATH=src python benchmarks/gpu.py --make 3000 --batches 64,256,512

On a machine without CUDA it stops with one line; ``--device cpu --make 24 --batches 8 --seconds 2``
is a smoke test of the script itself. Random weights (``pretrained=None``): same compute as real
ones. Photos: ``--photos DIR`` (e.g. a carried subset of ``benchmarks/photos.py``'s set) or
``--make N`` JPEGs drawn here at 0.3-12 MP (gradients and noise: decoding costs like a photo's,
the content does not matter for speed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
warnings.filterwarnings("ignore")


class GpuUtilisation:
    """Samples ``nvidia-smi`` every 100 ms while the block runs; ``median`` is None without it."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> GpuUtilisation:
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            first = line.strip().split(",")[0]
            if first.isdigit():
                self.samples.append(float(first))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(5)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


def draw_jpeg(args: tuple[Path, int]) -> None:
    """One synthetic JPEG of 0.3-12 MP (seeded): a colour gradient with noise."""
    from PIL import Image

    path, seed = args
    rng = np.random.default_rng(seed)
    megapixels = float(np.exp(rng.uniform(np.log(0.3), np.log(12.0))))
    aspect = rng.uniform(0.6, 1.8)
    width = int((megapixels * 1e6 * aspect) ** 0.5)
    height = int(megapixels * 1e6 / width)
    small = rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    noise = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=int(rng.integers(70, 96)))


def make_photos(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"synthetic_{i:05d}.jpg", i) for i in range(count)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(draw_jpeg, jobs, chunksize=8))


def fmt(value: float | None, unit: str = "%") -> str:
    return "n/a (no nvidia-smi)" if value is None else f"{value:.0f}{unit}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batches", default="64,256,512", help="model-only batch sizes")
    parser.add_argument("--e2e-batch", type=int, default=256, help="batch size of the end-to-end run")
    parser.add_argument("--seconds", type=float, default=5.0, help="per model-only measurement")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--photos", type=Path, help="folder of images to index")
    source.add_argument("--make", type=int, metavar="N", help="draw N synthetic JPEGs to index")
    args = parser.parse_args()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: run this on a GPU machine, or pass --device cpu for a smoke test")
        return 2
    from pixfind import ImageIndex
    from pixfind.config import ModelSpec, cpu_cores
    from pixfind.encoder import ClipEncoder

    spec = ModelSpec(args.model, None)
    began = time.perf_counter()
    encoder = ClipEncoder(spec, args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    ready = time.perf_counter() - began
    print(f"{name}; {cpu_cores()} CPU cores; {args.model} fp16={encoder.half}, ready in {ready:.1f} s")

    model_only: dict[int, float] = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        pixels = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        encoder.encode_images(pixels)  # warm up (kernels, allocator)
        with GpuUtilisation() as gpu:
            began, done = time.perf_counter(), 0
            while time.perf_counter() - began < args.seconds:
                encoder.encode_images(pixels)  # host -> device copy included, as when indexing
                done += batch
            rate = done / (time.perf_counter() - began)
        model_only[batch] = rate
        print(f"model only, batch {batch:4d}: {rate:8.1f} images/s, GPU busy {fmt(gpu.median)}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="pixfind-gpu-"))
    try:
        folder = args.photos
        if folder is None:
            folder = work / "photos"
            began = time.perf_counter()
            make_photos(folder, args.make)
            print(f"drew {args.make} JPEGs in {time.perf_counter() - began:.1f} s", flush=True)
        with GpuUtilisation() as gpu, ImageIndex(uri=str(work / "gpu.db"), encoder=encoder, model=spec) as index:
            report = index.add(folder, batch_size=args.e2e_batch)
        reference = model_only.get(args.e2e_batch) or max(model_only.values())
        print(
            f"end to end (decode pool + encode + Milvus Lite), batch {args.e2e_batch}: "
            f"{report.embedded} images, {report.images_per_s:.1f} images/s "
            f"= {report.images_per_s / reference:.2f} of model-only; GPU busy {fmt(gpu.median)} "
            f"(median over the whole run); failed {len(report.failed)}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
