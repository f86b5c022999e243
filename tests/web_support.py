"""Shared by the web tests: a small gallery of generated pictures and an index built over it.

The pictures are drawn (skies, seas, hills, fields, flowers, night scenes) so that a screenshot
of the page looks like a photo gallery, not a test pattern; the model has random weights, so
which ones come first means nothing.
"""

from __future__ import annotations

import math
import os
import random
import re
import subprocess
import sys
import threading
import zlib
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

#: A small open_clip architecture with random weights: fast to load, real code paths.
TEST_MODEL = "ViT-S-32"

PALETTES = {
    "sunset": [(255, 183, 94), (237, 100, 100), (94, 59, 128)],
    "dawn": [(255, 224, 178), (250, 160, 140), (120, 120, 190)],
    "day": [(140, 200, 255), (190, 225, 255), (235, 245, 255)],
    "dusk": [(40, 40, 90), (170, 80, 120), (250, 170, 110)],
    "night": [(10, 14, 38), (28, 36, 80), (60, 60, 120)],
    "mist": [(200, 210, 220), (225, 230, 235), (245, 245, 245)],
}


def _gradient(size: tuple[int, int], stops: list[tuple[int, int, int]]) -> Image.Image:
    width, height = size
    column = Image.new("RGB", (1, height))
    for y in range(height):
        t = y / max(1, height - 1) * (len(stops) - 1)
        i = min(int(t), len(stops) - 2)
        f = t - i
        a, b = stops[i], stops[i + 1]
        column.putpixel((0, y), tuple(round(a[c] + (b[c] - a[c]) * f) for c in range(3)))
    return column.resize((width, height))


def _ridge(
    draw: ImageDraw.ImageDraw,
    size: tuple[int, int],
    base: float,
    amp: float,
    color: tuple[int, int, int],
    rng: random.Random,
) -> None:
    width, height = size
    phase = rng.uniform(0, 6.3)
    freq = rng.uniform(1.5, 4.0)
    points = [(0, height)]
    for x in range(0, width + 8, 8):
        y = base * height - amp * height * (
            0.6 * math.sin(x / width * freq * math.pi + phase) + 0.4 * math.sin(x / width * freq * 3.1 + phase * 2)
        )
        points.append((x, y))
    points.append((width, height))
    draw.polygon(points, fill=color)


