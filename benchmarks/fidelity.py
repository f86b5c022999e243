"""How far bf16 (and int8) image vectors are from f32 ones, and what that does to search results.

    PYTHONPATH=src python benchmarks/fidelity.py [--photos 300] [--set 10000] [--queries 50] [--int8]

1. Cosine per image on real photos (the first ``--photos`` of benchmarks/photos.py, decoded as
   ``pixfind index`` decodes them): OpenVINO bf16 and f32 against ONNX Runtime's f32 (the
   reference of pixfind's export check), and bf16 against OpenVINO f32; also on the fixed sample
   the check runs (``openvino_runtime.parity_sample``), so its tolerance can be set from photos.
2. Top-10 overlap on a ``--set``-image collection: f32 vectors, bf16 vectors, and a mixed
   collection (every other image bf16, as when runs on two machines share an index), searched
   exactly (inner product, as Milvus Lite's FLAT index does) with ``--queries`` text queries
   (f32 text tower: text stays f32) and as many image queries (held-out images, embedded in the
   precision of the index they query, or f32 for the mixed one). Overlap = |top-10 of f32 index
   with f32 queries ∩ top-10 of the other|, averaged over queries.

The collection's images are the recipes of ``benchmarks/photos.py -n SET`` (same seed: same
crops, sizes and flips of the same Debian photos) made straight at the size ``pixfind index``
would decode them: each crop is box-reduced to the recipe's size divided by the draft decode's
factor (a power of two, keeping the shorter side >= 1.5x the input), then given to
``preprocess.resize_crop`` (bicubic to 224, centre crop). The JPEG round trip at 0.3-12 MP is
skipped: writing and decoding 10,000 such files would take hours on the shared 2-core machine.
Both precisions embed the identical cached pixels (``.data/``). Random weights
(``pretrained=None``): the vectors mean nothing, but their geometry is what the ranking sees.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

BATCH = 16
TOP = 10
CAPTIONS = [
    "a dog on a beach",
    "a red car at night",
    "mountains under snow",
    "a bowl of fruit on a table",
    "a city skyline at sunset",
    "a cat sleeping on a sofa",
    "a forest path in autumn",
    "people walking in the rain",
    "a close-up of a flower",
    "an old stone building",
    "the sea with waves",
    "a bird on a branch",
    "a desert with sand dunes",
    "a plate of pasta",
    "children playing football",
    "a lighthouse on a cliff",
    "a bicycle against a wall",
    "a snowy street with lights",
    "a portrait of a woman smiling",
    "a sailing boat on a lake",
    "green hills and a blue sky",
    "a monkey face",
    "a computer keyboard",
    "a painting with bright colours",
    "a starry night sky",
    "a waterfall in the jungle",
    "a bridge over a river",
    "a cup of coffee",
    "a train station",
    "a field of sunflowers",
    "abstract shapes and gradients",
    "a 3D rendered head",
    "black and white photo of a street",
    "fog over a valley",
    "a wooden table",
    "a kitchen with white cabinets",
    "a horse in a meadow",
    "a stack of books",
    "a tropical beach with palm trees",
    "an airplane in the sky",
    "a chessboard",
    "a fish in an aquarium",
    "a glass of red wine",
    "a rocket launch",
    "an astronaut",
    "a motorcycle",
    "a coffee cup on a saucer",
    "the moon",
    "a person reading",
    "ice on a window",
]


def stats(cosines: np.ndarray) -> str:
    c = np.asarray(cosines, dtype=np.float64)
    return (
        f"min {c.min():.6f}  p1 {np.percentile(c, 1):.6f}  p5 {np.percentile(c, 5):.6f}  "
        f"median {np.median(c):.6f}  mean {c.mean():.6f}  (n={len(c)})"
    )


def embed(run: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, label: str) -> np.ndarray:
    from pixfind.vectors import unit_rows

    out = []
    start = time.perf_counter()
    for i in range(0, len(pixels), BATCH):
        out.append(unit_rows(run(np.ascontiguousarray(pixels[i : i + BATCH]))))
        if (i // BATCH) % 50 == 0 and i:
            done = i + BATCH
            rate = done / (time.perf_counter() - start)
            print(f"  {label}: {done}/{len(pixels)} ({rate:.1f} images/s)", file=sys.stderr, flush=True)
    return np.concatenate(out)


def derived_pixels(count: int, seed: int, image_size: int) -> np.ndarray:
    """The recipes of ``photos.py -n count --seed seed`` applied at the model's input size
    (cached in .data/ as uint8, N x 3 x S x S)."""
    from photos import DATA, plan, source_photos
    from PIL import Image

    from pixfind.models.pixels import draft_side_for, resize_crop

    draft_side = draft_side_for(image_size)

    cache = DATA / f"pixels-{count}-s{seed}-{image_size}.npy"
    if cache.is_file():
        return np.load(cache, mmap_mode="r")
    recipes = plan(source_photos(), count, seed)
    order = sorted(range(count), key=lambda i: (recipes[i]["source"], i))
    tmp = cache.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(count, 3, image_size, image_size))
    current, source = None, None
    start = time.perf_counter()
    for done, i in enumerate(order, 1):
        recipe = recipes[i]
        if recipe["source"] != current:
            current = recipe["source"]
            with Image.open(current) as img:
                source = img.convert("RGB")
        crop = source.crop(tuple(recipe["crop"]))
        if recipe["flip"]:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        # as a draft decode of the recipe's JPEG would: halved while the shorter side stays >= 1.5x
        w, h = recipe["size"]
        factor = 1
        while factor < 8 and min(w, h) // (2 * factor) >= draft_side:
            factor *= 2
        out[i] = resize_crop(crop.resize((max(1, w // factor), max(1, h // factor)), Image.BOX), image_size)
        if done % 500 == 0:
            print(f"  derived {done}/{count} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    out.flush()
    del out
    tmp.replace(cache)
    return np.load(cache, mmap_mode="r")


def nncf_int8(ort, photos: Path) -> Callable[[np.ndarray], np.ndarray] | None:
    """OpenVINO's image tower quantised to int8 by NNCF (static: weights and activations, the
    VNNI/AMX-INT8 kernels; the rest of the graph f32), compiled as pixfind compiles f32; None
    without nncf. The quantised model is cached in .data/ (quantising takes minutes)."""
    try:
        import nncf
    except ImportError:
        print("nncf is not installed: no OpenVINO int8 (pip install nncf)", file=sys.stderr)
        return None
    import openvino
    from photos import DATA

    from pixfind.ingest.decode import load_image
    from pixfind.models.openvino_runtime import _keep_output, taking_pixels

    core = openvino.Core()
    target = DATA / f"int8-{ort.folder.name}-{nncf.__version__}.xml"
    if not target.is_file():
        files = sorted(photos.glob("*.jpg"))[300:600]
        calibration = [
            ort.preprocess(load_image(str(f), min_side=ort.draft_side).image)[None].astype(np.float32) for f in files
        ]
        model = taking_pixels(core.read_model(str(ort.folder / "visual.onnx")), ort.normalisation)
        started = time.perf_counter()
        quantised = nncf.quantize(
            model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration)
        )
        print(f"NNCF quantised the image tower in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        openvino.save_model(quantised, str(target))
    compiled = core.compile_model(
        str(target),
        "CPU",
        {"INFERENCE_NUM_THREADS": ort.threads, "NUM_STREAMS": 2, "PERFORMANCE_HINT": "THROUGHPUT"}
        | {"INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False},
    )
    queue = openvino.AsyncInferQueue(compiled, 2)
    queue.set_callback(_keep_output)

    def run(pixels: np.ndarray) -> np.ndarray:
        parts = np.array_split(pixels.astype(np.float32), min(2, len(pixels)))
        outputs: list[np.ndarray] = [np.empty(0, np.float32)] * len(parts)
        for i, part in enumerate(parts):
            queue.start_async({0: part}, (outputs, i))
        queue.wait_all()
        return np.concatenate(outputs)

    return run


def cached_vectors(key: str, make: Callable[[], np.ndarray]) -> np.ndarray:
    from photos import DATA

    path = DATA / f"vectors-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
    if path.is_file():
        return np.load(path)
    vectors = make()
    np.save(path, vectors)
    return vectors


def top_k(index: np.ndarray, queries: np.ndarray) -> np.ndarray:
    scores = queries @ index.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :TOP]


def overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([len(set(x) & set(y)) for x, y in zip(a, b, strict=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=300, help="real photos for the cosine (default 300)")
    parser.add_argument("--set", type=int, default=10000, help="images in the search collection (0: skip)")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument(
        "--reference",
        type=int,
        default=1000,
        help="real photos for the yardstick: draft vs full decoding, bf16 vs f32 on the same set (0: skip)",
    )
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also int8: ONNX Runtime's opt-in dynamic quantisation, and OpenVINO static int8 made with NNCF "
        "(when nncf imports; calibrated on photos 300-599 of the set, not the ones measured)",
    )
    args = parser.parse_args()

    from photos import describe, photo_dir

    from pixfind.config import ModelSpec, Settings
    from pixfind.ingest.decode import load_image
    from pixfind.models.load import load_encoder
    from pixfind.models.onnx_runtime import OnnxClipEncoder
    from pixfind.models.openvino_runtime import (
        OpenVinoVisual,
        cpu_description,
        cpu_flags,
        native_bf16,
        parity_sample,
        version,
    )

    spec = ModelSpec(args.model, None)
    base = load_encoder(spec, Settings.from_env(backend="onnx", precision="f32"))
    folder = base.folder
    print(f"CPU {cpu_description()}; bf16 flags {native_bf16(cpu_flags()) or 'none'}; OpenVINO {version()}")
    print(f"export {folder}")
    ort = OnnxClipEncoder(folder, openvino=False)
    runs: dict[str, Callable[[np.ndarray], np.ndarray]] = {"onnxruntime f32": ort.run_visual_ort}
    for precision in ("f32", "bf16"):
        model = OpenVinoVisual(folder / "visual.onnx", ort.threads, ort.normalisation, precision=precision)
        print(f"OpenVINO asked for {precision}: compiled {model.precision}")
        runs[f"openvino {precision}"] = model.run
    if args.int8:
        runs["onnxruntime int8"] = OnnxClipEncoder(folder, int8=True, openvino=False).run_visual_ort
        nncf_run = nncf_int8(ort, photo_dir(1000))
        if nncf_run is not None:
            runs["openvino int8 nncf"] = nncf_run

    photos = sorted(photo_dir(max(1000, args.photos)).glob("*.jpg"))[: args.photos]  # as ingest.py
    print(describe(photos[0].parent).splitlines()[0].replace(str(photos[0].parent), "the photo set"))
    pixels = np.stack([ort.preprocess(load_image(str(p), min_side=ort.draft_side).image) for p in photos])
    vectors = {name: embed(run, pixels, name) for name, run in runs.items()}
    reference = vectors["onnxruntime f32"]
    print(f"\ncosine per image, {len(photos)} real photos:")
    for name, v in vectors.items():
        if name != "onnxruntime f32":
            print(f"  {name:18s} vs onnxruntime f32: {stats((v * reference).sum(1))}")
    bf16_f32 = (vectors["openvino bf16"] * vectors["openvino f32"]).sum(1)
    print(f"  {'openvino bf16':18s} vs openvino f32:    {stats(bf16_f32)}")
    sample = parity_sample(ort.image_size)
    ref = embed(ort.run_visual_ort, sample, "check")
    for name in ("openvino f32", "openvino bf16"):
        print(f"  check sample, {name} vs onnxruntime f32: {stats((embed(runs[name], sample, name) * ref).sum(1))}")

    if args.set:
        search(args, ort, runs, base)
    if args.reference:
        yardstick(args, ort, runs, base)


def yardstick(args: argparse.Namespace, ort, runs, base) -> None:
    """The drift pixfind already accepts, on the same scale: photos decoded at draft size (the
    default since the first speed round) against full size, both f32, next to bf16 against f32
    (both at draft size), on a collection of real JPEGs (the first ``--reference`` of the set
    minus the ``--queries`` used as image queries)."""
    from photos import photo_dir

    from pixfind.ingest.decode import load_image
    from pixfind.models.openvino_runtime import version

    files = sorted(photo_dir(max(1000, args.reference)).glob("*.jpg"))[: args.reference]
    members = files[args.queries :]  # the first --queries photos are the image queries
    stamp = f"{ort.folder.name}|{version()}|reference {len(files)}"

    def pixels(paths: list[Path], side: int | None) -> np.ndarray:
        return np.stack([ort.preprocess(load_image(str(p), min_side=side).image) for p in paths])

    print(f"\ndecoding {len(files)} real photos at draft size and at full size ...", file=sys.stderr)
    draft, full = pixels(files, ort.draft_side), pixels(files, None)
    vectors = {
        name: cached_vectors(f"{stamp}|{name}", lambda run=runs[run_name], px=px, name=name: embed(run, px, name))
        for name, run_name, px in (
            ("f32 draft", "openvino f32", draft),
            ("bf16 draft", "openvino bf16", draft),
            ("f32 full", "openvino f32", full),
        )
    }
    n = args.queries
    texts = base.encode_texts(CAPTIONS[:n])
    print(f"\n{len(members)} real photos (+{n} as image queries), top-{TOP} overlap with f32 at draft size (default):")
    for name, label in (("f32 full", "full decoding, f32"), ("bf16 draft", "draft decoding, bf16")):
        cos = (vectors[name] * vectors["f32 draft"]).sum(1)
        o_text = overlap(top_k(vectors[name][n:], texts), top_k(vectors["f32 draft"][n:], texts))
        o_image = overlap(
            top_k(vectors[name][n:], vectors[name][:n]), top_k(vectors["f32 draft"][n:], vectors["f32 draft"][:n])
        )
        print(
            f"  {label:22s} cosine min {cos.min():.6f} mean {cos.mean():.6f}; text queries mean "
            f"{o_text.mean():.2f}/10 (min {o_text.min()}), image queries mean {o_image.mean():.2f}/10 "
            f"(min {o_image.min()})"
        )


def search(args: argparse.Namespace, ort, runs, base) -> None:
    from pixfind.models.openvino_runtime import version

    count = args.set
    print(f"\nderiving {count} images at {ort.image_size}px (photos.py recipes, seed 0) ...", file=sys.stderr)
    pixels = derived_pixels(count, 0, ort.image_size)
    held_out = derived_pixels(args.queries, 1, ort.image_size)  # other crops of the same photos
    stamp = f"{ort.folder.name}|{version()}|{count}"
    index = {
        name: cached_vectors(f"{stamp}|{name}", lambda run=run, name=name: embed(run, pixels, name))
        for name, run in runs.items()
        if name != "onnxruntime f32"
    }
    f32, bf16 = index["openvino f32"], index["openvino bf16"]
    cos = (f32 * bf16).sum(1)
    print(f"\n{count} derived images, openvino bf16 vs f32 cosine: {stats(cos)}")
    mixed = f32.copy()
    mixed[1::2] = bf16[1::2]
    texts = base.encode_texts(CAPTIONS[: args.queries])
    image_q = {name: embed(runs[name], held_out, name) for name in index}
    reference_text, reference_image = top_k(f32, texts), top_k(f32, image_q["openvino f32"])
    for name in ("onnxruntime int8", "openvino int8 nncf"):
        if name in index:
            print(f"{count} derived images, {name} vs openvino f32 cosine: {stats((f32 * index[name]).sum(1))}")
    print(f"top-{TOP} overlap with the f32 collection searched with f32 queries ({args.queries} queries each):")
    cases = [
        ("bf16 collection, text queries", top_k(bf16, texts), reference_text),
        ("bf16 collection, bf16 image queries", top_k(bf16, image_q["openvino bf16"]), reference_image),
        ("bf16 collection, f32 image queries", top_k(bf16, image_q["openvino f32"]), reference_image),
        ("mixed collection, text queries", top_k(mixed, texts), reference_text),
        ("mixed collection, f32 image queries", top_k(mixed, image_q["openvino f32"]), reference_image),
        ("mixed collection, bf16 image queries", top_k(mixed, image_q["openvino bf16"]), reference_image),
    ]
    for name in ("onnxruntime int8", "openvino int8 nncf"):
        if name in index:
            int8 = index[name]
            cases += [
                (f"{name} collection, text queries", top_k(int8, texts), reference_text),
                (f"{name} collection, int8 image queries", top_k(int8, image_q[name]), reference_image),
            ]
    for label, got, want in cases:
        o = overlap(got, want)
        print(f"  {label:48s} mean {o.mean():.2f}/10  min {o.min()}/10  all 10: {int((o == TOP).sum())}")
    # where the bf16 check's tolerance sits: the collection drifted at random to a given cosine
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(f32.shape).astype(np.float32)
    noise -= (noise * f32).sum(1, keepdims=True) * f32  # orthogonal to each vector
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    print("collection drifted in random directions to a fixed cosine (f32 queries):")
    for cosine in (0.99995, 0.9999, 0.9995, 0.999, 0.998, 0.995):
        drifted = f32 + np.sqrt(1 / cosine**2 - 1) * noise
        drifted /= np.linalg.norm(drifted, axis=1, keepdims=True)
        o_text = overlap(top_k(drifted, texts), reference_text)
        o_image = overlap(top_k(drifted, image_q["openvino f32"]), reference_image)
        print(
            f"  cosine {cosine}: text mean {o_text.mean():.2f}/10 (min {o_text.min()}), "
            f"image mean {o_image.mean():.2f}/10 (min {o_image.min()})"
        )
    # how close the 10th and 11th results are: the margin a perturbation has to cross
    scores = np.sort(texts @ f32.T, axis=1)[:, ::-1]
    gap = scores[:, TOP - 1] - scores[:, TOP]
    print(f"text queries' score gap between the 10th and 11th result: median {np.median(gap):.2e}")
    scores = np.sort(image_q["openvino f32"] @ f32.T, axis=1)[:, ::-1]
    gap = scores[:, TOP - 1] - scores[:, TOP]
    print(f"image queries' score gap between the 10th and 11th result: median {np.median(gap):.2e}")


if __name__ == "__main__":
    main()
