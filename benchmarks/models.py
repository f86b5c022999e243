"""Model-only throughput and latency: torch vs ONNX Runtime (fp32, opt-in int8), in one run.

    PYTHONPATH=src python benchmarks/models.py [--model ViT-B-32] [--rounds 3] [--threads 2]

Prints the fp32 matmul GFLOP/s of this machine and the images/s limit it implies for the model,
then (medians over interleaved rounds, so a noisy shared machine hits every config alike):
images/s at batch 8/16/32 per backend, one-image latency, text-query latency (full 77 tokens vs
trimmed), and int8's cosine to fp32 on real photos. Random weights (``pretrained=None``): the
compute is the same as with real ones.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)


def matmul_gflops(threads: int, n: int = 4096, repeats: int = 3) -> float:
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)
    best = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best.append(time.perf_counter() - t)
    return 2 * n**3 / min(best) / 1e9


def image_gflop(model, size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    # no inference_mode and no MHA fast path: the fused kernel hides its matmuls from the counter
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.encode_image(torch.zeros(1, 3, size, size))
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    return counter.get_total_flops() / 1e9


def rate(fn, batch: np.ndarray, seconds: float = 3.0) -> float:
    """images/s: run fn(batch) until ``seconds`` pass (at least twice), after one warm-up."""
    fn(batch)
    count, start = 0, time.perf_counter()
    while True:
        fn(batch)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and count >= 2:
            return count * len(batch) / elapsed


def latency(fn, arg, repeats: int = 7) -> float:
    fn(arg)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batches", default="8,16,32")
    parser.add_argument("--photos", type=int, default=1000)
    args = parser.parse_args()

    import torch
    from photos import describe, photo_dir

    from pixfind.config import ModelSpec
    from pixfind.ingest.decode import load_image
    from pixfind.models.export import export
    from pixfind.models.onnx_runtime import OnnxClipEncoder
    from pixfind.models.torch_clip import ClipEncoder

    torch.set_num_threads(args.threads)
    spec = ModelSpec(args.model, None)
    tenc = ClipEncoder(spec, "cpu")
    t = time.perf_counter()
    folder = export(tenc)
    print(f"export ready in {time.perf_counter() - t:.1f} s: {folder}")
    oenc = OnnxClipEncoder(folder, threads=args.threads)
    qenc = OnnxClipEncoder(folder, threads=args.threads, int8=True)
    print("parity (max abs diff, unit vectors):", oenc.meta["parity"])

    photos = photo_dir(args.photos)
    print(describe(photos))
    files = sorted(photos.glob("*.jpg"))[:64]
    pixels = np.stack([tenc.preprocess(load_image(f, min_side=tenc.draft_side).image) for f in files])

    gflop = image_gflop(tenc.model, tenc.image_size)
    batches = [int(b) for b in args.batches.split(",")]
    backends = {
        "torch": tenc.encode_images,
        "ort-fp32": oenc.encode_images,
        "ort-int8": qenc.encode_images,
    }
    results: dict[str, list[float]] = {}
    limits: list[float] = []
    for r in range(args.rounds):
        limits.append(matmul_gflops(args.threads))
        for name, fn in backends.items():
            for b in batches if name != "ort-int8" else batches[:1]:
                key = f"{name} b{b}"
                results.setdefault(key, []).append(rate(fn, pixels[:b], args.seconds))
        for name, fn in backends.items():
            results.setdefault(f"{name} 1-image ms", []).append(latency(fn, pixels[:1]))
        print(f"round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)

    gf = statistics.median(limits)
    limit = gf / gflop
    print(
        f"\nmachine: fp32 matmul 4096^2 on {args.threads} threads: {gf:.0f} GFLOP/s (rounds: "
        f"{', '.join(f'{x:.0f}' for x in limits)}); {args.model} image = {gflop:.2f} GFLOP "
        f"-> limit {limit:.1f} images/s"
    )
    print(
        f"best-round limit {max(limits):.0f} GFLOP/s -> {max(limits) / gflop:.1f} images/s "
        "(on a shared machine the best round is the closest to a quiet one)"
    )
    ref = results["torch b8"]
    print(f"{'config':24s} {'median':>8s} {'of limit':>8s} {'best':>7s} {'/torch b8':>9s}  rounds")
    for key, values in results.items():
        med = statistics.median(values)
        if "ms" in key:
            best, unit, ratio = min(values), "", ""
        else:
            best, unit = max(values), f"{med / limit:.0%}"
            ratio = f"{statistics.median(v / t for v, t in zip(values, ref, strict=True)):.2f}x"
        rounds = ", ".join(f"{v:.1f}" for v in values)
        print(f"{key:24s} {med:8.1f} {unit:>8s} {best:7.1f} {ratio:>9s}  {rounds}")

    # text queries: tokenise + encode one prompt
    prompt = ["a photo of a dog playing in the snow"]
    tok = tenc.tokenize(prompt)

    def torch_full(p):
        with torch.inference_mode():
            return tenc.model.encode_text(tok)

    text = {
        "torch text, 77 tokens": torch_full,
        "torch text, trimmed": tenc.encode_texts,
        "ort text, trimmed": oenc.encode_texts,
        "ort-int8 text, trimmed": qenc.encode_texts,
    }
    print()
    for name, fn in text.items():
        values = [latency(fn, prompt) for _ in range(args.rounds)]
        print(f"{name:24s} {statistics.median(values):7.1f} ms  (best {min(values):.1f})")

    # int8 drift on real photos
    files = sorted(photos.glob("*.jpg"))[:200]
    px = np.stack([oenc.preprocess(load_image(f, min_side=oenc.draft_side).image) for f in files])
    a = np.concatenate([oenc.encode_images(px[i : i + 16]) for i in range(0, len(px), 16)])
    b = np.concatenate([qenc.encode_images(px[i : i + 16]) for i in range(0, len(px), 16)])
    c = (a * b).sum(1)
    t1 = oenc.encode_texts([f"a photo of item {i}" for i in range(50)])
    t2 = qenc.encode_texts([f"a photo of item {i}" for i in range(50)])
    ct = (t1 * t2).sum(1)
    print(
        f"\nint8 vs fp32 cosine, {len(files)} photos: min {c.min():.4f} mean {c.mean():.4f}; "
        f"50 texts: min {ct.min():.4f} mean {ct.mean():.4f}"
    )
    t = torch.from_numpy(oenc.normalisation.apply(px[:16]))  # preprocess gives uint8
    with torch.inference_mode():
        ref = tenc.model.encode_image(t).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    print(f"ort fp32 vs torch max abs diff on 16 photos: {np.abs(ref - a[:16]).max():.2e}")


if __name__ == "__main__":
    main()
