"""The web API through FastAPI's test client: real Milvus Lite, random-weight open_clip model."""

from __future__ import annotations

import io
import itertools
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest
from PIL import Image

try:
    from docs_figures import readme_limits
    from web_support import make_gallery, open_test_index
except ImportError:  # tests/ is a package
    from tests.docs_figures import readme_limits
    from tests.web_support import make_gallery, open_test_index

from fastapi.testclient import TestClient

from pixfind.pathkeys import key_of
from pixfind.web.app import create_app
from pixfind.web.paths import clean_path, path_query
from pixfind.web.service import Limits

HIT_KEYS = {
    *("rank", "score", "path", "width", "height", "size", "thumb", "image", "similar", "copies", "copy_paths"),
    *("taken", "taken_from", "camera", "type"),
}


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("web") / "pictures"
    make_gallery(root, count=9)
    return root


@pytest.fixture(scope="module")
def index(gallery: Path):
    idx = open_test_index(gallery.parent / "index.db", gallery)
    yield idx
    idx.close()


@pytest.fixture(scope="module")
def client(index, gallery: Path):
    app = create_app(index, gallery.parent / "thumbs", limits=Limits(max_upload_bytes=2 * 1024 * 1024))
    with TestClient(app) as test_client:
        yield test_client


def indexed(gallery: Path) -> list[Path]:
    return sorted(p for p in gallery.rglob("*") if p.is_file())


