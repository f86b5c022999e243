"""Decode + preprocess throughput, alone and while inference runs, and draft-mode accuracy.

    PYTHONPATH=src python benchmarks/decode.py [--model ViT-B-32] [--images 160] [--rounds 2]

On the real-photo set (benchmarks/photos.py): decode-only images/s with 1 thread, 2 threads and
2 processes; then small end-to-end pipelines (decode pool with bounded look-ahead -> batches of
16 -> encode) for torch and ONNX Runtime with 1 or 2 inference threads and 1-2 decode threads or
processes, reported beside model-only images/s measured in the same run. Finally the cosine of
draft-decoded (min_side 448 and 224) to fully decoded embeddings. Random weights.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

BATCH = 16
_worker_pre = None


def _init_worker(folder: str) -> None:
    global _worker_pre
    from pixfind.models.onnx_runtime import OnnxClipEncoder

    _worker_pre = OnnxClipEncoder(folder)  # preprocessing only: no session is created


def _load_in_worker(path: str) -> np.ndarray:
    from pixfind.ingest.decode import load_image

    return _worker_pre.preprocess(load_image(path, min_side=_worker_pre.draft_side).image)


def pipeline(files, load, pool: Executor | None, encode, ahead: int) -> float:
    """images/s of decode -> batch -> encode with ``ahead`` files in flight."""
    start = time.perf_counter()
    if pool is None:
        for path in files:
            load(str(path))
        return len(files) / (time.perf_counter() - start)
    pending: deque = deque()
    batch: list[np.ndarray] = []
    it = iter(files)
    done = 0

    def submit() -> bool:
        path = next(it, None)
        if path is None:
            return False
        pending.append(pool.submit(load, str(path)))
        return True

    for _ in range(ahead):
        submit()
    while pending:
        item = pending.popleft()
        submit()
        batch.append(item.result())
        if len(batch) == BATCH or not pending:
            if encode:
                encode(np.stack(batch))
            done += len(batch)
            batch = []
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cosine-images", type=int, default=150)
    parser.add_argument("--skip-pipelines", action="store_true")
    args = parser.parse_args()

    import torch
    from photos import describe, photo_dir

    from pixfind.config import ModelSpec
    from pixfind.ingest.decode import load_image
    from pixfind.models.export import export
    from pixfind.models.onnx_runtime import OnnxClipEncoder
    from pixfind.models.torch_clip import ClipEncoder

    spec = ModelSpec(args.model, None)
    tenc = ClipEncoder(spec, "cpu")
    folder = export(tenc)
    ort = {n: OnnxClipEncoder(folder, threads=n) for n in (1, 2)}
    ort_nospin = OnnxClipEncoder(folder, threads=2, spinning=False)
    photos = photo_dir()
    print(describe(photos))
    all_files = sorted(photos.glob("*.jpg"))
    # spread over the set (its order is random anyway); every config sees the same files
    step = max(1, len(all_files) // args.images)
    files = all_files[::step][: args.images]
    side = tenc.draft_side

    def load_torch(path: str) -> np.ndarray:
        return tenc.preprocess(load_image(path, min_side=side).image)

    def load_numpy(path: str) -> np.ndarray:
        return ort[1].preprocess(load_image(path, min_side=side).image)

    def torch_encode(threads: int):
        def encode(batch):
            torch.set_num_threads(threads)
            if batch.dtype == np.uint8:  # pixfind's preprocessing: normalised where the model runs
                batch = ort[1].normalisation.apply(batch)
            return tenc.encode_images(batch)

        return encode

    threads1 = ThreadPoolExecutor(1)
    threads2 = ThreadPoolExecutor(2)
    procs1 = ProcessPoolExecutor(1, initializer=_init_worker, initargs=(str(folder),))
    procs2 = ProcessPoolExecutor(2, initializer=_init_worker, initargs=(str(folder),))
    for pool in (procs1, procs2):  # start workers before timing
        list(pool.map(_load_in_worker, [str(files[0])] * 4))

    pixels = np.stack([load_numpy(str(f)) for f in files[:BATCH]])
    configs: dict[str, tuple] = {
        # name: (load, pool, encode, ahead)
        "decode only, torchvision pre, 1 thread": (load_torch, None, None, 0),
        "decode only, numpy pre, 1 thread": (load_numpy, None, None, 0),
        "decode only, numpy pre, 2 threads": (load_numpy, threads2, None, 8),
        "decode only, numpy pre, 2 processes": (_load_in_worker, procs2, None, 8),
    }
    if not args.skip_pipelines:
        configs |= {
            "torch 2thr + 1 decode thread": (load_torch, threads1, torch_encode(2), 2 * BATCH),
            "torch 1thr + 1 decode thread": (load_torch, threads1, torch_encode(1), 2 * BATCH),
            "torch 2thr + 2 decode threads": (load_torch, threads2, torch_encode(2), 2 * BATCH),
            "torch 1thr + 1 decode process": (_load_in_worker, procs1, torch_encode(1), 2 * BATCH),
            "torch 2thr + 1 decode process": (_load_in_worker, procs1, torch_encode(2), 2 * BATCH),
            "ort 2thr + 1 decode thread": (load_numpy, threads1, ort[2].encode_images, 2 * BATCH),
            "ort 2thr nospin + 1 dec thread": (load_numpy, threads1, ort_nospin.encode_images, 2 * BATCH),
            "ort 1thr + 1 decode thread": (load_numpy, threads1, ort[1].encode_images, 2 * BATCH),
            "ort 2thr + 2 decode threads": (load_numpy, threads2, ort[2].encode_images, 2 * BATCH),
            "ort 1thr + 1 decode process": (_load_in_worker, procs1, ort[1].encode_images, 2 * BATCH),
            "ort 2thr + 1 decode process": (_load_in_worker, procs1, ort[2].encode_images, 2 * BATCH),
            "ort 2thr nospin + 1 dec process": (_load_in_worker, procs1, ort_nospin.encode_images, 2 * BATCH),
        }
    models = {
        "model only: torch 2thr b16": lambda: torch_encode(2)(pixels),
        "model only: torch 1thr b16": lambda: torch_encode(1)(pixels),
        "model only: ort 2thr b16": lambda: ort[2].encode_images(pixels),
        "model only: ort 1thr b16": lambda: ort[1].encode_images(pixels),
    }
    results: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for name, fn in models.items():
            fn()
            t = time.perf_counter()
            for _ in range(3):
                fn()
            results.setdefault(name, []).append(3 * BATCH / (time.perf_counter() - t))
        for name, (load, pool, encode, ahead) in configs.items():
            results.setdefault(name, []).append(pipeline(files, load, pool, encode, ahead))
            print(f"  {name}: {results[name][-1]:.1f}", file=sys.stderr)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    torch.set_num_threads(2)
    print(f"\n{len(files)} photos per config, batch {BATCH}, median of {args.rounds} rounds (images/s)")
    for name, values in results.items():
        print(f"  {name:36s} {statistics.median(values):6.1f}   ({', '.join(f'{v:.1f}' for v in values)})")

    # draft decoding vs full decoding
    sample = all_files[:: max(1, len(all_files) // args.cosine_images)][: args.cosine_images]
    enc = ort[2]
    embed = {}
    for label, min_side in (("full", None), ("448", 448), ("224", 224)):
        t = time.perf_counter()
        px = np.stack([enc.preprocess(load_image(f, min_side=min_side).image) for f in sample])
        decode_rate = len(sample) / (time.perf_counter() - t)
        embed[label] = np.concatenate([enc.encode_images(px[i : i + 16]) for i in range(0, len(px), 16)])
        print(f"  decode+preprocess min_side={label}: {decode_rate:.1f} images/s (1 thread)")
    for label in ("448", "224"):
        cos = (embed[label] * embed["full"]).sum(1)
        print(
            f"  draft {label} vs full decode, {len(sample)} photos: cosine min {cos.min():.5f} "
            f"p1 {np.percentile(cos, 1):.5f} mean {cos.mean():.5f}"
        )
    for pool in (threads1, threads2, procs1, procs2):
        pool.shutdown()


if __name__ == "__main__":
    main()
