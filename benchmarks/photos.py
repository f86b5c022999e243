"""A deterministic folder of real photos for benchmarks (see ../shared/DATA.md).

Real photographs come from Debian packages (fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x`` into ``.data/``, which git ignores); N JPEGs are derived from them with random crops,
rescales to 0.3-12 MP, flips and JPEG quality 70-95, all from a fixed seed, so every run sees the
same set. Running it again is a no-op once the set is there.

    python benchmarks/photos.py [-n 1000] [--seed 0]

Other scripts: ``from photos import photo_dir; folder = photo_dir(200)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / ".data"
PACKAGES = ("plasma-workspace-wallpapers", "opencv-doc", "lomiri-wallpapers-20.04")
MIN_MP, MAX_MP = 0.3, 12.0
DONE = "manifest.json"

Image.MAX_IMAGE_PIXELS = None


def photo_dir(count: int = 1000, seed: int = 0) -> Path:
    """Folder with ``count`` derived JPEGs (built on first use). Exits with a message if the
    Debian packages cannot be fetched."""
    folder = DATA / f"photos-{count}-s{seed}"
    if (folder / DONE).is_file():
        return folder
    sources = source_photos()
    build(folder, sources, count, seed)
    return folder


def fetch_packages() -> Path:
    """Download and unpack the packages once; returns the unpacked root."""
    root = DATA / "debian"
    marker = root / ".unpacked"
    if marker.is_file():
        return root
    debs = DATA / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in PACKAGES if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        result = subprocess.run(["apt-get", "download", *missing], cwd=debs, capture_output=True, text=True)
        if result.returncode != 0 or any(not list(debs.glob(f"{p}_*.deb")) for p in missing):
            sys.exit(f"cannot fetch {' '.join(missing)} with apt-get download:\n{result.stderr[-2000:]}")
    root.mkdir(parents=True, exist_ok=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    marker.write_text("ok\n")
    return root


def source_photos() -> list[Path]:
    """The distinct photographs: the largest rendition of each KDE wallpaper, opencv's sample
    photos, Lomiri's wallpapers. Sorted, so the derived set does not depend on listing order."""
    root = fetch_packages()
    chosen: list[Path] = []
    wallpapers = root / "usr/share/wallpapers"
    for theme in sorted(p for p in wallpapers.iterdir() if p.is_dir()):
        jpegs = [p for p in theme.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")]
        if jpegs:
            chosen.append(max(jpegs, key=lambda p: (_pixels(p), str(p))))
    for sub in ("usr/share/doc/opencv-doc/examples/data", "usr/share/backgrounds"):
        chosen += sorted(p for p in (root / sub).glob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    chosen = [p for p in chosen if _pixels(p) >= 200 * 200]
    if not chosen:
        sys.exit(f"no source photos found under {root}")
    return sorted(chosen)


def _pixels(path: Path) -> int:
    with Image.open(path) as img:
        return img.size[0] * img.size[1]


def plan(sources: list[Path], count: int, seed: int) -> list[dict]:
    """Every derived file's recipe, drawn from one seeded generator."""
    rng = np.random.default_rng(seed)
    sizes = [_size(p) for p in sources]
    recipes = []
    for index in range(count):
        target_mp = math.exp(rng.uniform(math.log(MIN_MP), math.log(MAX_MP)))
        # prefer sources that need at most 4x upscaling for this target; small ones otherwise
        fitting = [i for i, (w, h) in enumerate(sizes) if w * h * 4 >= target_mp * 1e6]
        pick = int(rng.choice(fitting)) if fitting else int(rng.integers(len(sources)))
        w, h = sizes[pick]
        area = rng.uniform(0.35, 1.0)
        aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.8)))
        cw = min(w, max(16, round(math.sqrt(area * w * h * aspect))))
        ch = min(h, max(16, round(math.sqrt(area * w * h / aspect))))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        scale = math.sqrt(target_mp * 1e6 / (cw * ch))
        recipes.append(
            {
                "file": f"photo_{index:05d}.jpg",
                "source": str(sources[pick]),
                "crop": [x, y, x + cw, y + ch],
                "size": [max(16, round(cw * scale)), max(16, round(ch * scale))],
                "flip": bool(rng.random() < 0.5),
                "quality": int(rng.integers(70, 96)),
            }
        )
    return recipes


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


_CACHE: dict[str, Image.Image] = {}


def _make(job: tuple[dict, str]) -> tuple[str, int, int, int]:
    recipe, folder = job
    source = recipe["source"]
    if source not in _CACHE:
        if len(_CACHE) > 6:
            _CACHE.clear()
        with Image.open(source) as img:
            _CACHE[source] = img.convert("RGB")
    img = _CACHE[source].crop(tuple(recipe["crop"])).resize(tuple(recipe["size"]), Image.LANCZOS)
    if recipe["flip"]:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    out = Path(folder) / recipe["file"]
    img.save(out, "JPEG", quality=recipe["quality"])
    return recipe["file"], img.size[0], img.size[1], out.stat().st_size


def build(folder: Path, sources: list[Path], count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    recipes = plan(sources, count, seed)
    # group by source so each worker decodes a source once per run of same-source jobs
    order = sorted(recipes, key=lambda r: (r["source"], r["file"]))
    workers = max(1, min(2, os.cpu_count() or 1))
    print(f"deriving {count} JPEGs from {len(sources)} photos into {folder} ...", file=sys.stderr)
    with ProcessPoolExecutor(workers) as pool:
        rows = list(pool.map(_make, [(r, str(folder)) for r in order], chunksize=16))
    rows.sort()
    (folder / DONE).write_text(
        json.dumps({"seed": seed, "count": count, "sources": [str(s) for s in sources], "files": rows})
    )


def describe(folder: Path) -> str:
    """The set's size distribution, for printing beside benchmark figures."""
    rows = json.loads((folder / DONE).read_text())["files"]
    mp = np.array([w * h / 1e6 for _, w, h, _ in rows])
    kb = np.array([b / 1024 for *_, b in rows])
    edges = [0.3, 0.5, 1, 2, 4, 8, 12.01]
    hist, _ = np.histogram(mp, bins=edges)
    buckets = ", ".join(f"{lo:g}-{min(hi, 12):g} MP: {n}" for lo, hi, n in zip(edges, edges[1:], hist, strict=False))
    return (
        f"{len(rows)} JPEGs in {folder}: megapixels min {mp.min():.2f} / median {np.median(mp):.2f} / "
        f"mean {mp.mean():.2f} / max {mp.max():.2f}; file size median {np.median(kb):.0f} KiB, "
        f"total {kb.sum() / 1024:.0f} MiB\n  {buckets}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = photo_dir(args.count, args.seed)
    print(describe(folder))


if __name__ == "__main__":
    main()