def jpeg_bytes(size=(64, 48), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


# -- search -------------------------------------------------------------------------------------


def test_text_search_returns_cli_shaped_hits_with_urls(client: TestClient, gallery: Path) -> None:
    response = client.get("/api/search", params={"q": "a sunset over the sea", "k": 5})
    assert response.status_code == 200, response.text
    hits = response.json()
    assert len(hits) == 5
    assert [hit["rank"] for hit in hits] == [1, 2, 3, 4, 5]
    assert set(hits[0]) == HIT_KEYS
    scores = [hit["score"] for hit in hits]
    assert scores == sorted(scores, reverse=True)
    files = {str(p) for p in indexed(gallery)}
    for hit in hits:
        assert hit["path"] in files
        assert hit["width"] > 0 and hit["height"] > 0
        assert hit["size"] == os.path.getsize(hit["path"])
        assert hit["thumb"].startswith("/api/thumb?path=")
        assert hit["image"].startswith("/api/image?path=")
    assert "search;dur=" in response.headers["server-timing"]


def test_default_k_is_ten_and_k_is_bounded(client: TestClient) -> None:
    assert len(client.get("/api/search", params={"q": "flowers"}).json()) == 10
    for bad in ("0", "1001", "many"):
        response = client.get("/api/search", params={"q": "flowers", "k": bad})
        assert response.status_code == 400
        assert response.json()["detail"].startswith("bad request: k:")


def test_query_text_is_required_and_limited(client: TestClient) -> None:
    assert client.get("/api/search").status_code == 400
    response = client.get("/api/search", params={"q": "   "})
    assert response.status_code == 400
    assert "empty query" in response.json()["detail"]
    response = client.get("/api/search", params={"q": "dog " * 300})
    assert response.status_code == 400
    assert "too long" in response.json()["detail"]


def test_one_set_of_limits_the_readme_states(client: TestClient, capsys: pytest.CaptureFixture[str]) -> None:
    """CLI, API and page share the README's limits: a query the CLI takes is one the server takes
    (the CLI forwards queries to a running server)."""
    from pixfind.cli import main
    from pixfind.errors import PixfindError
    from pixfind.limits import check_limit, check_query

    limits = readme_limits()
    longest, most = "a" * limits["query_chars"], limits["results"]
    assert client.get("/api/search", params={"q": longest, "k": most}).status_code == 200
    too_long = client.get("/api/search", params={"q": longest + "a"})
    assert too_long.status_code == 400 and f"limit {limits['query_chars']:,}" in too_long.json()["detail"]
    too_many = client.get("/api/search", params={"q": "a", "k": most + 1})
    assert too_many.status_code == 400 and f"between 1 and {most:,}" in too_many.json()["detail"]
    # the same refusal, in the same words, as the command line and the Python API give
    with pytest.raises(PixfindError) as refused:
        check_query(longest + "a")
    assert too_long.json()["detail"] == str(refused.value)
    with pytest.raises(PixfindError) as refused:
        check_limit(most + 1)
    assert too_many.json()["detail"] == f"bad request: k: {refused.value}"
    server = client.get("/api/info").json()["server"]
    assert (server["max_query_chars"], server["max_results"]) == (limits["query_chars"], most)

    assert check_query(longest) == longest and check_limit(most) == most
    with pytest.raises(PixfindError, match=f"limit {limits['query_chars']:,}"):
        check_query(longest + "a")
    assert main(["search", "a dog", "-k", str(most + 1)]) == 2
    assert str(most) in capsys.readouterr().err
    page = client.get("/").text
    assert f'maxlength="{limits["query_chars"]}"' in page


def test_folder_filter(client: TestClient, gallery: Path) -> None:
    garden = gallery / "garden"
    hits = client.get("/api/search", params={"q": "flowers", "k": 50, "under": str(garden)}).json()
    assert hits and all(hit["path"].startswith(str(garden) + "/") for hit in hits)
    assert len(hits) == sum(1 for p in garden.iterdir())
    # a sibling whose name starts the same is not "under" it
    assert client.get("/api/search", params={"q": "x", "under": str(gallery / "gard")}).json() == []
    response = client.get("/api/search", params={"q": "x", "under": "relative/folder"})
    assert response.status_code == 400
    assert "absolute path" in response.json()["detail"]


def test_similar_leaves_the_image_itself_out(client: TestClient, gallery: Path) -> None:
    target = str(gallery / "trips" / "landscape_04.jpg")
    response = client.get("/api/similar", params={"path": target, "k": 3})
    assert response.status_code == 200, response.text
    hits = response.json()
    assert len(hits) == 3 and target not in [hit["path"] for hit in hits]


def test_similar_url_of_a_hit_works(client: TestClient) -> None:
    hit = client.get("/api/search", params={"q": "hills", "k": 1}).json()[0]
    hits = client.get(hit["similar"] + "&k=2").json()
    assert len(hits) == 2 and hit["path"] not in [other["path"] for other in hits]


def test_similar_refuses_paths_outside_the_index(client: TestClient, gallery: Path) -> None:
    outside = gallery.parent / "elsewhere.jpg"
    outside.write_bytes(jpeg_bytes())
    for path in (str(outside), "/etc/passwd", "trips/landscape_00.jpg", ""):
        response = client.get("/api/similar", params={"path": path})
        assert response.status_code == 404, path


def test_info(client: TestClient, gallery: Path) -> None:
    response = client.get("/api/info")
    assert response.status_code == 200
    info = response.json()
    assert info["images"] == len(indexed(gallery))  # what the module indexed: no test adds to it
    assert info["model"] == "ViT-S-32"
    assert info["server"]["max_results"] == 1000
    assert info["server"]["max_upload_bytes"] == 2 * 1024 * 1024


# -- search by upload -------------------------------------------------------------------------------


def test_upload_search_finds_the_same_picture_first(client: TestClient, gallery: Path) -> None:
    target = gallery / "garden" / "flowers_05.jpg"
    with target.open("rb") as fh:
        response = client.post("/api/search/image", files={"file": ("q.jpg", fh, "image/jpeg")}, params={"k": 4})
    assert response.status_code == 200, response.text
    hits = response.json()
    assert len(hits) == 4
    assert hits[0]["path"] == str(target)
    assert hits[0]["score"] > 0.99


def test_upload_of_png_with_alpha_works(client: TestClient) -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (50, 50), (0, 128, 255, 100)).save(buffer, "PNG")
    response = client.post("/api/search/image", files={"file": ("a.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 200
    assert len(response.json()) == 10


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty"),
        (b"hello, I am not a picture", "not an image"),
        (jpeg_bytes((400, 300))[:700], "truncated"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a usable image"),
    ],
    ids=["empty", "text", "truncated-jpeg", "broken-png"],
)
def test_bad_uploads_get_a_400_with_the_reason(client: TestClient, payload: bytes, reason: str) -> None:
    response = client.post("/api/search/image", files={"file": ("x.jpg", payload, "image/jpeg")})
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert detail.startswith("not a usable image")
    assert reason in detail


def test_upload_without_a_file_is_a_400(client: TestClient) -> None:
    response = client.post("/api/search/image", data={"nothing": "here"})
    assert response.status_code == 400
    assert "file" in response.json()["detail"]


def test_upload_over_the_limit_is_refused(client: TestClient) -> None:
    big = os.urandom(3 * 1024 * 1024)
    response = client.post("/api/search/image", files={"file": ("big.jpg", big, "image/jpeg")})
    assert response.status_code == 413
    assert "limit is 2 MiB" in response.json()["detail"]


def test_chunked_upload_over_the_limit_is_refused(client: TestClient) -> None:
    boundary = "pixfindboundary"

    def body():
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        for _ in range(40):
            yield b"\xff" * (100 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/api/search/image",
        content=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 413


def test_decompression_bomb_upload_is_a_400(client: TestClient) -> None:
    buffer = io.BytesIO()
    Image.new("1", (20000, 10000)).save(buffer, "PNG")  # 200 MP, a few KB on disk
    response = client.post("/api/search/image", files={"file": ("bomb.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 400
    assert "too large" in response.json()["detail"]


# -- thumbnails and images ---------------------------------------------------------------------------


def test_thumbnail_is_a_small_cached_jpeg(client: TestClient, gallery: Path) -> None:
    hit = client.get("/api/search", params={"q": "meadow", "k": 1}).json()[0]
    response = client.get(hit["thumb"])
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert "immutable" in response.headers["cache-control"]
    thumb = Image.open(io.BytesIO(response.content))
    assert max(thumb.size) == 256
    assert thumb.size[0] / thumb.size[1] == pytest.approx(hit["width"] / hit["height"], rel=0.02)
    cached = list((gallery.parent / "thumbs").rglob("*.jpg"))
    assert cached
    again = client.get(hit["thumb"], headers={"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304
    # without the version in the URL: must revalidate
    plain = client.get("/api/thumb", params={"path": hit["path"]})
    assert plain.status_code == 200 and plain.headers["cache-control"] == "no-cache"


def test_changed_file_is_served_again_once_reindexed(client: TestClient, gallery: Path, index) -> None:
    """A file changed after indexing is not what the index describes: 404 until an index run has
    seen it, then served with a new ETag and a new thumbnail."""
    path = gallery / "trips" / "landscape_00.jpg"
    first = client.get("/api/thumb", params={"path": str(path)})
    assert first.status_code == 200
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    for endpoint in ("/api/thumb", "/api/image"):
        stale = client.get(endpoint, params={"path": str(path)})
        assert stale.status_code == 404
        assert "changed since it was indexed" in stale.json()["detail"]
    with client.app.state.pixfind.lock:
        index.add(str(gallery))
    second = client.get("/api/thumb", params={"path": str(path)})
    assert second.status_code == 200
    assert first.headers["etag"] != second.headers["etag"]
    assert len({p.name for p in (gallery.parent / "thumbs").rglob("*.jpg")}) >= 2


def test_full_image_is_streamed_unchanged(client: TestClient, gallery: Path) -> None:
    path = gallery / "garden" / "sunset_card.png"
    response = client.get("/api/image", params={"path": str(path)})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content == path.read_bytes()
    assert response.headers["x-content-type-options"] == "nosniff"
    partial = client.get("/api/image", params={"path": str(path)}, headers={"Range": "bytes=0-7"})
    assert partial.status_code == 206
    assert partial.content == path.read_bytes()[:8]


# -- security -----------------------------------------------------------------------------------------


def test_paths_outside_the_index_are_404(client: TestClient, gallery: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg_bytes())
    good = gallery / "trips" / "landscape_01.jpg"
    attempts = [
        str(secret),  # an image, but not indexed
        "/etc/passwd",
        f"{gallery}/trips/../../../../etc/passwd",
        f"{gallery}/trips/../trips/landscape_01.jpg",  # indexed file, but spelled with ..
        f"{gallery}/./trips/landscape_01.jpg",
        f"{gallery}//trips/landscape_01.jpg",
        "trips/landscape_01.jpg",  # relative
        "../" * 8 + "etc/passwd",
        str(good) + "\x00.jpg",
        str(gallery),  # a folder
        "",
    ]
    for endpoint in ("/api/image", "/api/thumb"):
        for path in attempts:
            response = client.get(endpoint, params={"path": path})
            assert response.status_code == 404, (endpoint, path)
            assert "not found" in response.json()["detail"]
    # percent-encoded traversal in the raw query string
    encoded = quote(f"{gallery}/trips/../../../etc/passwd", safe="")
    assert client.get(f"/api/image?path={encoded}").status_code == 404
    assert client.get(f"/api/image?path={path_query(str(good))}").status_code == 200


def test_symlink_escapes_are_404(client: TestClient, gallery: Path, tmp_path: Path) -> None:
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "diary.jpg").write_bytes(jpeg_bytes())
    (outside / "notes.txt").write_text("secret")
    # links created after indexing: not in the index
    (gallery / "trips" / "escape.jpg").symlink_to(outside / "diary.jpg")
    (gallery / "linkdir").symlink_to(outside, target_is_directory=True)
    try:
        for path in (gallery / "trips" / "escape.jpg", gallery / "linkdir" / "diary.jpg"):
            assert client.get("/api/image", params={"path": str(path)}).status_code == 404
        # an indexed file swapped for a link to a non-image: not served either
        victim = gallery / "trips" / "landscape_07.jpg"
        backup = tmp_path / "backup.jpg"
        shutil.move(victim, backup)
        victim.symlink_to(outside / "notes.txt")
        try:
            assert client.get("/api/image", params={"path": str(victim)}).status_code == 404
            assert client.get("/api/thumb", params={"path": str(victim)}).status_code == 404
        finally:
            victim.unlink()
            shutil.move(backup, victim)
    finally:
        (gallery / "trips" / "escape.jpg").unlink()
        (gallery / "linkdir").unlink()


def test_deleted_file_is_404_not_500(client: TestClient, gallery: Path, tmp_path: Path) -> None:
    path = gallery / "trips" / "landscape_06.jpg"
    backup = tmp_path / "b.jpg"
    shutil.move(path, backup)
    try:
        assert client.get("/api/image", params={"path": str(path)}).status_code == 404
        assert client.get("/api/thumb", params={"path": str(path)}).status_code == 404
    finally:
        shutil.move(backup, path)


def test_clean_path_rules() -> None:
    assert clean_path("/a/b.jpg") == "/a/b.jpg"
    for bad in (
        "",
        "a/b.jpg",
        "/a/../b.jpg",
        "/a/./b.jpg",
        "/a//b.jpg",
        "//a/b.jpg",
        "/a/b/",
        "/a\x00b",
        "/" + "x" * 5000,
    ):
        assert clean_path(bad) is None, bad


@pytest.fixture
def own_index(small_encoder, tmp_path: Path):  # type: ignore[no-untyped-def]
    """An index of the test's own, for tests that add images (the module's index stays as built)."""
    from pixfind.api import ImageIndex
    from pixfind.config import ModelSpec

    with ImageIndex(uri=str(tmp_path / "own.db"), model=ModelSpec("ViT-S-32", None), encoder=small_encoder) as idx:
        yield idx


def test_non_utf8_file_names_round_trip(own_index, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A file name that is not UTF-8 keeps its exact bytes through JSON and the URLs."""
    folder = tmp_path / os.fsdecode(b"odd \xff folder")
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9 'quote' %_.jpg")  # latin-1 byte, quote, like-wildcards
    Image.new("RGB", (80, 60), (10, 200, 90)).save(folder / name, "JPEG")
    index = own_index
    index.add(str(folder))
    app = create_app(index, tmp_path / "thumbs")
    with TestClient(app) as local:
        hits = local.get(f"/api/search?q=green&k=3&under={path_query(str(folder))}").json()
        assert len(hits) == 1
        assert hits[0]["path"] == str(folder / name)
        assert local.get(hits[0]["image"]).content == (folder / name).read_bytes()
        assert local.get(hits[0]["thumb"]).status_code == 200
        like = local.get(hits[0]["similar"])
        assert like.status_code == 200 and str(folder / name) not in [hit["path"] for hit in like.json()]


def test_host_check_when_bound_to_loopback(index, tmp_path: Path) -> None:
    app = create_app(index, tmp_path / "thumbs", allowed_hosts=["127.0.0.1", "localhost"])
    with TestClient(app, base_url="http://127.0.0.1:8000") as local:
        assert local.get("/api/info").status_code == 200
        assert local.get("/api/info", headers={"Host": "evil.example:8000"}).status_code == 400


# -- the page ------------------------------------------------------------------------------------------


def test_page_and_static_files_need_nothing_external(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/dom.js", "/static/app.js", "/static/library.js", "/static/style.css", "/static/favicon.svg"):
        response = client.get(asset)
        assert response.status_code == 200, asset
        text = response.text
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
    assert "https://" not in page.text and "http://" not in page.text
    assert client.get("/favicon.ico", follow_redirects=False).status_code == 308


def test_openapi_documents_the_api(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/search", "/api/search/image", "/api/similar", "/api/info"):
        assert path in paths
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "/static/swagger-ui-bundle.js" in docs.text and "cdn" not in docs.text.lower()
    assert client.get("/static/swagger-ui-bundle.js").status_code == 200
    assert client.get("/redoc").status_code == 404  # ReDoc would need a CDN


def test_the_server_reports_the_installed_version(client: TestClient) -> None:
    """The version the API states is the installed distribution's, as ``pixfind --version`` prints."""
    from importlib.metadata import version

    assert client.get("/api/info").json()["server"]["version"] == version("pixfind")
    assert client.get("/openapi.json").json()["info"]["version"] == version("pixfind")


# -- concurrency -----------------------------------------------------------------------------------------


def test_concurrent_searches(client: TestClient, gallery: Path) -> None:
    target = str(gallery / "trips" / "landscape_04.jpg")
    upload = (gallery / "garden" / "flowers_02.jpg").read_bytes()

    def one(i: int) -> tuple[int, int]:
        kind = i % 4
        if kind == 0:
            response = client.get("/api/search", params={"q": f"picture number {i}", "k": 5})
        elif kind == 1:
            response = client.get("/api/similar", params={"path": target, "k": 5})
        elif kind == 2:
            response = client.post(
                "/api/search/image", files={"file": ("q.jpg", upload, "image/jpeg")}, params={"k": 5}
            )
        else:
            hit = client.get("/api/search", params={"q": "sky", "k": 1}).json()[0]
            response = client.get(hit["thumb"])
            return response.status_code, 5
        return response.status_code, len(response.json())

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(32)))
    assert results == [(200, 5)] * 32


def test_new_images_appear_once_indexed(own_index, gallery: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Searches running while images are added in the same process: no errors, new ones found."""
    index = own_index
    index.add(str(gallery / "garden"))
    folder = tmp_path / "new"
    folder.mkdir()
    image = Image.new("RGB", (120, 90), (250, 250, 0))
    image.save(folder / "fresh.jpg", "JPEG")
    app = create_app(index, tmp_path / "thumbs")
    with TestClient(app) as local, ThreadPoolExecutor(max_workers=4) as pool:
        service = app.state.pixfind
        searches = [pool.submit(local.get, "/api/search", params={"q": "yellow", "k": 3}) for _ in range(8)]
        with service.lock:  # how an in-process writer would share the index with the server
            index.add(str(folder))
        searches += [pool.submit(local.get, "/api/search", params={"q": "yellow", "k": 3}) for _ in range(8)]
        assert all(f.result().status_code == 200 for f in searches)
        hits = local.get("/api/search", params={"q": "yellow", "under": str(folder)}).json()
        assert [hit["path"] for hit in hits] == [str(folder / "fresh.jpg")]


# -- empty index, startup ----------------------------------------------------------------------------------


def test_empty_index_answers_with_a_clear_message(tmp_path: Path) -> None:
    empty = open_test_index(tmp_path / "empty.db")
    try:
        with TestClient(create_app(empty, tmp_path / "thumbs")) as local:
            response = local.get("/api/search", params={"q": "anything"})
            assert response.status_code == 409
            assert "pixfind index" in response.json()["detail"]
            info = local.get("/api/info").json()
            assert info["images"] == 0
            assert local.get("/").status_code == 200
    finally:
        empty.close()


def test_port_in_use_is_one_clear_error() -> None:
    from pixfind.errors import PixfindError
    from pixfind.web.server import bind_socket

    first = bind_socket("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        with pytest.raises(PixfindError, match=f"cannot listen on 127.0.0.1:{port}.*--port"):
            bind_socket("127.0.0.1", port)
    finally:
        first.close()


# -- trust: only what the index describes is served -----------------------------------------------


@pytest.fixture
def linked_photo(client: TestClient, index, tmp_path: Path):
    """An indexed name that is a symbolic link to an image (as a scan stores one), and a private
    image and text file next to nothing indexed: what a local attacker would point the link at."""
    folder = tmp_path / "shared"
    folder.mkdir()
    real = folder / "real.jpg"
    Image.new("RGB", (320, 240), (20, 90, 220)).save(real, "JPEG")  # blue
    link = folder / "photo.jpg"
    link.symlink_to(real)
    private = tmp_path / "private"
    private.mkdir()
    secret_image = private / "secret.jpg"
    Image.new("RGB", (320, 240), (250, 0, 0)).save(secret_image, "JPEG")  # red
    secret_text = private / "diary.txt"
    secret_text.write_bytes(b"SECRET DIARY " * (real.stat().st_size // 13 + 1))
    with client.app.state.pixfind.lock:
        index.add(str(folder))
    yield link, real, secret_image, secret_text
    with client.app.state.pixfind.lock:
        index.store.delete([key_of(str(real)), key_of(str(link))])


def is_red(jpeg: bytes) -> bool:
    with Image.open(io.BytesIO(jpeg)) as thumb:
        r, g, b = thumb.convert("RGB").resize((1, 1)).getpixel((0, 0))
    return r > 180 and g < 80 and b < 80


def test_indexed_name_swapped_for_a_link_to_another_image_is_404(client: TestClient, linked_photo) -> None:
    link, real, secret_image, _ = linked_photo
    assert client.get("/api/image", params={"path": str(link)}).content == real.read_bytes()
    link.unlink()
    link.symlink_to(secret_image)  # an image, readable by the server, never indexed
    for endpoint in ("/api/image", "/api/thumb"):
        response = client.get(endpoint, params={"path": str(link)})
        assert response.status_code == 404, endpoint
        assert "changed since it was indexed" in response.json()["detail"]


def test_a_file_made_to_look_like_the_indexed_one_is_404(client: TestClient, linked_photo) -> None:
    """Size and mtime can be copied (anyone who can stat a file can give their own file its
    size and mtime before it is indexed); the content's fingerprint cannot."""
    link, real, _, _ = linked_photo
    lookalike = real.with_name("lookalike.jpg")
    data = bytearray(real.read_bytes())
    data[-3] ^= 0xFF  # same size, other bytes near the end
    lookalike.write_bytes(bytes(data))
    stat = real.stat()
    os.utime(lookalike, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (lookalike.stat().st_size, lookalike.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    link.unlink()
    link.symlink_to(lookalike)
    for endpoint in ("/api/image", "/api/thumb"):
        response = client.get(endpoint, params={"path": str(link)})
        assert response.status_code == 404, endpoint
        assert "changed since it was indexed" in response.json()["detail"]


@pytest.mark.parametrize("target", ["image", "text"])
def test_a_link_swapped_while_requests_run_never_serves_its_target(
    client: TestClient, linked_photo, target: str
) -> None:
    """A thread flips the indexed name between the indexed image and a private file while
    requests run (for at most a few seconds): every answer is the indexed image or a 404."""
    link, real, secret_image, secret_text = linked_photo
    private = secret_image if target == "image" else secret_text
    stop = threading.Event()

    def flip() -> None:
        for i in itertools.count():
            if stop.is_set():
                return
            spare = link.with_name(f".flip{i}")
            spare.symlink_to(private if i % 2 else real)
            os.replace(spare, link)

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    served = refused = 0
    leaked: list[str] = []
    deadline = time.monotonic() + 4
    try:
        for i in range(600):
            if time.monotonic() > deadline:
                break
            endpoint = "/api/image" if i % 2 else "/api/thumb"
            if endpoint == "/api/thumb":  # made afresh each time, so each one races the flips
                shutil.rmtree(client.app.state.pixfind.thumb_dir, ignore_errors=True)
            response = client.get(endpoint, params={"path": str(link)})
            if response.status_code == 404:
                refused += 1
                continue
            assert response.status_code == 200, response.text
            served += 1
            if endpoint == "/api/image" and response.content != real.read_bytes():
                leaked.append(f"{endpoint}: {response.content[:20]!r}")
            if endpoint == "/api/thumb" and is_red(response.content):
                leaked.append(f"{endpoint}: a thumbnail of the private image")
    finally:
        stop.set()
        flipper.join(10)
    assert not leaked, f"{len(leaked)} of {served + refused} answers served the private file: {leaked[:3]}"
    assert served > 0  # the race was run, not only refused


def test_a_file_removed_from_the_index_is_404_at_once(client: TestClient, linked_photo, index) -> None:
    link, *_ = linked_photo
    assert client.get("/api/thumb", params={"path": str(link)}).status_code == 200
    assert client.get("/api/image", params={"path": str(link)}).status_code == 200
    with client.app.state.pixfind.lock:
        assert index.store.delete([key_of(str(link))]) == 1
    for endpoint in ("/api/thumb", "/api/image"):
        response = client.get(endpoint, params={"path": str(link)})
        assert response.status_code == 404, endpoint
        assert "only images in the index" in response.json()["detail"]


def test_a_pipe_in_place_of_an_indexed_file_does_not_hang(client: TestClient, linked_photo, tmp_path: Path) -> None:
    link, *_ = linked_photo
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    link.unlink()
    link.symlink_to(pipe)
    answers: list[int] = []
    for endpoint in ("/api/image", "/api/thumb"):
        asking = threading.Thread(
            target=lambda e=endpoint: answers.append(client.get(e, params={"path": str(link)}).status_code),
            daemon=True,
        )
        asking.start()
        asking.join(30)
        if asking.is_alive():  # unblock the server's open() so the test run can end
            with open(pipe, "wb"):
                pass
        assert not asking.is_alive(), f"{endpoint} hung on a named pipe"
    assert answers == [404, 404]


# -- uploads ------------------------------------------------------------------------------------


def png_of_exact_size(size: int) -> bytes:
    """A valid PNG padded after its end chunk to exactly ``size`` bytes (decoders ignore the rest)."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 140, 60)).save(buffer, "PNG")
    data = buffer.getvalue()
    return data + b"\0" * (size - len(data))


def test_upload_limit_is_the_files_size_as_the_readme_says(index, tmp_path: Path) -> None:
    limit = readme_limits()["upload_bytes"]
    with TestClient(create_app(index, tmp_path / "thumbs")) as local:
        for size, status in ((limit - 1, 200), (limit, 200), (limit + 1, 413)):
            response = local.post("/api/search/image", files={"file": ("q.png", png_of_exact_size(size), "image/png")})
            assert response.status_code == status, (size, response.text[:200])
        assert response.json()["detail"] == f"upload too large: the limit is {limit // (1024 * 1024)} MiB"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming ``width`` x ``height`` (an honest header) with almost no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header is rewritten to claim ``width`` x ``height``."""
    data = bytearray(jpeg_bytes((64, 48)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize(
    ("name", "payload", "refused"),
    [
        ("at the limit", png_header_only(4000, 3000), False),
        ("one row over", png_header_only(4000, 3001), True),
        ("169 MP", png_header_only(13000, 13000), True),
        ("JPEG at its limit", jpeg_claiming(10000, 5000), False),
        ("JPEG one row over", jpeg_claiming(10000, 5001), True),
    ],
    ids=["png-at-limit", "png-over", "png-169mp", "jpeg-at-limit", "jpeg-over"],
)
def test_upload_pixel_limits_are_read_from_the_header(client: TestClient, name: str, payload: bytes, refused: bool):
    """The README's pixel limits, decided from the header: a refused image is never decoded."""
    limits = readme_limits()
    assert (limits["upload_pixels"], limits["upload_jpeg_pixels"]) == (4000 * 3000, 10000 * 5000)
    response = client.post("/api/search/image", files={"file": ("q", payload, "application/octet-stream")})
    if refused:
        assert response.status_code == 400, name
        detail = response.json()["detail"]
        assert "too large" in detail and "a smaller copy finds the same pictures" in detail, detail
    else:  # decoded, or refused later for its missing pixels: not for its size
        assert response.status_code in (200, 400), name
        assert response.status_code == 200 or "too large" not in response.json()["detail"], name


def test_a_169_megapixel_upload_is_refused_before_decoding(client: TestClient) -> None:
    buffer = io.BytesIO()
    Image.new("L", (13000, 13000)).save(buffer, "PNG")  # 169 MP in ~165 KB: the attack's file
    response = client.post("/api/search/image", files={"file": ("big.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 400
    assert "too large: 13000x13000 px (limit 12 MP)" in response.json()["detail"]


# -- trust: requests from other sites' pages ------------------------------------------------------


def test_other_sites_pages_are_refused(client: TestClient, gallery: Path) -> None:
    upload = {"file": ("q.jpg", jpeg_bytes(), "image/jpeg")}
    hit = client.get("/api/search", params={"q": "sky", "k": 1}).json()[0]
    # what a page on another origin sends with fetch(..., {mode: 'no-cors'}) or <img src>
    cross_post = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}
    refused = client.post("/api/search/image", files=upload, headers=cross_post)
    assert refused.status_code == 403 and "another site" in refused.json()["detail"]
    assert client.post("/api/search/image", files=upload, headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.post("/api/search/image", files=upload, headers={"Origin": "null"}).status_code == 403
    other_port = {"Origin": "http://testserver:9999", "Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"}
    assert client.post("/api/search/image", files=upload, headers=other_port).status_code == 403
    for site in ("cross-site", "same-site"):  # same-site: another port of this host, i.e. another local app
        probe = {"Sec-Fetch-Site": site, "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}
        assert client.get(hit["thumb"], headers=probe).status_code == 403
    # this page itself, tools that send no such headers (pixfind search, curl), and links to the page
    same = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
    assert client.post("/api/search/image", files=upload, headers=same).status_code == 200
    assert client.post("/api/search/image", files=upload).status_code == 200
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    assert client.get("/?q=sky", headers=link).status_code == 200
    # and no answer may be embedded by another site, refusals included
    for response in (refused, client.get(hit["thumb"]), client.get("/api/thumb", params={"path": "/etc/passwd"})):
        assert response.headers["cross-origin-resource-policy"] == "same-origin"


# -- trust: where it listens, and passwords -----------------------------------------------------------


def test_loopback_is_decided_by_address() -> None:
    from pixfind.web.access import is_loopback

    for host in ("127.0.0.1", "127.0.0.2", "127.255.255.254", "localhost", "::1", "[::1]", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "example.com", "127.0.0.1.example.com", ""):
        assert not is_loopback(host), host


def test_access_on_another_loopback_address_keeps_the_host_check() -> None:
    from pixfind.web.access import decide_access

    access = decide_access("127.0.0.2", "127.0.0.2", 8000, None, False)
    assert access.loopback and access.credentials is None
    assert "127.0.0.2" in (access.allowed_hosts or []) and "evil.example" not in (access.allowed_hosts or [])
    assert "only this computer can connect" in access.lines[0]


def test_access_off_loopback_needs_a_password(monkeypatch: pytest.MonkeyPatch) -> None:
    from pixfind.errors import PixfindError
    from pixfind.web.access import decide_access

    monkeypatch.delenv("PIXFIND_SERVE_PASSWORD", raising=False)
    made = decide_access("0.0.0.0", "0.0.0.0", 8000, None, False)
    assert made.credentials is not None and made.credentials.generated and made.allowed_hosts is None
    assert len(made.credentials.password) >= 16 and made.credentials.password in made.lines[0]
    assert decide_access("0.0.0.0", "0.0.0.0", 8000, None, False).credentials != made.credentials
    given = decide_access("192.168.1.20", "192.168.1.20", 8000, "correct horse", False)
    assert given.credentials is not None and given.credentials.password == "correct horse"
    assert "correct horse" not in " ".join(given.lines)
    shared = decide_access("0.0.0.0", "0.0.0.0", 8000, None, True)
    assert shared.credentials is None and "WITHOUT a password" in shared.lines[0]
    monkeypatch.setenv("PIXFIND_SERVE_PASSWORD", "from the environment")
    assert decide_access("0.0.0.0", "0.0.0.0", 8000, None, False).credentials.password == "from the environment"
    with pytest.raises(PixfindError, match="--no-auth and a password"):
        decide_access("0.0.0.0", "0.0.0.0", 8000, None, True)
    monkeypatch.setenv("PIXFIND_SERVE_PASSWORD", "short")
    with pytest.raises(PixfindError, match="too short"):
        decide_access("0.0.0.0", "0.0.0.0", 8000, None, False)


def test_password_file(tmp_path: Path) -> None:
    from pixfind.errors import PixfindError
    from pixfind.web.access import read_password_file

    given = tmp_path / "password"
    given.write_text("  correct horse battery  \nsecond line\n")
    assert read_password_file(given) == "correct horse battery"
    with pytest.raises(PixfindError, match=r"cannot read --password-file .*missing: No such file"):
        read_password_file(tmp_path / "missing")
    given.write_text("")
    with pytest.raises(PixfindError, match="too short"):
        read_password_file(given)


def test_password_protects_every_answer(index, tmp_path: Path) -> None:
    import base64

    from pixfind.web.access import Credentials

    credentials = Credentials("correct horse battery")
    basic = "Basic " + base64.b64encode(b"pixfind:correct horse battery").decode()
    with TestClient(create_app(index, tmp_path / "thumbs", credentials=credentials)) as local:
        for path in ("/", "/api/info", "/api/search?q=sky", "/static/app.js", "/docs"):
            response = local.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"].startswith('Basic realm="pixfind"')
        for wrong in (
            "Basic " + base64.b64encode(b"pixfind:correct horse").decode(),
            "Basic " + base64.b64encode(b"admin:correct horse battery").decode(),
            "Basic not-base64!",
            "Bearer " + credentials.password,
            "Bearer ",
        ):
            assert local.get("/api/info", headers={"Authorization": wrong}).status_code == 401, wrong
        assert local.get("/api/info", headers={"Authorization": basic}).status_code == 200
        assert local.get("/", headers={"Authorization": basic}).status_code == 200
        bearer = {"Authorization": f"Bearer {credentials.local_key}"}
        assert local.get("/api/search", params={"q": "sky"}, headers=bearer).status_code == 200


def test_info_says_when_the_weights_are_random(client: TestClient) -> None:
    info = client.get("/api/info").json()
    assert info["weights"] == "none" and info["random_weights"] is True


def test_a_server_announcement_others_could_write_is_ignored(tmp_path: Path) -> None:
    """`pixfind search` sends queries (and images) where the announcement next to the index says:
    only one this user wrote, and nobody else could have, counts."""
    from pixfind.remote import RunningServer, announce_path, announced, find_server

    db = str(tmp_path / "index.db")
    with announced(db, "http://127.0.0.1:8123/", "pixfind", key="k3y"):
        path = announce_path(db)
        assert path.stat().st_mode & 0o777 == 0o600
        assert find_server(db, "pixfind") == RunningServer("http://127.0.0.1:8123/", "k3y")
        assert find_server(db, "other-collection") is None
        path.chmod(0o622)  # writable by others
        assert find_server(db, "pixfind") is None
        path.chmod(0o600)
        linked = tmp_path / "linked.db.serve.json"
        linked.symlink_to(path)
        assert find_server(str(tmp_path / "linked.db"), "pixfind") is None  # not followed
    assert not path.exists()
