"""Indexing speed in one run: machine limit, model only, decode only, end to end, memory.

    PYTHONPATH=src python benchmarks/ingest.py [--photos 300] [--rounds 3] [--no-torch] [--memory] [--busy]

First the machine: CPU model and flags (bf16 and int8 arithmetic), OpenVINO's version, its own
default precision and capabilities, and the precision pixfind picks (``PIXFIND_PRECISION=auto``).
Then, on the first N real photos of benchmarks/photos.py (copied to a temporary folder), each
round measures, interleaved so a noisy shared machine hits every figure alike:

* the fp32 4096^2 matmul GFLOP/s and the images/s limit it implies (ViT-B-32: 8.73 GFLOP/image);
* model only: images/s of the default CPU encoder (``load_encoder``: the exported towers, images
  on OpenVINO when installed, in the precision pixfind picks, default threads, batch 16) on
  pre-decoded photos; the same OpenVINO model in f32 and in bf16 (two streams, as pixfind runs
  them), and in f32 on one stream (how pixfind ran it before); the same export on ONNX Runtime
  alone; torch fp32 with 2 threads (the reference of the speed targets; ``--no-torch`` skips it);
* decode only: ``load_image(min_side=draft_side)`` + preprocess, 1 thread;
* end to end: ``ImageIndex(uri=<fresh Lite file>).add(folder)`` with default settings, in a fresh
  process as ``pixfind index`` runs (and again with ``PIXFIND_PRECISION=f32``): the embed phase
  rate (``IndexReport.images_per_s``), the steady rate after the first batch (the image session
  is created on first use, ~0.5 s), the whole-run rate (ImageIndex opened -> add returned: scan,
  model load, embed, flush) and the process wall time, with the precision the run reported; RSS
  sampled every 0.1 s (start / peak / end), VmHWM, and the Milvus Lite child's RSS.
* with ``--busy``: model only (both OpenVINO runs) and the e2e steady rate again while another
  process spins on one core, as when the machine is shared.

The ONNX export is made (or found) before anything is timed. Prints medians and each round, and
ratios of figures from the same rounds. Random weights (``pretrained=None``): the compute is the
same as with real ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SRC = str(HERE.parent / "src")
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

BATCH = 16
VIT_B_32_GFLOP = 8.73  # per 224x224 image, counted by benchmarks/models.py image_gflop()


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def hwm_mib() -> float:
    """Peak RSS of this process (VmHWM). Not ru_maxrss: Linux carries that across fork + exec, so
    a child spawned by a big parent would report the parent's size."""
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children_rss_mib(pid: int | None = None) -> float:
    """RSS of all descendants (the Milvus Lite server runs as a child process)."""
    pid = pid or os.getpid()
    total = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        kids = [int(k) for t in tasks for k in _read(f"/proc/{pid}/task/{t}/children").split()]
    except OSError:
        return 0.0
    for kid in kids:
        try:
            total += int(_read(f"/proc/{kid}/statm").split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, IndexError):
            continue
        total += children_rss_mib(kid)
    return total


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


