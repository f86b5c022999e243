"""The figures README.md and docs/ promise, asserted as they are written there (tests/docs_figures.py
reads them from the documents): how fast an unreachable or silent Milvus fails, the pixel guard
just under and just over its limit, first frames of animated files, a server's write batches.
(The web server's limits are asserted on a live ``pixfind serve``: tests/test_serve_live.py.)"""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import docs_figures as docs
import numpy as np
import pytest
from conftest import draw_photo
from milvus_server import MilvusServer
from PIL import Image, ImageFile

from pixfind.config import ModelSpec
from pixfind.errors import StoreError
from pixfind.ingest.decode import ImageLoadError, load_image
from pixfind.store import Row, Store
from pixfind.store.policies import ServerPolicy


@pytest.fixture(autouse=True, scope="module")
def _pymilvus_imported() -> None:
    """Imported once before any clock starts: the figures are about waiting on the network."""
    import pymilvus  # noqa: F401


def seconds_to_fail(uri: str, token: str | None = None) -> tuple[float, str]:
    began = time.monotonic()
    with pytest.raises(StoreError) as caught:
        Store(uri, token=token)
    return time.monotonic() - began, str(caught.value)


# -- a Milvus that cannot be reached, or does not answer -----------------------------------------


@contextlib.contextmanager
def silent_address() -> Iterator[str]:
    """A TCP address that never answers a connection (a host that drops packets): a listener
    whose accept queue is full, so the kernel drops further SYNs."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        time.sleep(0.1)
        with pytest.raises(TimeoutError):  # the trap works on this kernel
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        yield f"http://127.0.0.1:{port}"


def test_a_silent_uri_fails_within_the_documented_time() -> None:
    with silent_address() as uri:
        elapsed, message = seconds_to_fail(uri)
    assert f"cannot reach Milvus at {uri}" in message
    assert elapsed <= docs.at_most(docs.unreachable_uri_s()), elapsed


def test_a_listener_that_never_answers_fails_in_about_the_documented_time() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        elapsed, message = seconds_to_fail(uri)
    assert f"Milvus at {uri}" in message and "no Milvus answer" in message, message
    assert elapsed <= docs.at_most(docs.not_milvus_s()), elapsed


class Relay:
    """A TCP relay in front of a Milvus server that the test can stall (bytes stop flowing, the
    connection stays up: a frozen server) or cut (connections closed, new ones refused: a server
    that went away)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.flowing = threading.Event()
        self.flowing.set()
        self.sockets: list[socket.socket] = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                return
            self.sockets += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                self.flowing.wait()
                dst.sendall(data)

    def stall(self) -> None:
        self.flowing.clear()

    def cut(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.flowing.set()


@pytest.fixture
def relayed(milvus_server: MilvusServer) -> Iterator[tuple[Relay, Store]]:
    """A Store talking to the test server through a :class:`Relay`, with a collection in use."""
    relay = Relay(int(milvus_server.uri.rsplit(":", 1)[1]))
    store = Store(relay.uri, token=milvus_server.token, collection=f"t_{uuid.uuid4().hex[:12]}")
    store.ensure(ModelSpec("ViT-S-32", None), 8)
    store.write([Row("/p/a.jpg", [1.0] + [0.0] * 7, 1, 1, 1, 1, "f")])
    assert store.count() == 1
    yield relay, store
    relay.cut()
    with Store(milvus_server.uri, token=milvus_server.token, collection=store.collection) as direct:
        direct.drop()


def seconds_until_a_call_fails(store: Store, limit: float) -> float | None:
    """How long ``store.count()`` takes to fail, or None if it had not failed after ``limit`` s
    (the call is then left to finish in its thread)."""
    outcome: dict[str, object] = {}

    def call() -> None:
        began = time.monotonic()
        try:
            store.count()
            outcome["error"] = None
        except StoreError as exc:
            outcome["error"] = str(exc)
        outcome["seconds"] = time.monotonic() - began

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        return None
    assert outcome["error"], "the call succeeded against a server that stopped answering"
    assert "\n" not in str(outcome["error"])
    return float(outcome["seconds"])  # type: ignore[arg-type]


@pytest.mark.server
def test_a_server_that_goes_away_fails_in_about_the_documented_time(relayed) -> None:  # type: ignore[no-untyped-def]
    relay, store = relayed
    relay.cut()
    bound = docs.about(docs.stopped_server_s())
    elapsed = seconds_until_a_call_fails(store, bound + 10)
    assert elapsed is not None and elapsed <= bound, elapsed


@pytest.mark.server
def test_a_server_that_stalls_fails_within_the_documented_time(relayed) -> None:  # type: ignore[no-untyped-def]
    relay, store = relayed
    relay.stall()
    bound = docs.at_most(docs.stalled_server_s())
    try:
        elapsed = seconds_until_a_call_fails(store, bound + 2)
    finally:
        relay.cut()  # lets a call still waiting fail now, not minutes later
    assert elapsed is not None and elapsed <= bound, f"still waiting after {bound + 2:.1f} s"


# -- the pixel guard, just under and just over ----------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + idat + _png_chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    draw_photo(1, (64, 48)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def load_outcome(path: Path, min_side: int | None) -> str:
    try:
        loaded = load_image(path, min_side=min_side)
    except ImageLoadError as exc:
        return exc.reason
    return f"decoded {loaded.width}x{loaded.height}"


@pytest.mark.parametrize(
    ("make", "min_sides"),
    [(png_claiming, (None, 336)), (jpeg_claiming, (336,))],  # a full 180 MP JPEG decode: 540 MB
    ids=["png", "jpeg"],
)
def test_the_pixel_guard_refuses_just_over_the_documented_limit(make, min_sides, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """README: images over N megapixels are refused. A header claiming exactly N MP passes the
    guard (a PNG's missing data is then "truncated", a JPEG decodes at reduced size); one pixel
    row more is refused, with or without reduced-size decoding."""
    limit = docs.max_megapixels() * 1_000_000
    width = 15_000
    height = limit // width
    assert width * height == limit
    at_limit, over = tmp_path / "at-limit", tmp_path / "over"
    at_limit.write_bytes(make(width, height))
    over.write_bytes(make(width, height + 1))  # 15,000 px over the limit
    for min_side in min_sides:
        assert "too large" not in load_outcome(at_limit, min_side)
        expected = f"too large: {width}x{height + 1} px (limit {docs.max_megapixels()} MP)"
        assert load_outcome(over, min_side) == expected
    assert load_outcome(over, None) == expected


def test_the_pixel_guard_refuses_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/reliability.md: "refused before decoding": no pixel data is read for a file over the limit (225 MP:
    over pixfind's limit, under the one Pillow itself enforces when a file is opened)."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(15_000, 15_000))

    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for min_side in (None, 336):
        assert load_outcome(path, min_side) == f"too large: 15000x15000 px (limit {docs.max_megapixels()} MP)"


# -- animated files: the first frame --------------------------------------------------------------

SAVE_OPTIONS = {"GIF": {"duration": 50, "loop": 0}, "WebP": {"duration": 50, "lossless": True}, "TIFF": {}}


@pytest.mark.parametrize("fmt", docs.animated_formats())
def test_animated_files_stand_for_their_first_frame(fmt: str, tmp_path: Path) -> None:
    frames = [draw_photo(seed, (64, 48)) for seed in (10, 11, 12)]
    if fmt == "GIF":
        frames = [frame.quantize(256).convert("RGB") for frame in frames]
    path = tmp_path / f"animated.{fmt.lower()}"
    frames[0].save(path, format=fmt.upper(), save_all=True, append_images=frames[1:], **SAVE_OPTIONS[fmt])
    with Image.open(path) as img:
        assert getattr(img, "n_frames", 1) == 3, "the test file is not animated"
    got = np.asarray(load_image(path).image, dtype=int)
    difference = [np.abs(got - np.asarray(frame, dtype=int)).mean() for frame in frames]
    assert difference[0] < 2 and min(difference[1:]) > 20, difference


def bytes_read_by_this_process() -> int:
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


def test_the_frames_of_a_long_animation_are_not_walked(tmp_path: Path) -> None:
    """docs/reliability.md: "(first frame; the frames are not walked)": measured in bytes read,
    not in time (a 401-frame, 16 MB GIF)."""
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (200, 200), dtype=np.uint8)).convert("P") for _ in range(4)]
    path = tmp_path / "long.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:] * 100, duration=10)
    size = path.stat().st_size
    before = bytes_read_by_this_process()
    load_image(path, min_side=224)
    read = bytes_read_by_this_process() - before
    assert read < size / 20, f"read {read:,} of {size:,} bytes"


