"""A real ``pixfind serve`` process, as a user starts it (no ``--host``), checked from outside:
where it listens, which Host names it answers, and the limits docs/web.md promises (read from
the document: tests/docs_figures.py). A path removed from the index is refused at once."""

from __future__ import annotations

import http.client
import io
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docs_figures as docs
import httpx
import pytest
from conftest import SMALL_MODEL, cli_env
from PIL import Image
from web_support import make_gallery

from pixfind.config import ModelSpec


class ServeProcess:
    """``pixfind serve ARGS --port 0`` in a child process; ``url`` once it says where it is."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        command = [sys.executable, "-m", "pixfind", "serve", *args, "--port", "0"]
        self.process = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        found = threading.Event()
        self.url = ""

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.lines.append(line)
                match = re.search(r"(http://[^\s/]+:\d+/)", line)
                if match and not self.url:
                    self.url = match.group(1)
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(300) or not self.url:
            self.stop()
            raise AssertionError(f"pixfind serve did not start:\n{self.output}")
        self.port = int(self.url.rsplit(":", 1)[1].strip("/"))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=120, **kwargs)  # type: ignore[arg-type]

    def post(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.post(f"http://127.0.0.1:{self.port}{path}", timeout=120, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def build_index(small_encoder, folder: Path, uri: str, token: str | None = None, collection: str = "pixfind") -> None:  # type: ignore[no-untyped-def]
    from pixfind.api import ImageIndex

    with ImageIndex(
        uri=uri, token=token, collection=collection, model=ModelSpec(SMALL_MODEL, None), encoder=small_encoder
    ) as index:
        index.add(str(folder))


@pytest.fixture(scope="module")
def served(small_encoder, onnx_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:  # type: ignore[no-untyped-def]
    """`pixfind serve --uri DB` (default host) on a small Lite index, default CPU backend."""
    root = tmp_path_factory.mktemp("live")
    make_gallery(root / "pictures", count=4)
    db = root / "index.db"
    build_index(small_encoder, root / "pictures", str(db))
    server = ServeProcess(["--uri", str(db)], cli_env(onnx_cache), root)
    yield server
    server.stop()
    assert "Traceback" not in server.output, server.output


# -- where it listens, whom it answers ------------------------------------------------------------


def listening_addresses(pid: int) -> set[str]:
    """host:port (hex, as /proc shows them) of the TCP sockets ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                found.add(fields[1])
    return found


def test_default_bind_address_is_loopback(served: ServeProcess) -> None:
    host = docs.default_host()
    assert served.url == f"http://{host}:{served.port}/"
    loopback_hex = "".join(f"{int(part):02X}" for part in reversed(host.split(".")))
    assert listening_addresses(served.process.pid) == {f"{loopback_hex}:{served.port:04X}"}


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "192.168.1.10:{port}", "127.0.0.1.nip.io"])
def test_a_foreign_host_name_is_refused(served: ServeProcess, host: str) -> None:
    """DNS rebinding: a page elsewhere resolving its own name to 127.0.0.1 gets nothing."""
    for path in ("/", "/api/info", "/api/search?q=sky"):
        response = served.get(path, headers={"Host": host.format(port=served.port)})
        assert response.status_code == 400, (host, path, response.status_code)
        assert "/api/" not in response.text and "pictures" not in response.text


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "localhost"])
def test_loopback_host_names_are_answered(served: ServeProcess, host: str) -> None:
    response = served.get("/api/info", headers={"Host": host.format(port=served.port)})
    assert response.status_code == 200 and response.json()["images"] == 5


# -- the documented limits -----------------------------------------------------------------------


def test_k_is_bounded_as_documented(served: ServeProcess) -> None:
    low, high = docs.k_range()
    for k in (low, high):
        response = served.get("/api/search", params={"q": "sky", "k": k})
        assert response.status_code == 200, (k, response.text)
        assert len(response.json()) == min(k, 5)
    for k in (low - 1, high + 1):
        response = served.get("/api/search", params={"q": "sky", "k": k})
        assert response.status_code == 400, (k, response.text)
        assert "k" in response.json()["detail"]


