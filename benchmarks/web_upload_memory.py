"""What one search-by-image upload costs ``pixfind serve`` in memory, at its limits and beyond.

    PYTHONPATH=src python benchmarks/web_upload_memory.py [--before SRC]

For each upload, starts ``pixfind serve`` afresh on a small index (ViT-S-32, random weights: set
``PIXFIND_MODEL=ViT-S-32 PIXFIND_PRETRAINED=none``), resets its peak RSS
(``/proc/PID/clear_refs``), posts the upload, and reads how far the peak rose above the RSS before
(``VmHWM``). The uploads: the review's decompression bomb (a 169 MP PNG of 2 MB,
three at once), and the largest accepted image of each costly kind (12 MP PNG, RGB and RGBA, and
WebP; 50 MP JPEG, baseline and progressive), made of smooth noise so they compress like photos.
With ``--before SRC`` the same uploads go to a server run from that ``src`` folder too.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))
sys.path.insert(0, str(HERE.parent / "tests"))


def photo_like(megapixels: float, mode: str, fmt: str, **save: object) -> bytes:
    import numpy as np
    from PIL import Image

    side = int((megapixels * 1e6) ** 0.5)
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (side // 16, side // 16, 3), dtype=np.uint8))
    image = small.resize((side, side), Image.Resampling.BILINEAR).convert(mode)
    out = io.BytesIO()
    image.save(out, fmt, **save)
    return out.getvalue()


def cases() -> list[tuple[str, bytes, int]]:
    from web_support import blank_png

    return [
        ("169 MP PNG x3 at once (refused)", blank_png(13000, 13000), 3),
        ("12 MP PNG, RGB", photo_like(12, "RGB", "PNG"), 1),
        ("12 MP PNG, RGBA", photo_like(12, "RGBA", "PNG"), 1),
        ("12 MP WebP", photo_like(12, "RGB", "WEBP", quality=80), 1),
        ("50 MP JPEG, baseline", photo_like(50, "RGB", "JPEG", quality=85), 1),
        ("50 MP JPEG, progressive", photo_like(50, "RGB", "JPEG", quality=85, progressive=True), 1),
    ]


def start(src: Path, db: Path, workdir: Path) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": str(src), "PIXFIND_CACHE_DIR": str(workdir / "cache"), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pixfind", "serve", "--uri", str(db), "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        match = re.search(r" at (http://\S+:\d+/)", line)
        if match:
            threading.Thread(target=lambda: process.stdout.read(), daemon=True).start()  # type: ignore[union-attr]
            return process, match.group(1)
    raise SystemExit(f"pixfind serve ({src}) did not start")


def post(url: str, payload: bytes) -> int | str:
    boundary = "memoryboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q"\r\n\r\n'.encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = Request(
        f"{url}api/search/image",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urlopen(request, timeout=600) as answer:
            return answer.status
    except HTTPError as exc:
        return exc.code
    except URLError as exc:
        return f"{exc.reason}"[:24]


def measure(pid: int, url: str, payload: bytes, copies: int) -> tuple[float, list[int | str]]:
    from web_support import memory_of, reset_peak_memory

    time.sleep(0.5)
    before = memory_of(pid)["VmRSS"]
    reset_peak_memory(pid)
    with ThreadPoolExecutor(copies) as pool:
        statuses = list(pool.map(lambda _: post(url, payload), range(copies)))
    return (memory_of(pid)["VmHWM"] - before) / 2**20, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="src folder of the checkout to compare with")
    args = parser.parse_args()
    from web_support import make_gallery, open_test_index

    work = Path(tempfile.mkdtemp(prefix="pixfind-upload-memory-"))
    try:
        make_gallery(work / "pictures", count=6)
        open_test_index(work / "now.db", work / "pictures").close()
        servers = {"now": SRC}
        if args.before:
            servers["before"] = args.before.resolve()
            shutil.copyfile(work / "now.db", work / "before.db")
        uploads = cases()
        print(f"{'upload':34} {'bytes':>11}  " + "  ".join(f"{name:>30}" for name in servers))
        results: dict[str, list[str]] = {name: [] for name in servers}
        for _, payload, copies in uploads:
            for name, src in servers.items():  # a fresh server each time: freed memory is kept by
                process, url = start(src, work / f"{name}.db", work / name)  # the allocator
                try:
                    growth, statuses = measure(process.pid, url, payload, copies)
                    results[name].append(f"{growth:6.0f} MiB ({statuses[0]})")
                finally:
                    process.terminate()
                    process.wait(30)
        for i, (label, payload, _) in enumerate(uploads):
            print(f"{label:34} {len(payload):>11,}  " + "  ".join(f"{results[n][i]:>30}" for n in servers))
        print("(peak RSS growth of the server process per upload, and the HTTP status)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