# -- a Milvus server's write batches ---------------------------------------------------------------


def test_server_writes_are_split_as_documented() -> None:
    """README: "Writes go in batches of at most 5,000 rows / 16 MiB" (vectors and keys counted)."""
    max_rows, max_bytes = docs.server_write_limits()
    for rows in (
        [Row("/" + "k" * 8000 + str(i), [0.0] * 512, 1, 1, 1, 1, "f") for i in range(5000)],  # long keys
        [Row(f"/{i}", [0.0] * 512, 1, 1, 1, 1, "f") for i in range(12_000)],  # many rows
    ):
        batches = list(ServerPolicy.write_batches(rows))
        assert [row for batch in batches for row in batch] == rows  # all, in order, once
        assert all(0 < len(batch) <= max_rows for batch in batches)
        assert all(sum(4 * len(r.vector) + len(r.key) for r in batch) <= max_bytes for batch in batches)


@pytest.mark.server
def test_a_write_larger_than_the_servers_message_limit_is_stored(milvus_server: MilvusServer) -> None:
    """README: batches stay "under the server's 64 MiB gRPC limit": one write of 80 MB (5,000 rows
    of 8 KB keys and 2,048-d vectors: over the limit even at the row cap) stores every row."""
    dim = 2048
    rows = [Row(f"/{i:06d}/" + "k" * 8000, [1.0] + [0.0] * (dim - 1), 1, 1, 1, 1, "f") for i in range(5000)]
    assert sum(4 * len(r.vector) + len(r.key) for r in rows) > 64 << 20
    with Store(milvus_server.uri, token=milvus_server.token, collection=f"t_{uuid.uuid4().hex[:12]}") as store:
        try:
            store.ensure(ModelSpec("ViT-B-32", "openai"), dim)
            store.write(rows)
            store.flush()
            assert store.count() == len(rows)
        finally:
            store.drop()