def test_query_length_is_bounded_as_documented(served: ServeProcess) -> None:
    limit = docs.max_query_chars()
    assert served.get("/api/search", params={"q": "a" * limit}).status_code == 200
    response = served.get("/api/search", params={"q": "a" * (limit + 1)})
    assert response.status_code == 400 and "too long" in response.json()["detail"]


def jpeg_of_size(size: int) -> bytes:
    """A valid JPEG of exactly ``size`` bytes (padding after its end marker, which decoders skip)."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 120, 200)).save(buffer, "JPEG")
    data = buffer.getvalue()
    return data + b"\0" * (size - len(data))


def declare_upload(server: ServeProcess, size: int) -> tuple[int, str]:
    """Announce an upload of ``size`` bytes (headers only, no body yet): the answer."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    try:
        connection.putrequest("POST", "/api/search/image")
        connection.putheader("Content-Type", "multipart/form-data; boundary=b")
        connection.putheader("Content-Length", str(size))
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_upload_size_is_bounded_as_documented(served: ServeProcess) -> None:
    """README: uploads up to N MiB, the file itself. A file of exactly N MiB is searched; a
    request declaring far more than N MiB is refused with a 413 as soon as its Content-Length is
    seen."""
    limit_mib = docs.upload_limit_mib()
    exactly = jpeg_of_size(limit_mib << 20)
    response = served.post("/api/search/image", files={"file": ("q.jpg", exactly, "image/jpeg")})
    assert response.status_code == 200, response.text
    status, body = declare_upload(served, (limit_mib + 1) << 20)
    assert status == 413 and f"{limit_mib} MiB" in body, (status, body)


def test_an_upload_over_the_limit_sent_whole_gets_its_413(served: ServeProcess) -> None:
    limit_mib = docs.upload_limit_mib()
    over = jpeg_of_size((limit_mib << 20) + 1)

    def chunked():  # no Content-Length: counted as it arrives
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="q.jpg"\r\n\r\n'
        for start in range(0, len(over), 1 << 20):
            yield over[start : start + (1 << 20)]
        yield b"\r\n--b--\r\n"

    for _ in range(5):  # the answer is lost to a reset most of the time, not always
        response = served.post("/api/search/image", files={"file": ("q.jpg", over, "image/jpeg")})
        assert response.status_code == 413 and f"{limit_mib} MiB" in response.json()["detail"]
        response = served.post(
            "/api/search/image", content=chunked(), headers={"Content-Type": "multipart/form-data; boundary=b"}
        )
        assert response.status_code == 413


# -- a path removed from the index -----------------------------------------------------------------


@pytest.mark.server
def test_a_path_removed_from_the_index_is_refused_at_once(
    small_encoder, milvus_server, onnx_cache: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """On a Milvus server another process can remove a row while `pixfind serve` runs: its file is
    no longer served (404), although the file is still on disk and was just shown as a hit."""
    from pixfind.pathkeys import key_of
    from pixfind.store import Store

    collection = f"live_{uuid.uuid4().hex[:12]}"
    target = ["--uri", milvus_server.uri, "--token", str(milvus_server.token), "--collection", collection]
    make_gallery(tmp_path / "pictures", count=4)
    build_index(small_encoder, tmp_path / "pictures", milvus_server.uri, milvus_server.token, collection)
    server = ServeProcess(target, cli_env(onnx_cache), tmp_path)
    try:
        hit = server.get("/api/search", params={"q": "sky", "k": 1}).json()[0]
        assert server.get(hit["image"]).status_code == 200
        assert server.get(hit["thumb"]).status_code == 200
        with Store(milvus_server.uri, token=milvus_server.token, collection=collection) as store:
            assert store.delete([key_of(hit["path"])]) == 1
        assert Path(hit["path"]).is_file()
        deadline = time.monotonic() + 2.0  # a server shows another client's delete within its time tick
        while True:
            codes = [server.get(hit[kind]).status_code for kind in ("image", "thumb", "similar")]
            if codes == [404, 404, 404] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert codes == [404, 404, 404], codes
    finally:
        server.stop()
        with Store(milvus_server.uri, token=milvus_server.token, collection=collection) as store:
            store.drop()
