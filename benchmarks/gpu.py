"""Indexing on a GPU: fp16 model-only images/s at large batches, how fast the CPU cores decode,
end-to-end ``ImageIndex.add`` with its decode pool, and the GPU's utilisation during each
(sampled with ``nvidia-smi``).

For a session lent a GPU machine (the device tool): one prepared run, under 8 minutes on an H200
with 16 cores, e.g.

    PYTHONPATH=src python benchmarks/gpu.py --quick

(``--quick`` = ``--make 8000 --small 8000 --batches 256,1024 --seconds 2 --decode-files 1500``).
On a machine without CUDA it stops with one line; ``--device cpu --make 48 --distinct 8
--small 48 --batches 8 --seconds 2`` is a smoke test of the script itself, in which the GPU decode
path runs with torchvision's *CPU* decoder: its rows say so and are no GPU figure. Random weights
(``pretrained=None``): same compute as real ones. Photos: ``--photos DIR`` (e.g. a carried subset
of ``benchmarks/photos.py``'s set) or ``--make N`` JPEGs: ``--distinct`` of them drawn here at
0.3-12 MP (gradients and noise: decoding costs like a photo's, the content does not matter for
speed), the rest byte copies of those with a few unique bytes after the JPEG's end marker, so
that every file has its own fingerprint (the indexer would otherwise reuse a copy's vector) and
costs what its original costs to decode.

Printed, in order: model-only images/s per batch size (pixels copied from host memory, as when
indexing, and already on the GPU); decode + preprocess images/s on the CPU with pixfind's decode
(draft mode + the model's transform) in threads and in processes; nvJPEG (torchvision) decode
rate as a lead; end-to-end images/s, with its ratios to model-only and to the CPU's decode rate.

GPU decoding (``--decode``, pixfind.ingest.gpu_decode): an ImageNet-size set (``--small N``
JPEGs of 0.1-0.5 MP, drawn here from the mixed set's drawn JPEGs, seeded, with unique trailers as
above); decode-only rates of the GPU path (decode, orient, resize, crop: uint8 pixels on the
device) on both sets and on progressive copies; the cosine of its vectors to the CPU path's; then
end to end with ``--decode cpu`` and ``--decode gpu`` on both sets (the mixed set once per
``--gpu-max-mp`` limit: larger JPEGs stay on the CPU's draft decoding), each with the GPU's
utilisation, where each file was decoded, and the issue's targets beside it (>= 1,500 images/s
mixed, >= 3,000 small).
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

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


def make_photos(folder: Path, count: int, distinct: int) -> None:
    """``distinct`` drawn JPEGs, then copies up to ``count`` files, each with its own trailer."""
    folder.mkdir(parents=True, exist_ok=True)
    distinct = min(distinct, count)
    drawn = [folder / f"synthetic_{i:05d}.jpg" for i in range(distinct)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(draw_jpeg, [(path, i) for i, path in enumerate(drawn)], chunksize=4))
    originals = [path.read_bytes() for path in drawn]
    for i in range(distinct, count):
        trailer = f"pixfind-benchmark-copy-{i}".encode()
        (folder / f"synthetic_{i:05d}.jpg").write_bytes(originals[i % distinct] + trailer)


# -- decode on the CPU, as the indexer does it ---------------------------------------------------

_PREPROCESS: Callable[[Any], np.ndarray] | None = None
_MIN_SIDE: int | None = None


class TorchTransform:
    """The model's whole torchvision transform to float32 (pixfind's GPU path before uint8)."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> np.ndarray:
        return self.transform(image).numpy()


def _init_decoder(preprocess: Callable[[Any], np.ndarray], min_side: int | None) -> None:
    global _PREPROCESS, _MIN_SIDE
    _PREPROCESS, _MIN_SIDE = preprocess, min_side


def decode_one(path: str) -> int:
    """pixfind's decode (draft mode) and a preprocessing; the array stays in the worker."""
    from pixfind.ingest.decode import load_image

    assert _PREPROCESS is not None
    loaded = load_image(path, min_side=_MIN_SIDE)
    return int(_PREPROCESS(loaded.image).shape[0])


def decode_rate(pool: Executor, files: list[str], warm: int) -> float:
    list(pool.map(decode_one, files[:warm]))  # start the workers
    began = time.perf_counter()
    list(pool.map(decode_one, files, chunksize=1 if isinstance(pool, ThreadPoolExecutor) else 8))
    return len(files) / (time.perf_counter() - began)


