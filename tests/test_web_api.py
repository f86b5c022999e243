"""The web API through FastAPI's test client: real Milvus Lite, random-weight open_clip model."""

from __future__ import annotations

import io
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest
from PIL import Image

try:
    from web_support import make_gallery, open_test_index
except ImportError:  # tests/ is a package
    from tests.web_support import make_gallery, open_test_index

from fastapi.testclient import TestClient

from pixfind.web import Limits, clean_path, create_app, path_query

HIT_KEYS = {"rank", "score", "path", "width", "height", "size", "thumb", "image", "similar"}


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
    for bad in ("0", "201", "many"):
        response = client.get("/api/search", params={"q": "flowers", "k": bad})
        assert response.status_code == 400
        assert response.json()["detail"].startswith("bad request: k:")


def test_query_text_is_required_and_limited(client: TestClient) -> None:
    assert client.get("/api/search").status_code == 400
    response = client.get("/api/search", params={"q": "   "})
    assert response.status_code == 400
    assert "empty query" in response.json()["detail"]
    response = client.get("/api/search", params={"q": "dog " * 200})
    assert response.status_code == 400
    assert "too long" in response.json()["detail"]


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


def test_similar_finds_the_image_itself_first(client: TestClient, gallery: Path) -> None:
    target = str(gallery / "trips" / "landscape_04.jpg")
    response = client.get("/api/similar", params={"path": target, "k": 3})
    assert response.status_code == 200, response.text
    hits = response.json()
    assert hits[0]["path"] == target
    assert hits[0]["score"] > 0.99


def test_similar_url_of_a_hit_works(client: TestClient) -> None:
    hit = client.get("/api/search", params={"q": "hills", "k": 1}).json()[0]
    hits = client.get(hit["similar"] + "&k=2").json()
    assert hits[0]["path"] == hit["path"]


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
    assert info["server"]["max_results"] == 200
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
    assert "limit is 2 MB" in response.json()["detail"]


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


def test_thumbnail_cache_follows_changes(client: TestClient, gallery: Path) -> None:
    path = gallery / "trips" / "landscape_00.jpg"
    first = client.get("/api/thumb", params={"path": str(path)})
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    try:
        second = client.get("/api/thumb", params={"path": str(path)})
    finally:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the indexed file, as it was
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
        assert local.get(hits[0]["similar"]).json()[0]["path"] == str(folder / name)


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
    for asset in ("/static/app.js", "/static/style.css", "/static/favicon.svg"):
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
    from pixfind.web import bind_socket

    first = bind_socket("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        with pytest.raises(PixfindError, match=f"cannot listen on 127.0.0.1:{port}.*--port"):
            bind_socket("127.0.0.1", port)
    finally:
        first.close()
