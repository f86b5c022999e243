"""Where a fresh ``pixfind search`` process spends its time, and the torch-free query path.

    PYTHONPATH=src python benchmarks/coldquery.py [--model ViT-B-32] [--repeats 5]

Each line is a fresh Python process (wall time from spawn to exit, median of --repeats, runs
interleaved). The ONNX export must exist (``benchmarks/models.py`` or any ``load_encoder`` call
makes it); random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parent.parent / "src")

STEPS = {
    "python -c pass": "pass",
    "import numpy": "import numpy",
    "import onnxruntime": "import onnxruntime",
    "import torch": "import torch",
    "import open_clip": "import open_clip",
    "import pymilvus": "from pymilvus import MilvusClient",
    "torch path: build + 1 query": (
        "import torch\nfrom pixfind.config import ModelSpec\nfrom pixfind.models.torch_clip import ClipEncoder\n"
        "torch.set_num_threads(2)\n"
        "e = ClipEncoder(ModelSpec({model!r}, None), 'cpu')\ne.encode_texts(['a dog on a beach'])"
    ),
    "onnx path: load + 1 query": (
        "import time, json\nt0 = time.perf_counter()\n"
        "from pixfind.config import ModelSpec, Settings\nfrom pixfind.models import load_query_encoder\n"
        "import onnxruntime\nt1 = time.perf_counter()\n"
        "e = load_query_encoder(ModelSpec({model!r}, None), Settings.from_env())\nt2 = time.perf_counter()\n"
        "v = e.encode_texts(['a dog on a beach'])\nt3 = time.perf_counter()\n"
        "print(json.dumps({{'imports': t1 - t0, 'load': t2 - t1, 'query': t3 - t2}}))"
    ),
    "lite: import + open + search": (
        "import time, json\nt0 = time.perf_counter()\n"
        "from pymilvus import MilvusClient\nt1 = time.perf_counter()\n"
        "c = MilvusClient({db!r})\nt2 = time.perf_counter()\n"
        "c.search('bench', data=[[0.1] * {dim}], limit=10, output_fields=['path'])\n"
        "t3 = time.perf_counter()\n"
        "c.close()\nprint(json.dumps({{'import': t1 - t0, 'open': t2 - t1, 'search': t3 - t2}}))"
    ),
}


def make_lite_db(folder: Path, dim: int, rows: int = 10_000) -> str:
    import numpy as np
    from pymilvus import DataType, MilvusClient

    db = str(folder / "bench.db")
    client = MilvusClient(db)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("path", DataType.VARCHAR, is_primary=True, max_length=512)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    index = client.prepare_index_params()
    index.add_index("vector", index_type="FLAT", metric_type="IP")  # as pixfind's store.METRIC
    client.create_collection("bench", schema=schema, index_params=index)
    rng = np.random.default_rng(0)
    for start in range(0, rows, 1000):
        vec = rng.standard_normal((1000, dim)).astype("float32")
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)
        client.insert("bench", [{"path": f"/p/{start + i}.jpg", "vector": v} for i, v in enumerate(vec)])
    client.flush("bench")
    client.close()
    return db


def run(code: str) -> tuple[float, dict]:
    env = dict(os.environ, PYTHONPATH=SRC, PYTHONWARNINGS="ignore")
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"failed: {code}\n{out.stderr[-2000:]}")
    last = out.stdout.strip().splitlines()[-1:] if out.stdout.strip() else []
    try:
        detail = json.loads(last[0]) if last else {}
    except ValueError:
        detail = {}
    return wall, detail


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-lite", action="store_true")
    parser.add_argument("--make-db", nargs=2, metavar=("FOLDER", "DIM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_db:  # in its own process: Lite keeps a file open until its process exits
        make_lite_db(Path(args.make_db[0]), int(args.make_db[1]))
        return
    sys.path.insert(0, SRC)
    from pixfind.config import ModelSpec
    from pixfind.models.onnx_runtime import OnnxClipEncoder

    enc = OnnxClipEncoder.open(ModelSpec(args.model, None))
    if enc is None:
        raise SystemExit("no ONNX export: run benchmarks/models.py first")
    tmp = Path(tempfile.mkdtemp(prefix="pixfind-cold-"))
    steps = dict(STEPS)
    if args.skip_lite:
        steps.pop("lite: import + open + search")
    else:
        subprocess.run([sys.executable, __file__, "--make-db", str(tmp), str(enc.dim)], check=True)
    walls: dict[str, list[float]] = {k: [] for k in steps}
    details: dict[str, list[dict]] = {k: [] for k in steps}
    for _ in range(args.repeats):
        for name, code in steps.items():
            wall, detail = run(code.format(model=args.model, db=str(tmp / "bench.db"), dim=enc.dim))
            walls[name].append(wall)
            details[name].append(detail)
    base = statistics.median(walls["python -c pass"])
    print(f"fresh-process wall times, {args.model}, median of {args.repeats} (interpreter start {base:.3f} s)")
    for name in steps:
        med = statistics.median(walls[name])
        parts = ""
        if details[name] and details[name][0]:
            keys = details[name][0].keys()
            parts = "  (" + ", ".join(f"{k} {statistics.median(d[k] for d in details[name]):.3f}" for k in keys) + ")"
        print(f"  {name:32s} {med:6.3f} s  (+{med - base:.3f}){parts}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