def threads_rate(preprocess: Callable[[Any], np.ndarray], min_side: int, files: list[str], workers: int) -> float:
    _init_decoder(preprocess, min_side)
    with ThreadPoolExecutor(workers) as threads:
        return decode_rate(threads, files, 2 * workers)


def processes_rate(preprocess: Callable[[Any], np.ndarray], min_side: int, files: list[str], workers: int) -> float:
    """Spawned workers that import no torch: ``preprocess`` must be picklable and torch-free."""
    context = multiprocessing.get_context("spawn")
    initargs = (preprocess, min_side)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_decoder, initargs=initargs) as procs:
        return decode_rate(procs, files, 4 * workers)


def decode_rates(encoder: Any, files: list[str], worker_counts: list[int]) -> dict[str, float]:
    """Decode + preprocess images/s: threads with the whole torch transform (float32 on the CPU,
    as before), threads with pixfind's own preprocessing (uint8 for a GPU model), and torch-free
    processes with the uint8 preprocessing."""
    from pixfind.models.pixels import resize_crop

    side, cores = encoder.draft_side, max(worker_counts)
    rates: dict[str, float] = {}

    def show(label: str, rate: float) -> None:
        rates[label] = rate
        print(f"decode + preprocess, {label:34s} {rate:8.1f} images/s", flush=True)

    show(
        f"{cores} threads, torch transform float32",
        threads_rate(TorchTransform(encoder._transform), side, files, cores),
    )
    for workers in worker_counts:
        show(f"{workers} threads, pixfind preprocess", threads_rate(encoder.preprocess, side, files, workers))
    uint8 = functools.partial(resize_crop, size=encoder.image_size)
    show(f"{cores} processes, uint8 resize+crop", processes_rate(uint8, side, files, cores))
    return rates


def nvjpeg_rate(files: list[str], batch: int = 64) -> float | None:
    """Full-size JPEG decode on the GPU (torchvision's nvJPEG), a lead for a GPU decode path."""
    try:
        import torch
        from torchvision.io import decode_jpeg

        data = [torch.frombuffer(bytearray(Path(f).read_bytes()), dtype=torch.uint8) for f in files]
        decode_jpeg(data[:batch], device="cuda")
        torch.cuda.synchronize()
        began = time.perf_counter()
        for start in range(0, len(data), batch):
            decode_jpeg(data[start : start + batch], device="cuda")
        torch.cuda.synchronize()
        return len(data) / (time.perf_counter() - began)
    except Exception as exc:  # a lead only: any failure is reported and skipped
        print(f"nvJPEG decode: not measured ({type(exc).__name__}: {exc})")
        return None


# -- the model alone -------------------------------------------------------------------------------


def timed(step: Callable[[], None], batch: int, seconds: float, sync: Callable[[], None]) -> float:
    step()
    sync()
    began, done = time.perf_counter(), 0
    while time.perf_counter() - began < seconds:
        step()
        done += batch
    sync()
    return done / (time.perf_counter() - began)


def model_only(encoder: Any, batches: list[int], seconds: float) -> dict[int, float]:
    """Images/s per batch: float32 pixels from host memory (the old path), uint8 from host memory
    (what the indexer hands a GPU model now), and pixels already on the device (the model alone)."""
    import torch

    on_gpu = str(encoder.device).startswith("cuda")
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    rates: dict[int, float] = {}
    rng = np.random.default_rng(0)
    for batch in batches:
        pixels = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
        as_uint8 = rng.integers(0, 256, (batch, 3, 224, 224), dtype=np.uint8)
        rate_float = timed(lambda p=pixels: encoder.encode_images(p), batch, seconds / 2, sync)
        if encoder.preprocess(_probe_image()).dtype == np.uint8:
            with GpuUtilisation() as gpu:
                rates[batch] = timed(lambda p=as_uint8: encoder.encode_images(p), batch, seconds, sync)
        else:
            rates[batch] = rate_float
            gpu = GpuUtilisation()
        resident = torch.from_numpy(pixels).to(encoder.device)
        resident = resident.half() if encoder.half else resident

        def on_device(x: Any = resident) -> None:
            with torch.inference_mode():
                encoder.model.encode_image(x)

        rate_resident = timed(on_device, batch, seconds / 2, sync)
        peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0
        print(
            f"model only, batch {batch:4d}: {rates[batch]:8.1f} images/s from uint8 in host memory "
            f"(GPU busy {fmt(gpu.median)}); {rate_float:8.1f} from float32; {rate_resident:8.1f} with the "
            f"pixels already on the device; peak GPU memory {peak:.1f} GiB",
            flush=True,
        )
    return rates