class Marks:
    """Progress callbacks that only record when each phase began."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.done = 0  # files embedded (or failed) so far
        self.first_count = 0  # ... by the end of the first batch

    def scanning(self, found: int) -> None:
        self.t.setdefault("scan", time.perf_counter())
        self.t["scanned"] = time.perf_counter()

    def start_embedding(self, total: int) -> None:
        self.t["embed"] = time.perf_counter()

    def embedded(self, count: int) -> None:
        """After the first batch (ONNX Runtime creates the image session on first use, ~0.5 s),
        mark the start of the steady state; the last call marks its end."""
        now = time.perf_counter()
        self.done += count
        if "first_batch" not in self.t:
            self.t["first_batch"] = now
            self.first_count = self.done
        self.t["last_batch"] = now

    def finish(self) -> None:
        self.t["finish"] = time.perf_counter()


def child(folder: str, db: str) -> None:
    """One ``pixfind index`` run in this (fresh) process; prints a JSON line."""
    samples: list[tuple[float, float, float]] = []
    done = threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter() - t0, rss_mib(), children_rss_mib()))
            done.wait(0.1)

    start_rss = rss_mib()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    from pixfind import ImageIndex

    imported = time.perf_counter()
    marks = Marks()
    with ImageIndex(uri=db) as index:
        opened = time.perf_counter()
        report = index.add(folder, progress=marks)
        whole = time.perf_counter() - imported
        count = index.store.count()
    m = marks.t
    done.set()
    sampler.join()
    end_rss = rss_mib()
    print(
        json.dumps(
            {
                "embedded": report.embedded,
                "precision": report.precision,
                "precision_reason": report.precision_reason,
                "failed": len(report.failed),
                "stored": count,
                "embed_s": report.embed_s,
                "steady_per_s": (marks.done - marks.first_count) / (m["last_batch"] - m["first_batch"]),
                "elapsed_s": report.elapsed_s,
                "whole_s": whole,
                "import_s": imported - t0,
                "open_s": opened - imported,
                "check_s": m["scan"] - opened,
                "scan_plan_s": m["scanned"] - m["scan"],
                "model_load_s": m["embed"] - m["scanned"],
                "flush_prune_s": m["finish"] - m["embed"] - report.embed_s,
                "embed_window": [m["embed"] - t0, m["embed"] - t0 + report.embed_s],
                "lite_rss_peak": max(c for *_, c in samples),
                "rss_start": start_rss,
                "rss_end": end_rss,
                "rss_peak_sampled": max(r for _, r, _ in samples),
                "peak_rss_VmHWM": hwm_mib(),
                "samples": samples,
            }
        )
    )


def run_e2e(folder: Path, work: Path, round_no: int, precision: str | None = None) -> dict:
    """``precision``: PIXFIND_PRECISION for the run (None: the default, auto)."""
    db = work / f"e2e-{round_no}.db"
    env = dict(os.environ, PYTHONPATH=SRC, PYTHONWARNINGS="ignore", PIXFIND_PRETRAINED="none")
    env.pop("PIXFIND_BACKEND", None)
    env.pop("PIXFIND_PRECISION", None)
    if precision:
        env["PIXFIND_PRECISION"] = precision
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(folder), str(db)], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"e2e run failed:\n{out.stderr[-3000:]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    data["process_wall_s"] = wall
    shutil.rmtree(db, ignore_errors=True)
    for extra in work.glob(f"e2e-{round_no}.db*"):
        if extra.is_dir():
            shutil.rmtree(extra, ignore_errors=True)
        else:
            extra.unlink()
    return data


def checked(e2e: dict, files: int) -> dict:
    if e2e["embedded"] != files or e2e["stored"] != files:
        sys.exit(f"e2e indexed {e2e['embedded']} / stored {e2e['stored']} of {files}: {e2e}")
    return e2e


@contextlib.contextmanager
def busy_process() -> Iterator[None]:
    """Another job on the machine: a process spinning on one core while the block runs."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        yield
    finally:
        hog.kill()
        hog.wait()


def machine() -> str:
    """The CPU and what pixfind and OpenVINO make of it: the figures depend on all three."""
    from pixfind.models.openvino_runtime import choose_precision, cpu_description, cpu_flags, precision_name, version

    flags = cpu_flags()
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_fp16")
    lines = [
        f"CPU: {cpu_description()}, {os.cpu_count()} CPUs, this process may use {len(os.sched_getaffinity(0))}",
        f"CPU flags: {' '.join(f for f in wanted if f in flags) or 'none of ' + ' '.join(wanted)}",
    ]
    ov = version()
    if ov:
        import openvino

        core = openvino.Core()
        default = precision_name(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))
        capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        lines.append(f"OpenVINO {ov}: its own default precision {default}, capabilities {' '.join(capabilities)}")
    choice = choose_precision("auto")
    lines.append(f"pixfind PIXFIND_PRECISION=auto -> {choice.precision} ({choice.reason})")
    return "\n".join(lines)


