"""How quickly are bad and hostile files dealt with? (Timings that unit tests must not assert.)

The tests check *what* happens (a bomb is refused before any pixel is decoded, a long animation
is read for its first frame only: tests/test_documented_figures.py); this measures *how long*
it takes, median of several interleaved rounds:

* refusing files the decoder must not decode: headers claiming 100000x100000 px (PNG) and
  60000x60000 px (JPEG), and 15000x15000 px (under Pillow's own guard, over pixfind's);
* giving the reason for an empty, a text and a cut-short file;
* loading the first frame of a 401-frame, 16 MB GIF, against walking its frames (``n_frames``).

    python benchmarks/decode_guards.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from pixfind.ingest.decode import ImageLoadError, load_image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = _chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + data + _chunk(b"IEND", b"")


def photo(size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def jpeg_bytes(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    photo(size).save(buffer, "JPEG")
    return buffer.getvalue()


def jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(jpeg_bytes((64, 48)))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def make_files(folder: Path) -> dict[str, Path]:
    files = {
        "bomb 100000x100000 png": png_claiming(100_000, 100_000),
        "bomb 60000x60000 jpeg": jpeg_claiming(60_000, 60_000),
        "15000x15000 png (over 180 MP)": png_claiming(15_000, 15_000),
        "empty": b"",
        "text": b"just some text, not a picture\n" * 10,
        "cut jpeg": jpeg_bytes((320, 240))[:900],
    }
    paths = {}
    for name, data in files.items():
        path = folder / (name.replace(" ", "_") + ".img")
        path.write_bytes(data)
        paths[name] = path
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (200, 200), dtype=np.uint8)).convert("P") for _ in range(4)]
    gif = folder / "long.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:] * 100, duration=10)
    paths["long gif"] = gif
    return paths


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    with contextlib.suppress(ImageLoadError):
        action()
    return time.perf_counter() - started


def walk_frames(path: Path) -> int:
    with Image.open(path) as img:
        return int(img.n_frames)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_files(Path(tmp))
        cases: dict[str, Callable[[], object]] = {
            f"{name} (draft {side})": (lambda p=path, s=side: load_image(p, min_side=s))
            for name, path in paths.items()
            if name != "long gif"
            for side in (None, 224)
        }
        cases["long gif: first frame"] = lambda: load_image(paths["long gif"], min_side=224)
        cases["long gif: n_frames (walks 401 frames)"] = lambda: walk_frames(paths["long gif"])
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):  # interleaved, so a busy moment hits every case alike
            for name, action in cases.items():
                times[name].append(timed(action))
        width = max(map(len, cases))
        print(f"decode guards, median of {args.rounds} rounds (ms)")
        for name, values in times.items():
            print(f"  {name:<{width}}  {1000 * statistics.median(values):8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