def _probe_image() -> Any:
    from PIL import Image

    return Image.new("RGB", (300, 200))


def fmt(value: float | None, unit: str = "%") -> str:
    return "n/a (no nvidia-smi)" if value is None else f"{value:.0f}{unit}"


# -- GPU decoding (--decode) -----------------------------------------------------------------------

from pixfind.ingest.gpu_decode import GPU_MAX_PIXELS  # noqa: E402

TARGETS = {"mixed": 1500.0, "small": 3000.0}  # issue 17: end-to-end images/s on an H200 with 16 cores


def shrink_jpeg(args: tuple[Path, Path, int, bool]) -> None:
    """An ImageNet-size (0.1-0.5 MP, seeded) JPEG drawn from a mixed-set one."""
    from PIL import Image

    source, target, seed, progressive = args
    rng = np.random.default_rng(10_000 + seed)
    megapixels = rng.uniform(0.1, 0.5)
    with Image.open(source) as img:
        width, height = img.size
        scale = (megapixels * 1e6 / (width * height)) ** 0.5
        size = (max(16, int(width * scale)), max(16, int(height * scale)))
        img.draft("RGB", size)
        small = img.convert("RGB").resize(size, Image.BICUBIC)
    small.save(target, quality=int(rng.integers(75, 96)), progressive=progressive)


def make_small_photos(drawn: list[Path], folder: Path, count: int, progressive: bool = False) -> None:
    """``count`` ImageNet-size JPEGs: one per drawn mixed-set JPEG, then copies with trailers."""
    folder.mkdir(parents=True, exist_ok=True)
    distinct = drawn[: min(len(drawn), count)]
    made = [folder / f"small_{i:05d}.jpg" for i in range(len(distinct))]
    jobs = [(src, dst, i, progressive) for i, (src, dst) in enumerate(zip(distinct, made, strict=True))]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(shrink_jpeg, jobs, chunksize=8))
    originals = [path.read_bytes() for path in made]
    for i in range(len(made), count):
        trailer = f"pixfind-benchmark-copy-{i}".encode()
        (folder / f"small_{i:05d}.jpg").write_bytes(originals[i % len(made)] + trailer)


def decode_device_for(device: str) -> str:
    """Where the GPU path decodes: the model's CUDA device, or (smoke test) the CPU."""
    return device if device.startswith("cuda") else "cpu"


def path_label(device: str) -> str:
    return (
        "GPU path" if device.startswith("cuda") else "GPU path ON THE CPU (torchvision CPU decoder; not a GPU figure)"
    )


def compressed_items(files: list[str], decoder: Any) -> list[Any]:
    """The decode threads' output for ``files`` as the GPU path sees it (read, hashed, routed)."""
    from pixfind.ingest.pipeline import decode_item
    from pixfind.ingest.plan import WorkItem
    from pixfind.ingest.scan import FileEntry

    items = []
    for path in files:
        info = os.stat(path)
        item = WorkItem(FileEntry(path, info.st_size, info.st_mtime_ns), path, False)
        items.append(decode_item(item, lambda image: np.zeros(0), None, gpu_route=decoder.route))
    return items


def gpu_decode_rate(encoder: Any, files: list[str], device: str, batch: int, label: str) -> float | None:
    """Decode-only images/s of the GPU path: bytes in host memory (read and routed beforehand) to
    uint8 (N, 3, S, S) pixels on the device; files the GPU does not take are left out."""
    import torch

    from pixfind.ingest.gpu_decode import GpuDecoder
    from pixfind.ingest.pipeline import Compressed

    decoder = GpuDecoder(device, encoder.image_size, encoder.draft_side, max_pixels=180_000_000)
    items = [i for i in compressed_items(files, decoder) if isinstance(i, Compressed)]
    if not items:
        print(f"{path_label(device)} decode only, {label}: no file for the GPU decoder")
        return None
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    decoder.pixels(items[:batch])
    sync()
    began = time.perf_counter()
    for start in range(0, len(items), batch):
        decoder.pixels(items[start : start + batch])
    sync()
    rate = len(items) / (time.perf_counter() - began)
    megapixels = statistics.mean(i.header.width * i.header.height for i in items) / 1e6
    print(
        f"{path_label(device)} decode only (decode + orient + resize + crop, uint8 on the device), {label}: "
        f"{rate:8.1f} images/s ({len(items)} files, mean {megapixels:.2f} MP, batches of {batch}; "
        f"fallbacks {decoder.counts.fallback}, failed {decoder.counts.failed})",
        flush=True,
    )
    return rate


