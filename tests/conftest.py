"""Shared fixtures: a small real open_clip model with random weights, drawn test images, indexes.

No mocks: every test that stores vectors uses a real Milvus Lite file, every embedding comes from
a real open_clip architecture (random weights from pixfind's fixed seed; compute is the same).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc_fork  # noqa: F401 - first: turns gRPC's fork handlers off before pymilvus imports grpc
import numpy as np
import pytest
from milvus_server import MilvusServer
from PIL import Image
from ray_cluster import MAX_FOLDER_CHARS, LocalRayCluster

from pixfind.store import Store

# Keep the CLI and the API off the user's real data and weights folders, and offline.
os.environ.setdefault("PIXFIND_PRETRAINED", "none")
os.environ.setdefault("PIXFIND_MODEL", "ViT-S-32")
os.environ.setdefault("PIXFIND_THREADS", "2")
# Most tests embed with torch: the ONNX export (the CPU default) costs seconds per fresh cache
# folder. The ONNX path has its own tests, and the default-model CLI test runs it end to end.
os.environ.setdefault("PIXFIND_BACKEND", "torch")

SMALL_MODEL = "ViT-S-32"
SRC = str(Path(__file__).resolve().parent.parent / "src")


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path_factory.mktemp("pixfind-home")
    monkeypatch.setenv("PIXFIND_DATA_DIR", str(home / "data"))
    monkeypatch.setenv("PIXFIND_CACHE_DIR", str(home / "cache"))


@pytest.fixture(scope="session")
def small_encoder():  # type: ignore[no-untyped-def]
    """ViT-S-32 with pixfind's seeded random weights, loaded once per test session."""
    from pixfind.config import ModelSpec
    from pixfind.models.torch_clip import ClipEncoder, configure_threads

    configure_threads(2)
    return ClipEncoder(ModelSpec(SMALL_MODEL, None), "cpu")