def landscape(seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    rng = random.Random(seed)
    name = rng.choice(list(PALETTES))
    sky = PALETTES[name]
    img = _gradient(size, sky)
    draw = ImageDraw.Draw(img)
    width, height = size
    if name == "night":
        for _ in range(160):
            x, y = rng.randrange(width), rng.randrange(int(height * 0.7))
            r = rng.choice((0, 0, 1))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 255, 240))
        cx, cy = rng.randrange(width // 5, width * 4 // 5), rng.randrange(height // 8, height // 3)
        draw.ellipse((cx - 26, cy - 26, cx + 26, cy + 26), fill=(250, 245, 220))
    else:
        cx, cy = rng.randrange(width // 5, width * 4 // 5), rng.randrange(height // 6, height // 2)
        sun = (255, 240, 200) if name in ("day", "mist") else (255, 214, 130)
        glow = Image.new("L", size, 0)
        ImageDraw.Draw(glow).ellipse((cx - 90, cy - 90, cx + 90, cy + 90), fill=120)
        img.paste(Image.new("RGB", size, sun), mask=glow.filter(ImageFilter.GaussianBlur(40)))
        draw = ImageDraw.Draw(img)
        draw.ellipse((cx - 32, cy - 32, cx + 32, cy + 32), fill=sun)
    layers = rng.randint(2, 4)
    dark = sky[-1]
    for i in range(layers):
        t = (i + 1) / layers
        color = tuple(int(dark[c] * (1 - 0.65 * t) + (20 if name != "night" else 5) * t) for c in range(3))
        if rng.random() < 0.35 and i == layers - 1:
            color = (40 + rng.randrange(30), 90 + rng.randrange(60), 60 + rng.randrange(30))  # meadow
        _ridge(draw, size, 0.55 + 0.12 * i, 0.09 / (i + 1), color, rng)
    if rng.random() < 0.4:  # sea in front
        sea_top = int(height * rng.uniform(0.7, 0.8))
        sea = _gradient((width, height - sea_top), [(40, 90, 150), (20, 50, 100)])
        img.paste(sea, (0, sea_top))
        draw = ImageDraw.Draw(img)
        for _ in range(40):
            x, y = rng.randrange(width), rng.randrange(sea_top + 4, height)
            draw.line((x, y, x + rng.randrange(10, 40), y), fill=(150, 190, 230), width=1)
    return img.filter(ImageFilter.SMOOTH)


def flowers(seed: int, size: tuple[int, int] = (480, 640)) -> Image.Image:
    rng = random.Random(seed)
    img = _gradient(size, [(60, 120, 70), (30, 80, 45)])
    draw = ImageDraw.Draw(img)
    width, height = size
    hue = rng.choice([(235, 80, 120), (250, 200, 60), (150, 100, 230), (245, 245, 250), (240, 120, 60)])
    for _ in range(rng.randint(9, 16)):
        cx, cy, r = rng.randrange(width), rng.randrange(height), rng.randrange(22, 60)
        petals = rng.randint(5, 8)
        for p in range(petals):
            a = 2 * math.pi * p / petals
            px, py = cx + r * 0.6 * math.cos(a), cy + r * 0.6 * math.sin(a)
            shade = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in hue)
            draw.ellipse((px - r * 0.45, py - r * 0.45, px + r * 0.45, py + r * 0.45), fill=shade)
        draw.ellipse((cx - r * 0.25, cy - r * 0.25, cx + r * 0.25, cy + r * 0.25), fill=(250, 210, 80))
    return img.filter(ImageFilter.SMOOTH_MORE)


def make_gallery(root: Path, count: int = 18) -> list[Path]:
    """Write ``count`` pictures under ``root`` in two subfolders (plus one PNG); return the paths."""
    paths: list[Path] = []
    (root / "trips").mkdir(parents=True, exist_ok=True)
    (root / "garden").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        if i % 3 == 2:
            path = root / "garden" / f"flowers_{i:02d}.jpg"
            flowers(i).save(path, quality=88)
        else:
            path = root / "trips" / f"landscape_{i:02d}.jpg"
            landscape(i, (640, 480) if i % 2 else (720, 480)).save(path, quality=88)
        paths.append(path)
    png = root / "garden" / "sunset_card.png"
    landscape(101, (400, 400)).convert("RGBA").save(png)
    paths.append(png)
    return paths


def open_test_index(db: Path, folder: Path | None = None):  # -> pixfind.api.ImageIndex
    """An index at ``db`` built with the random-weight test model (over ``folder`` when given)."""
    from pixfind.api import ImageIndex
    from pixfind.config import ModelSpec

    index = ImageIndex(uri=str(db), model=ModelSpec(TEST_MODEL, None), device="cpu")
    if folder is not None:
        index.add(str(folder))
    return index


# -- a live `pixfind serve` ------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def child_env(workdir: Path, **extra: str) -> dict[str, str]:
    """The environment of a pixfind child process: this checkout's source, its own cache."""
    env = dict(os.environ)
    env["PIXFIND_CACHE_DIR"] = str(workdir / "cache")
    env["PYTHONUNBUFFERED"] = "1"
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
    env.update(extra)
    return env


def build_index(db: Path, gallery: Path) -> None:
    """Index ``gallery`` into ``db`` in a child process, as a user runs `pixfind index` first."""
    build = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "from web_support import open_test_index; open_test_index(Path(sys.argv[2]), Path(sys.argv[3])).close()"
    )
    subprocess.run(
        [sys.executable, "-c", build, str(Path(__file__).parent), str(db), str(gallery)],
        env=child_env(gallery.parent),
        check=True,
        timeout=600,
    )


class LiveServer:
    """``pixfind serve --port 0`` in a child process; ``url`` once it says where it listens."""

    def __init__(self, db: Path, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_path = workdir / "serve.log"
        command = [sys.executable, "-m", "pixfind", "serve", "--uri", str(db), "--port", "0", *args]
        if "--host" not in args:
            command += ["--host", "127.0.0.1"]
        self.process = subprocess.Popen(
            command,
            env=env or child_env(workdir),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=workdir,
        )
        self.lines: list[str] = []
        self._url: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(180) or self._url is None:
            self.stop()
            raise AssertionError(f"pixfind serve did not start: {' '.join(command)}\n{self.output}")
        self.url = self._url

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            match = re.search(r" at (http://\S+:\d+/)", line)
            if match and self._url is None:
                self._url = match.group(1)
            if "press Ctrl+C" in line:
                self._ready.set()
        self._ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log_path.write_text(self.output)


def blank_png(width: int, height: int) -> bytes:
    """An all-black RGB PNG of any size, made row by row (13000x13000: 2.2 MB, about a second), the
    shape of a decompression bomb under the 180 MP guard."""
    packer = zlib.compressobj(1)
    row = b"\0" * (1 + 3 * width)  # filter byte + pixels
    parts = [packer.compress(row) for _ in range(height)]
    data = b"".join(parts) + packer.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def memory_of(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def reset_peak_memory(pid: int) -> None:
    """Start VmHWM afresh (Linux: writing 5 to clear_refs), so it measures what comes next."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