def routing_cost(files: list[str], min_side: int) -> None:
    """What the decode threads pay per file to route it (header read by Pillow, end-marker
    check), against the CPU path's draft decode of the same bytes: the routing's overhead."""
    from pixfind.ingest.decode import load_image
    from pixfind.ingest.gpu_decode import gpu_header

    data = [Path(f).read_bytes() for f in files]
    gpu_header(data[0])  # first-call imports and plugin set-up are not a per-file cost
    load_image("", min_side=min_side, data=data[0])
    began = time.perf_counter()
    routed = sum(gpu_header(d) is not None for d in data)
    header_s = (time.perf_counter() - began) / len(data)
    began = time.perf_counter()
    for d in data:
        load_image("", min_side=min_side, data=d)
    decode_s = (time.perf_counter() - began) / len(data)
    print(
        f"routing, one thread: {header_s * 1e6:.0f} us per file to read the header "
        f"({header_s / decode_s:.2%} of the CPU path's draft decode, {decode_s * 1e3:.1f} ms); "
        f"{routed} of {len(data)} files to the GPU decoder (limit {GPU_MAX_PIXELS / 1e6:g} MP)",
        flush=True,
    )


def special_jpegs(source: Path, folder: Path) -> list[str]:
    """The kinds of JPEG the GPU decoder must get right besides the mixed set's (greyscale, EXIF
    rotation, progressive, other chroma subsamplings), drawn from one mixed-set JPEG at ~1 MP."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as img:
        img.draft("RGB", (1200, 1200))
        photo = img.convert("RGB")
    photo.thumbnail((1200, 1200))
    exif = Image.Exif()
    exif[0x0112] = 6
    kinds: dict[str, tuple[Any, dict[str, Any]]] = {
        "greyscale": (photo.convert("L"), {}),
        "exif-6": (photo, {"exif": exif.tobytes()}),
        "progressive": (photo, {"progressive": True}),
        "4-4-4": (photo, {"subsampling": 0}),
        "4-2-2": (photo, {"subsampling": 1}),
    }
    paths = []
    for name, (image, options) in kinds.items():
        path = folder / f"{name}.jpg"
        image.save(path, quality=90, **options)
        paths.append(str(path))
    return paths


def gpu_fidelity(encoder: Any, files: list[str], device: str) -> None:
    """Cosine of the GPU path's vectors to the CPU path's (draft decoding, and full size) for
    the same files: the GPU decoder's pixels differ from libjpeg's by its IDCT and upsampling."""
    from pixfind.ingest.gpu_decode import GpuDecoder
    from pixfind.ingest.pipeline import Compressed, Decoded, decode_item
    from pixfind.models.pixels import resize_crop

    decoder = GpuDecoder(device, encoder.image_size, encoder.draft_side, max_pixels=180_000_000)
    items = [i for i in compressed_items(files, decoder) if isinstance(i, Compressed)]
    if not items:
        return
    pixels, kept, _ = decoder.pixels(items)
    on_gpu = encoder.encode_images(pixels)
    cosines: dict[str, list[float]] = {"draft": [], "full size": []}
    for row, index in zip(on_gpu, kept, strict=True):
        item = items[index].item
        for label, side in (("draft", encoder.draft_side), ("full size", None)):
            cpu = decode_item(item, functools.partial(resize_crop, size=encoder.image_size), side)
            assert isinstance(cpu, Decoded)
            cosines[label].append(float(row @ encoder.encode_images(cpu.pixels[None])[0]))
    if len(kept) <= 8:  # the special kinds: each by name
        for index, full in zip(kept, cosines["full size"], strict=True):
            print(f"  {Path(items[index].item.entry.path).name}: cosine {full:.5f} to the CPU path at full size")
    print(
        f"{path_label(device)} vectors vs the CPU path's, {len(kept)} files: "
        + "; ".join(f"{k} min {min(v):.5f} / mean {statistics.mean(v):.5f}" for k, v in cosines.items())
        + " (docs/speed.md: draft vs full size on real photos, min 0.99850 on 160, 0.99228 on 950)",
        flush=True,
    )


def end_to_end(
    encoder: Any,
    spec: Any,
    folder: Path,
    uri: str,
    *,
    decode: str,
    batch: int,
    workers: int,
    device: str,
    max_pixels: int,
    reference: float,
    target: float | None,
    label: str,
) -> float:
    """One ``pixfind index`` run of ``folder`` (the local Indexer, as ``ImageIndex.add`` runs it)
    with ``decode``; prints images/s, GPU utilisation, where files were decoded, the target."""
    from pixfind import ImageIndex
    from pixfind.errors import PixfindError
    from pixfind.ingest.runner import Indexer

    on_cpu_smoke = decode == "gpu" and not device.startswith("cuda")
    with GpuUtilisation() as gpu, ImageIndex(uri=uri, encoder=encoder, model=spec) as index:
        indexer = Indexer(
            index.store,
            lambda: encoder,
            batch_size=batch,
            workers=workers,
            decode=decode,
            decode_device=decode_device_for(device) if decode == "gpu" else None,
            gpu_max_pixels=max_pixels,
        )
        try:
            report = indexer.run([str(folder)])
        except PixfindError as exc:
            print(f"end to end, {label}, --decode {decode}: not measured: {exc}", flush=True)
            return 0.0
    counts = indexer.gpu_decoder.counts if indexer.gpu_decoder is not None else None
    where = (
        f"decoded: {counts.on_device} on the device, {counts.cpu_path} by the CPU threads, "
        f"{counts.fallback} fell back, {counts.failed} failed, {counts.batch_retries} batch retries"
        if counts
        else "all decoded by the CPU threads"
    )
    limit = f", JPEGs over {max_pixels / 1e6:g} MP on the CPU" if decode == "gpu" else ""
    verdict = ""
    if target is not None and not on_cpu_smoke and device.startswith("cuda"):
        verdict = f"; target >= {target:,.0f}: {'met' if report.images_per_s >= target else 'NOT met'}"
    elif target is not None:
        verdict = f"; target >= {target:,.0f} applies on the GPU machine only"
    print(
        f"end to end, {label}, --decode {decode}{' (ON THE CPU: not a GPU figure)' if on_cpu_smoke else ''}"
        f"{limit}: {report.embedded} images in {report.elapsed_s:.1f} s, {report.images_per_s:.1f} images/s "
        f"= {report.images_per_s / reference:.2f} of model-only; GPU busy {fmt(gpu.median)} (median); "
        f"{workers} decode threads, batch {batch}; {where}; failed {len(report.failed)}{verdict}",
        flush=True,
    )
    return report.images_per_s


def quick_preset(argv: list[str]) -> list[str]:
    """``--quick``: the prepared GPU-machine run, its options before any given explicitly."""
    if "--quick" not in argv:
        return argv
    preset = [
        "--small",
        "8000",
        "--batches",
        "256,1024",
        "--seconds",
        "2",
        "--decode-files",
        "1500",
        "--gpu-max-mp",
        "4,8,180",
    ]
    if "--photos" not in argv:
        preset += ["--make", "8000"]
    return [*preset, *argv]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batches", default="64,256,512,1024", help="model-only batch sizes")
    parser.add_argument("--e2e-batch", type=int, default=256, help="batch size of the end-to-end run")
    parser.add_argument(
        "--e2e-workers", default="", help="decode threads of each end-to-end run, e.g. 16,24 (default: pixfind's)"
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="per model-only measurement")
    parser.add_argument("--decode-files", type=int, default=3000, help="files in each decode-only measurement")
    parser.add_argument("--skip-decode", action="store_true", help="no decode-only measurements")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--photos", type=Path, help="folder of images to index")
    source.add_argument("--make", type=int, metavar="N", help="make N synthetic JPEGs to index")
    parser.add_argument("--distinct", type=int, default=600, help="with --make: how many are drawn")
    parser.add_argument("--decode", default="cpu,gpu", help="--decode modes of the end-to-end runs")
    parser.add_argument("--small", type=int, default=10000, help="ImageNet-size JPEGs to make (0: none)")
    parser.add_argument("--gpu-max-mp", default="8", help="GPU decode size limits (MP) for the mixed set, e.g. 4,8,180")
    parser.add_argument("--quick", action="store_true", help="the prepared GPU-machine run (< 8 minutes on an H200)")
    args = parser.parse_args(quick_preset(sys.argv[1:]))

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: run this on a GPU machine, or pass --device cpu for a smoke test")
        return 2
    from pixfind.config import ModelSpec, cpu_cores
    from pixfind.ingest.runner import default_workers
    from pixfind.models.torch_clip import ClipEncoder

    spec = ModelSpec(args.model, None)
    began = time.perf_counter()
    # uint8 pixels normalised by the model on the CPU as well, so that the smoke test runs the GPU path
    encoder = ClipEncoder(spec, args.device, normalise_on_device=True)
    on_gpu = args.device.startswith("cuda")
    name = torch.cuda.get_device_name() if on_gpu else "CPU"
    ready = time.perf_counter() - began
    cores = cpu_cores()
    print(f"{name}; {cores} CPU cores; torch {torch.__version__}; {args.model}, fp16={encoder.half}")
    print(f"model ready in {ready:.1f} s")

    rates = model_only(encoder, [int(b) for b in args.batches.split(",")], args.seconds)

    work = Path(tempfile.mkdtemp(prefix="pixfind-gpu-"))
    try:
        folder = args.photos
        if folder is None:
            folder = work / "photos"
            began = time.perf_counter()
            make_photos(folder, args.make, args.distinct)
            took = time.perf_counter() - began
            print(f"made {args.make} JPEGs ({args.distinct} drawn) in {took:.1f} s", flush=True)
        files = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        sample = files[: args.decode_files]
        counts = sorted({max(1, cores // 4), max(1, cores // 2), cores})
        if args.skip_decode:
            cpu_limit = threads_rate(encoder.preprocess, encoder.draft_side, sample, cores)
            print(f"decode + preprocess, {cores} threads, pixfind preprocess: {cpu_limit:8.1f} images/s", flush=True)
        else:
            decoded = decode_rates(encoder, sample, counts)
            cpu_limit = decoded[f"{cores} threads, pixfind preprocess"]
        if on_gpu and not args.skip_decode:
            rate = nvjpeg_rate(sample[:1000])
            if rate is not None:
                print(f"nvJPEG decode (full size, batches of 64, no resize): {rate:8.1f} images/s", flush=True)

        reference = rates.get(args.e2e_batch) or max(rates.values())
        small = None
        if args.small:
            small = work / "small"
            began = time.perf_counter()
            drawn = sorted(folder.glob("synthetic_*.jpg"))[: args.distinct] or [Path(f) for f in files]
            make_small_photos(drawn, small, args.small)
            make_small_photos(drawn[:200], work / "progressive", min(args.small, 1000), progressive=True)
            took = time.perf_counter() - began
            print(f"made {args.small} ImageNet-size JPEGs (0.1-0.5 MP) in {took:.1f} s", flush=True)
        decode_device = decode_device_for(args.device)
        gpu_decode_rate(encoder, sample, decode_device, 64, "mixed 0.3-12 MP, every size")
        if small is not None:
            small_files = sorted(str(p) for p in small.iterdir())[: args.decode_files]
            if not args.skip_decode:
                cpu_small = threads_rate(encoder.preprocess, encoder.draft_side, small_files, cores)
                print(f"decode + preprocess, {cores} threads, ImageNet-size:    {cpu_small:8.1f} images/s", flush=True)
            gpu_decode_rate(encoder, small_files, decode_device, 256, "ImageNet-size")
            progressive = sorted(str(p) for p in (work / "progressive").iterdir())[:500]
            gpu_decode_rate(encoder, progressive, decode_device, 256, "ImageNet-size, progressive")
        routing_cost(sample[:200], encoder.draft_side)
        gpu_fidelity(encoder, sample[:64], decode_device)
        gpu_fidelity(encoder, special_jpegs(Path(sample[0]), work / "special"), decode_device)

        workers = [int(w) for w in args.e2e_workers.split(",")] if args.e2e_workers else [default_workers(encoder)]
        sets = [("mixed 0.3-12 MP", folder, TARGETS["mixed"])]
        if small is not None:
            sets.append(("ImageNet-size", small, TARGETS["small"]))
        run = 0
        for label, where, target in sets:
            for mode in args.decode.split(","):
                limits = [float(mp) for mp in args.gpu_max_mp.split(",")] if mode == "gpu" else [180.0]
                if where is small:
                    limits = [GPU_MAX_PIXELS / 1e6]  # every file is under any limit
                for limit in limits:
                    for count in workers:
                        run += 1
                        end_to_end(
                            encoder,
                            spec,
                            where,
                            str(work / f"e2e-{run}.db"),
                            decode=mode,
                            batch=args.e2e_batch,
                            workers=count,
                            device=args.device,
                            max_pixels=int(limit * 1e6),
                            reference=reference,
                            target=target,
                            label=label,
                        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