@pytest.fixture(scope="session")
def onnx_cache(small_encoder, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    """A cache folder holding ViT-S-32's ONNX export, made once per session, so child processes
    given it run pixfind's default CPU backend (ONNX Runtime / OpenVINO) without exporting again."""
    from pixfind.models.export import export

    folder = tmp_path_factory.mktemp("onnx-cache")
    previous = os.environ.get("PIXFIND_CACHE_DIR")
    os.environ["PIXFIND_CACHE_DIR"] = str(folder)
    try:
        export(small_encoder)
    finally:
        if previous is None:
            os.environ.pop("PIXFIND_CACHE_DIR", None)
        else:
            os.environ["PIXFIND_CACHE_DIR"] = previous
    return folder


def cli_env(onnx_cache: Path | None = None, **extra: str) -> dict[str, str]:
    """Environment of a ``pixfind`` child process: this checkout first on its path; with
    ``onnx_cache``, the default backend (``PIXFIND_BACKEND`` unset) on that export, its images in
    f32 unless ``extra`` says otherwise: the exact oracle bound then holds on every CPU (a CPU with
    bf16 arithmetic would pick bf16; tests of that pass ``PIXFIND_PRECISION="auto"``)."""
    env = {**os.environ, "PIXFIND_THREADS": "1", "PYTHONFAULTHANDLER": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    if onnx_cache is not None:
        env.pop("PIXFIND_BACKEND", None)
        env["PIXFIND_CACHE_DIR"] = str(onnx_cache)
        env.setdefault("PIXFIND_PRECISION", "f32")
    return env


def draw_photo(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A photo-like picture: smooth gradients and a few shapes, different for every seed."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = [*rng.uniform(0.5, 4, 2).tolist(), rng.uniform(0, 6.28)]
        channels.append(127 + 100 * np.sin(x / width * fx * 6.28 + phase) * np.cos(y / height * fy * 3.14))
    array = np.clip(np.stack(channels, axis=-1) + rng.normal(0, 8, (height, width, 3)), 0, 255)
    return Image.fromarray(array.astype(np.uint8), "RGB")


@pytest.fixture
def make_images() -> Callable[..., list[Path]]:
    """Write ``count`` distinct JPEGs into ``folder``; returns their paths."""

    def make(
        folder: Path, count: int, start: int = 0, ext: str = ".jpg", size: tuple[int, int] = (320, 240)
    ) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for seed in range(start, start + count):
            path = folder / f"img_{seed:04d}{ext}"
            draw_photo(seed, size).save(path)
            paths.append(path)
        return paths

    return make


@pytest.fixture
def lite_uri(tmp_path: Path) -> str:
    return str(tmp_path / "index" / "pixfind.db")


@pytest.fixture
def index_factory(small_encoder, lite_uri: str) -> Iterator[Callable[..., object]]:  # type: ignore[no-untyped-def]
    """Open ImageIndex objects on a fresh Lite file, sharing the loaded model; closes them all."""
    from pixfind.api import ImageIndex
    from pixfind.config import ModelSpec

    opened: list[ImageIndex] = []

    def open_index(uri: str | None = None, **kwargs: object) -> ImageIndex:
        kwargs.setdefault("model", ModelSpec(SMALL_MODEL, None))
        kwargs.setdefault("encoder", small_encoder)
        idx = ImageIndex(uri=uri or lite_uri, **kwargs)  # type: ignore[arg-type]
        opened.append(idx)
        return idx

    yield open_index
    for idx in opened:
        idx.close()


# -- Milvus server and the backend matrix -------------------------------------------------------


@pytest.fixture(scope="session")
def milvus_server() -> Iterator[MilvusServer]:
    """A Milvus 2.3.5 standalone with authentication, on 127.0.0.1 only, for the whole session.

    When it cannot start (``.ci/server-setup.sh`` not run, no network namespace...), every test
    using it errors with the reason: server tests never skip.
    """
    server = MilvusServer(auth=True).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Backend:
    """Where a test's collection lives: a Lite file, or a fresh collection on the server."""

    name: str
    uri: str
    token: str | None
    collection: str

    def store(self, **kwargs: object) -> Store:
        return Store(self.uri, token=self.token, collection=self.collection, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(params=["lite", pytest.param("server", marks=pytest.mark.server)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "lite":
        yield Backend("lite", str(tmp_path / "index.db"), None, "pixfind")
        return
    server: MilvusServer = request.getfixturevalue("milvus_server")
    chosen = Backend("server", server.uri, server.token, f"t_{uuid.uuid4().hex[:16]}")
    yield chosen
    with contextlib.suppress(Exception), chosen.store() as store:
        store.drop()


# -- order independence ---------------------------------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``PIXFIND_TEST_ORDER=reverse`` or ``shuffle:SEED`` reorders the tests inside each module
    (modules keep their order, so module fixtures are still built once): a test that passes only
    after another one has run shows up."""
    import random

    order = os.environ.get("PIXFIND_TEST_ORDER", "")
    if not order:
        return
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    rng = random.Random(order)
    for group in modules.values():
        if order == "reverse":
            group.reverse()
        elif order.startswith("shuffle:"):
            rng.shuffle(group)
        else:
            raise pytest.UsageError(f"PIXFIND_TEST_ORDER={order!r}: use reverse or shuffle:SEED")
    items[:] = [item for group in modules.values() for item in group]


# -- a Ray cluster on loopback ------------------------------------------------------------------


@pytest.fixture(scope="session")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRayCluster]:
    """Ray on 127.0.0.1: a head with no CPUs and three 1-CPU worker nodes, for the session.

    Tests that remove a node add one back (``add_worker``), so the next test finds three. Ray's
    folder is under the session's tmp folder when that path is short enough for Ray's sockets.
    """
    folder = tmp_path_factory.mktemp("ray")
    cluster = LocalRayCluster(folder=folder if len(str(folder)) <= MAX_FOLDER_CHARS else None).start()
    try:
        yield cluster
    finally:
        cluster.stop()


# -- no silent skips in CI -------------------------------------------------------------------------

#: Set by .ci/run: every collected test must run. A test that skips (no Chromium, no tmpfs, no
#: right to drop privileges...) fails instead, with its reason, so a green run means every claim
#: was checked. Outside CI, skips stay skips (listed with their reasons by scripts/test.sh).
NO_SKIPS = os.environ.get("PIXFIND_NO_SKIPS") == "1"


def _skip_reason(longrepr: object) -> str:
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped where every test must run (PIXFIND_NO_SKIPS=1): {_skip_reason(report.longrepr)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if NO_SKIPS and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped where every test must run (PIXFIND_NO_SKIPS=1): {_skip_reason(report.longrepr)}"