def fmt(values: list[float], digits: int = 1) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=300, help="photos to index (default 300)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="per model-only measurement")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--no-torch", action="store_true", help="skip model-only torch fp32 (the targets' reference)")
    parser.add_argument("--memory", action="store_true", help="print the RSS trace of each e2e run")
    parser.add_argument(
        "--busy", action="store_true", help="also model only and e2e beside a busy process (one core spinning)"
    )
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "DB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from decode import pipeline
    from models import matmul_gflops, rate
    from photos import describe, photo_dir

    from pixfind.config import ModelSpec, Settings, cpu_cores
    from pixfind.ingest.decode import load_image
    from pixfind.models.load import load_encoder
    from pixfind.models.onnx_runtime import OnnxClipEncoder

    os.environ["PIXFIND_PRETRAINED"] = "none"
    os.environ.pop("PIXFIND_PRECISION", None)
    print(machine())
    spec = ModelSpec(args.model, None)
    t = time.perf_counter()
    encoder = load_encoder(spec, Settings.from_env(backend="onnx"))  # exports once (torch) if not cached
    print(
        f"ONNX encoder ready in {time.perf_counter() - t:.1f} s ({type(encoder).__name__}, "
        f"threads {encoder.threads}, draft_side {encoder.draft_side}); export: {encoder.folder}"
    )
    source = photo_dir(max(1000, args.photos))
    print(describe(source))
    all_files = sorted(source.glob("*.jpg"))[: args.photos]
    if len(all_files) < args.photos:
        sys.exit(f"only {len(all_files)} photos in {source}")

    work = Path(tempfile.mkdtemp(prefix="pixfind-ingest-"))
    folder = work / "photos"
    folder.mkdir()
    for f in all_files:
        shutil.copy2(f, folder / f.name)
    files = sorted(folder.glob("*.jpg"))
    mib = sum(f.stat().st_size for f in files) / 2**20
    print(f"{len(files)} photos ({mib:.0f} MiB) copied to {folder}; load average {fmt(os.getloadavg(), 2)}")

    side = encoder.draft_side

    def load(path: str) -> np.ndarray:
        return encoder.preprocess(load_image(path, min_side=side).image)

    pixels = np.stack([load(str(f)) for f in files[:BATCH]])
    encoder.encode_images(pixels)  # picks the image runtime (OpenVINO's check runs once per export)
    ort_only = OnnxClipEncoder(encoder.folder, threads=encoder.threads, openvino=False)
    print(f"default image runtime: {encoder.image_runtime}, {encoder.image_precision} ({encoder.precision_reason})")
    openvino_runs: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    if encoder.image_runtime == "openvino":  # the same model in each precision, and on one stream (before 2026-11-28)
        from pixfind.models.openvino_runtime import OpenVinoVisual
        from pixfind.vectors import unit_rows

        for name, precision, streams in (("f32", "f32", None), ("bf16", "bf16", None), ("f32 1 stream", "f32", 1)):
            model = OpenVinoVisual(
                encoder.folder / "visual.onnx", encoder.threads, encoder.normalisation, streams, precision
            )
            print(f"openvino {name}: compiled {model.precision}, {model.streams} stream(s)")
            openvino_runs[name] = lambda batch, model=model: unit_rows(model.run(batch))
    one_stream = openvino_runs.get("f32 1 stream")

    tenc = None
    if not args.no_torch:
        import torch

        from pixfind.models.torch_clip import ClipEncoder

        torch.set_num_threads(2)
        tenc = ClipEncoder(spec, "cpu")
        # torch's CPU model takes its transform's float32 output: the same photos, normalised beforehand
        torch_pixels = encoder.normalisation.apply(pixels)

    results: dict[str, list[float]] = {}
    e2e_runs: list[dict] = []
    precisions: set[str] = set()
    loads: list[float] = []

    def add(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)

    for r in range(args.rounds):
        loads.append(os.getloadavg()[0])
        gf = matmul_gflops(2)
        add("matmul GFLOP/s", gf)
        add("limit images/s", gf / VIT_B_32_GFLOP)
        add("model only: default b16", rate(encoder.encode_images, pixels, args.seconds))
        for name, run in openvino_runs.items():
            add(f"model only: openvino {name} b16", rate(run, pixels, args.seconds))
        add("model only: onnxruntime b16", rate(ort_only.encode_images, pixels, args.seconds))
        if tenc is not None:
            add("model only: torch 2thr b16", rate(tenc.encode_images, torch_pixels, args.seconds))
        add("decode only: 1 thread", pipeline(files, load, None, None, 0))
        if args.busy:
            with busy_process():
                add("busy: model only: default b16", rate(encoder.encode_images, pixels, args.seconds))
                if one_stream is not None:
                    add("busy: model only: openvino 1 stream", rate(one_stream, pixels, args.seconds))
                busy_e2e = checked(run_e2e(folder, work, r), len(files))
            add("busy: e2e steady", busy_e2e["steady_per_s"])
        e2e = checked(run_e2e(folder, work, r), len(files))
        e2e_runs.append(e2e)
        add("e2e: embed phase", e2e["embedded"] / e2e["embed_s"])
        add("e2e: steady (after 1st batch)", e2e["steady_per_s"])
        add("e2e: whole run (open -> add done)", e2e["embedded"] / e2e["whole_s"])
        add("e2e: process wall (incl. imports)", e2e["embedded"] / e2e["process_wall_s"])
        precisions.add(f"{e2e['precision']} ({e2e['precision_reason']})")
        if openvino_runs:  # the same run forced to f32: what the default gains
            f32 = checked(run_e2e(folder, work, r, "f32"), len(files))
            add("e2e f32: embed phase", f32["embedded"] / f32["embed_s"])
            add("e2e f32: steady (after 1st batch)", f32["steady_per_s"])
            add("e2e f32: process wall (incl. imports)", f32["embedded"] / f32["process_wall_s"])
        print(
            f"round {r + 1}/{args.rounds}: "
            + "; ".join(f"{k} {v[-1]:.1f}" for k, v in results.items())
            + f"; load average {os.getloadavg()[0]:.1f}",
            file=sys.stderr,
            flush=True,
        )
    loads.append(os.getloadavg()[0])

    med = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"\n{len(files)} photos, batch {BATCH}, {args.model} random weights, {args.rounds} interleaved rounds; "
        f"load average (1 min) at round starts and end: {fmt(loads)}; {os.cpu_count()} CPUs"
    )
    print(f"default e2e runs embedded images in: {'; '.join(sorted(precisions))}")
    print(f"{'measure':40s} {'median':>8s}  rounds")
    for key, values in results.items():
        print(f"{key:40s} {med[key]:8.1f}  {fmt(values)}")

    def ratio(a: str, b: str) -> tuple[float, float]:
        """median of per-round ratios, ratio of medians"""
        per_round = [x / y for x, y in zip(results[a], results[b], strict=True)]
        return statistics.median(per_round), med[a] / med[b]

    print("\nratios (median of per-round ratios; ratio of medians):")
    pairs = [
        ("model only: default b16", "limit images/s", "model-only / limit"),
        ("model only: onnxruntime b16", "limit images/s", "onnxruntime alone / limit"),
        ("model only: openvino bf16 b16", "model only: openvino f32 b16", "openvino bf16 / f32"),
        ("model only: default b16", "model only: openvino f32 b16", "default / openvino f32"),
        ("model only: default b16", "model only: torch 2thr b16", "default / torch fp32 model-only"),
        ("e2e: steady (after 1st batch)", "model only: torch 2thr b16", "e2e steady / torch fp32 model"),
        ("e2e: embed phase", "model only: torch 2thr b16", "e2e embed / torch fp32 model"),
        ("e2e: process wall (incl. imports)", "model only: torch 2thr b16", "e2e process / torch fp32 model"),
        ("e2e: steady (after 1st batch)", "e2e f32: steady (after 1st batch)", "e2e steady / e2e f32 steady"),
        ("e2e: embed phase", "e2e f32: embed phase", "e2e embed / e2e f32 embed"),
        ("e2e f32: steady (after 1st batch)", "model only: openvino f32 b16", "e2e f32 steady / openvino f32"),
        ("model only: default b16", "model only: openvino f32 1 stream b16", "default / openvino f32 1 stream"),
        ("busy: model only: default b16", "busy: model only: openvino 1 stream", "busy: default / 1 stream"),
        ("e2e: embed phase", "model only: default b16", "e2e embed / model-only"),
        ("e2e: steady (after 1st batch)", "model only: default b16", "e2e steady / model-only"),
        ("e2e: whole run (open -> add done)", "model only: default b16", "e2e whole run / model-only"),
        ("e2e: process wall (incl. imports)", "model only: default b16", "e2e process wall / model-only"),
        ("decode only: 1 thread", "model only: default b16", "decode-only / model-only"),
    ]
    for a, b, label in pairs:
        if a not in results or b not in results:
            continue
        per_round, of_medians = ratio(a, b)
        print(f"  {label:34s} {per_round:5.2f}   {of_medians:5.2f}")
    # 2 cores: the model uses both at rate M (2/M core-s per image), decode 1/D core-s per image
    cores = cpu_cores()
    m, d = med["model only: default b16"], med["decode only: 1 thread"]
    bound = cores / (cores / m + 1 / d)
    print(
        f"  CPU-bound pipeline estimate {cores}/({cores}/model + 1/decode) = {bound:.1f} images/s "
        f"= {bound / m:.2f} of model-only (decode shares the cores)"
    )

    phases = {
        "import pixfind": [e["import_s"] for e in e2e_runs],
        "open ImageIndex (Milvus Lite start)": [e["open_s"] for e in e2e_runs],
        "add(): model name check (imports open_clip + torch)": [e["check_s"] for e in e2e_runs],
        "scan + plan": [e["scan_plan_s"] for e in e2e_runs],
        "model load (ONNX session) + collection create": [e["model_load_s"] for e in e2e_runs],
        "embed phase (decode + encode + upserts)": [e["embed_s"] for e in e2e_runs],
        "flush + prune": [e["flush_prune_s"] for e in e2e_runs],
        "whole run (open -> add done)": [e["whole_s"] for e in e2e_runs],
        "process wall (spawn -> exit)": [e["process_wall_s"] for e in e2e_runs],
    }
    print("\ne2e seconds per phase, median (rounds):")
    for key, values in phases.items():
        print(f"  {key:58s} {statistics.median(values):6.2f}  ({fmt(values, 2)})")
    print("\ne2e memory (MiB; pixfind process, and its Milvus Lite child separately):")
    for key in ("rss_start", "rss_peak_sampled", "rss_end", "peak_rss_VmHWM", "lite_rss_peak"):
        values = [e[key] for e in e2e_runs]
        print(f"  {key:18s} median {statistics.median(values):7.0f}  ({fmt(values, 0)})")
    for i, e in enumerate(e2e_runs):
        # flat while indexing: RSS over the embed phase, by tenths of it
        a, b = e["embed_window"]
        rss = [v for s, v, _ in e["samples"] if a <= s <= b]
        tenths = [max(rss[k * len(rss) // 10 : (k + 1) * len(rss) // 10] or [0]) for k in range(10)]
        print(
            f"  round {i + 1}: embed phase {a:.1f}-{b:.1f} s, {len(rss)} samples; RSS max per tenth: "
            f"{fmt(tenths, 0)}; growth from 2nd tenth to last {tenths[-1] - tenths[1]:+.0f} MiB"
        )
        if args.memory:
            step = max(1, len(e["samples"]) // 20)
            print("    " + ", ".join(f"{s:.1f}s:{v:.0f}+{c:.0f}" for s, v, c in e["samples"][::step]))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
