"""``pixfind serve``: a web page and a JSON API over one index, with the model loaded once.

The app holds a single :class:`~pixfind.api.ImageIndex` for its lifetime (an embedded Milvus Lite
file can be opened by one process only) and serialises calls into it with a lock, so any number of
browsers can search at once. Endpoints:

* ``GET /``: the page (``static/index.html``, plain HTML/CSS/JS: no build step, no CDN);
* ``GET /api/search?q=&k=&under=``: text search; a JSON list shaped like ``pixfind search --json``
  (``rank, score, path, width, height``) plus ``size`` and the ``thumb``, ``image`` and
  ``similar`` URLs of each hit;
* ``POST /api/search/image``: the same for an uploaded image (multipart field ``file``);
* ``GET /api/similar?path=``: images like one that is in the index ("more like this");
* ``GET /api/info``: what the index holds, and this server's limits;
* ``GET /api/thumb?path=`` and ``GET /api/image?path=``: a cached JPEG thumbnail, the original file.

Security: only files that are in the index are ever read (a path is normalised, must be absolute,
must be in the index, must still be a regular file that Pillow recognises as an image); anything
else answers 404, whatever ``..``, symlink or absolute-path trick it holds. Uploads are limited in
size and decoded with the indexer's own guarded loader, so a bad one gets a 400 naming the reason.
The server binds 127.0.0.1 unless told otherwise and then refuses requests for other host names
(DNS rebinding).

Concurrency with indexing: an embedded (Lite) index is locked by the server while it runs, so
``pixfind index`` must wait for it; with a Milvus server (``--uri http://...``) an index run can add
images while ``pixfind serve`` answers, and new images show up in results once written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qsl, quote

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from . import __version__
from .config import cpu_cores
from .errors import PixfindError, StoreError
from .images import ImageLoadError, has_image_extension, load_image

if TYPE_CHECKING:
    from .api import ImageIndex
    from .config import Settings
    from .search import Hit

log = logging.getLogger("pixfind.web")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
#: Longest side of a thumbnail, in pixels.
THUMB_SIZE = 256
THUMB_QUALITY = 82
#: Largest accepted upload for search-by-image.
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_QUERY_CHARS = 500
MAX_RESULTS = 200
DEFAULT_RESULTS = 10
#: Longest path accepted in a request (Linux PATH_MAX).
MAX_PATH_CHARS = 4096
#: Decode side for uploads: twice CLIP's 224 px input keeps the embedding within cosine 0.995.
UPLOAD_DRAFT_SIDE = 448
#: A file known to be in the index is not asked about again for this long (seconds).
CONTAINS_TTL_S = 30.0

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
STATIC_DIR = Path(str(resources.files("pixfind") / "static"))

_IMMUTABLE = "public, max-age=31536000, immutable"
_REVALIDATE = "no-cache"
_PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


class ApiError(Exception):
    """An error answered as ``{"detail": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: paths that are not valid UTF-8 (surrogate escapes) still encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


@dataclass(frozen=True)
class Limits:
    thumb_size: int = THUMB_SIZE
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_query_chars: int = MAX_QUERY_CHARS
    max_results: int = MAX_RESULTS


KParam = Annotated[int, Query(ge=1, description="number of hits (at most the server's max_results)")]
UnderParam = Annotated[str | None, Query(description="only images under this folder (absolute path)")]
PathParam = Annotated[str, Query(description="absolute path of an indexed image")]
VersionParam = Annotated[str | None, Query(description="file version (from a hit's URL)")]
QueryParam = Annotated[str, Query(description="what the picture shows")]
UploadParam = Annotated[UploadFile, File(description="an image (size limit: see /api/info)")]


# -- paths --------------------------------------------------------------------------------------


def clean_path(raw: str | None) -> str | None:
    """The absolute, normalised path a request names, or None when it is not one.

    Index keys are absolute and normalised (``os.path.abspath``), so anything relative, holding
    ``..``/``.`` components, doubled slashes or NUL can never be in the index: refused outright.
    """
    if not raw or len(raw) > MAX_PATH_CHARS or "\x00" in raw:
        return None
    if not raw.startswith("/") or raw.startswith("//"):
        return None
    if os.path.normpath(raw) != raw or any(part in ("..", ".") for part in raw.split("/")):
        return None
    return raw


def path_query(path: str) -> str:
    """``path`` as a query value: its bytes percent-encoded, so non-UTF-8 names travel exactly."""
    return quote(os.fsencode(path), safe="/")


def raw_query_param(request: Request, name: str) -> str | None:
    """A query parameter decoded like ``os.fsdecode``: bytes that are not UTF-8 survive intact.

    Starlette decodes query strings with ``errors="replace"``, which would turn such a file name
    into another one; paths are therefore read from the raw query string here.
    """
    query = request.scope.get("query_string", b"").decode("latin-1")
    for key, value in parse_qsl(query, keep_blank_values=True, encoding="utf-8", errors="surrogateescape"):
        if key == name:
            return value
    return None


class _ContainsCache:
    """Remembers for a short while which paths the index confirmed, so a page of thumbnails does
    not ask Milvus once per image each time the page is shown. Only positive answers are kept."""

    def __init__(self, ttl: float = CONTAINS_TTL_S, size: int = 4096) -> None:
        self.ttl = ttl
        self.size = size
        self._known: dict[str, float] = {}
        self._lock = threading.Lock()

    def hit(self, path: str) -> bool:
        with self._lock:
            stamp = self._known.get(path)
            return stamp is not None and time.monotonic() - stamp < self.ttl

    def add(self, path: str) -> None:
        with self._lock:
            if len(self._known) >= self.size:
                self._known.clear()
            self._known[path] = time.monotonic()


# -- the app ------------------------------------------------------------------------------------


class WebService:
    """The state behind the routes: the index, its lock, the thumbnail cache."""

    def __init__(self, index: ImageIndex, thumb_dir: Path, limits: Limits) -> None:
        self.index = index
        self.thumb_dir = Path(thumb_dir)
        self.limits = limits
        self.lock = threading.Lock()  # one Milvus client and one model: one call at a time
        self.known = _ContainsCache()
        self.thumb_slots = threading.BoundedSemaphore(cpu_cores())

    # index calls, serialised

    def call(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            with self.lock:
                return func(*args, **kwargs)
        except StoreError as exc:
            raise ApiError(503, str(exc)) from exc
        except PixfindError as exc:
            raise ApiError(409, str(exc)) from exc

    def contains(self, path: str) -> bool:
        if self.known.hit(path):
            return True
        found = bool(self.call(self.index.contains, path))
        if found:
            self.known.add(path)
        return found

    def indexed_file(self, raw: str | None) -> tuple[str, os.stat_result]:
        """The path and stat of an indexed image file, or a 404."""
        path = clean_path(raw)
        if path is None or not has_image_extension(os.path.basename(path)) or not self.contains(path):
            raise ApiError(404, "not found: only images in the index are served")
        try:
            st = os.stat(path)  # follows links: what would be served
        except OSError:
            raise ApiError(404, "not found: the file is no longer there") from None
        if not stat.S_ISREG(st.st_mode):
            raise ApiError(404, "not found: not a regular file")
        return path, st

    # hits

    def hit_json(self, hit: Hit) -> dict[str, Any]:
        data = hit.to_dict()  # {rank, score, path, width, height}: as `pixfind search --json`
        data["size"] = int(hit.size)
        query = path_query(hit.path)
        version = _version_of(hit.path)
        data["thumb"] = f"/api/thumb?path={query}" + (f"&v={version}" if version else "")
        data["image"] = f"/api/image?path={query}" + (f"&v={version}" if version else "")
        data["similar"] = f"/api/similar?path={query}"
        self.known.add(hit.path)  # the index just returned it
        return data

    def hits_json(self, hits: list[Hit], started: float) -> Response:
        body = [self.hit_json(hit) for hit in hits]
        elapsed = (time.perf_counter() - started) * 1000
        return AsciiJSONResponse(
            body,
            headers={"Server-Timing": f"search;dur={elapsed:.1f}", "Cache-Control": "no-store"},
        )

    # thumbnails

    def thumbnail(self, path: str, st: os.stat_result) -> Path:
        size = self.limits.thumb_size
        digest = hashlib.sha256(
            f"{size}\0{st.st_size}\0{st.st_mtime_ns}\0{path}".encode("utf-8", "surrogateescape")
        ).hexdigest()
        target = self.thumb_dir / digest[:2] / f"{digest}.jpg"
        if target.is_file():
            return target
        with self.thumb_slots:
            if target.is_file():
                return target
            try:
                loaded = load_image(path, min_side=size)
            except ImageLoadError as exc:
                raise ApiError(404, f"no thumbnail: {exc.reason}") from exc
            image = loaded.image
            image.thumbnail((size, size), reducing_gap=3.0)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
            try:
                with os.fdopen(fd, "wb") as fh:
                    image.save(fh, "JPEG", quality=THUMB_QUALITY, optimize=True, progressive=True)
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        return target


def _version_of(path: str) -> str | None:
    """``size-mtime`` of a file: part of its URLs, so a changed file gets new ones."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size:x}-{st.st_mtime_ns:x}"


def _etag(st: os.stat_result, extra: str = "") -> str:
    return f'"{st.st_size:x}-{st.st_mtime_ns:x}{extra}"'


def _image_media_type(path: str) -> str:
    """The MIME type Pillow finds in the file's header; a file it does not know is not served."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            fmt = img.format
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise ApiError(404, "not found: the file is not an image any more") from None
    return Image.MIME.get(fmt or "", "application/octet-stream")


def _not_modified(request: Request, etag: str, cache_control: str) -> Response | None:
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": cache_control})
    return None


class UploadLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes on ``paths`` with a 413.

    The declared Content-Length is checked before anything is read; a body without one (chunked)
    is counted as it arrives and cut off at the limit.
    """

    def __init__(self, app: Any, limit: int, paths: tuple[str, ...]) -> None:
        self.app = app
        self.limit = limit
        self.paths = paths

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        received = 0
        exceeded = False
        answered = False

        async def counting_receive() -> MutableMapping[str, Any]:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def guarded_send(message: MutableMapping[str, Any]) -> None:
            nonlocal answered
            if exceeded:  # whatever the app says about the broken body, the answer is 413
                if not answered:
                    answered = True
                    await self._refuse(send)
                return
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _TooLarge:
            if not answered:
                await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        megabytes = self.limit / (1024 * 1024)
        body = json.dumps({"detail": f"upload too large: the limit is {megabytes:g} MB"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(
    index: ImageIndex,
    thumb_dir: Path,
    *,
    limits: Limits | None = None,
    allowed_hosts: list[str] | None = None,
) -> FastAPI:
    """The pixfind web app over ``index`` (kept open; the caller closes it).

    ``thumb_dir``: where thumbnails are cached. ``allowed_hosts``: Host header names accepted
    (None: any; :func:`serve` passes the loopback names when bound to loopback).
    """
    limits = limits or Limits()
    service = WebService(index, thumb_dir, limits)
    app = FastAPI(
        title="pixfind",
        version=__version__,
        docs_url=None,  # served below from the package: the default page loads Swagger UI from a CDN
        redoc_url=None,
        description="Find pictures by describing them. Hits have the shape of `pixfind search --json` "
        "plus `size` and `thumb`, `image` and `similar` URLs.",
    )
    app.state.pixfind = service
    app.add_middleware(UploadLimit, limit=limits.max_upload_bytes, paths=("/api/search/image",))
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if request.url.path == "/" or request.url.path.startswith("/static/"):
            response.headers.setdefault("Content-Security-Policy", _PAGE_CSP)
            response.headers.setdefault("X-Frame-Options", "DENY")
        return response

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        return AsciiJSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> Response:
        return AsciiJSONResponse({"detail": _validation_message(exc)}, status_code=400)

    def check_query(q: str) -> str:
        text = q.strip()
        if not text:
            raise ApiError(400, "empty query: type what the picture shows")
        if len(text) > limits.max_query_chars:
            raise ApiError(400, f"query too long: at most {limits.max_query_chars} characters")
        return text

    def check_k(k: int) -> int:
        if k > limits.max_results:
            raise ApiError(400, f"bad request: k: at most {limits.max_results} results")
        return k

    def check_under(request: Request) -> str | None:
        # Read raw, like paths, so a folder name that is not UTF-8 cannot turn into another one;
        # the routes' ``under`` parameters are there to document it in the OpenAPI schema.
        under = raw_query_param(request, "under")
        if under is None or not under.strip():
            return None
        folder = os.path.expanduser(under.strip())
        if "\x00" in folder or len(folder) > MAX_PATH_CHARS or not os.path.isabs(folder):
            raise ApiError(400, "folder filter must be an absolute path, e.g. /home/me/Pictures")
        return os.path.normpath(folder)

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": _REVALIDATE})

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        # Swagger UI shipped in static/ (swagger-ui-dist, Apache-2.0): works without internet.
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="pixfind API",
            swagger_js_url="/static/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui.css",
            swagger_favicon_url="/static/favicon.svg",
            swagger_ui_parameters={"validatorUrl": None},  # the default calls validator.swagger.io
        )

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return RedirectResponse("/static/favicon.svg", status_code=308)

    @app.get("/api/search", summary="Search by text")
    def search(
        request: Request,
        q: QueryParam,
        k: KParam = DEFAULT_RESULTS,
        under: UnderParam = None,
    ) -> Response:
        text, folder, k = check_query(q), check_under(request), check_k(k)
        started = time.perf_counter()
        hits = service.call(index.search, text, limit=k, under=folder)
        return service.hits_json(hits, started)

    @app.post("/api/search/image", summary="Search by an uploaded image (multipart field `file`)")
    async def search_image(
        request: Request,
        file: UploadParam,
        k: KParam = DEFAULT_RESULTS,
        under: UnderParam = None,
    ) -> Response:
        folder, k = check_under(request), check_k(k)
        started = time.perf_counter()
        try:
            return await run_in_threadpool(_search_upload, service, file, k, folder, started)
        finally:
            await file.close()

    @app.get("/api/similar", summary="Images like one in the index (more like this)")
    def similar(
        request: Request,
        path: PathParam,
        k: KParam = DEFAULT_RESULTS,
        under: UnderParam = None,
    ) -> Response:
        target = clean_path(raw_query_param(request, "path"))
        if target is None or not service.contains(target):
            raise ApiError(404, "not in the index: pass the path of an indexed image")
        started = time.perf_counter()
        hits = service.call(index.similar, target, limit=check_k(k), under=check_under(request))
        return service.hits_json(hits, started)

    @app.get("/api/info", summary="What the index holds, and this server's limits")
    def info() -> Response:
        data = dict(service.call(index.info))
        data.pop("token", None)
        data["server"] = {
            "version": __version__,
            "thumb_size": limits.thumb_size,
            "max_upload_bytes": limits.max_upload_bytes,
            "max_query_chars": limits.max_query_chars,
            "max_results": limits.max_results,
        }
        return AsciiJSONResponse(data, headers={"Cache-Control": "no-store"})

    @app.get("/api/thumb", summary="JPEG thumbnail of an indexed image")
    def thumb(request: Request, path: PathParam, v: VersionParam = None) -> Response:
        target, st = service.indexed_file(raw_query_param(request, "path"))
        cache = _IMMUTABLE if v and v == f"{st.st_size:x}-{st.st_mtime_ns:x}" else _REVALIDATE
        etag = _etag(st, f"-t{limits.thumb_size}")
        if (cached := _not_modified(request, etag, cache)) is not None:
            return cached
        file = service.thumbnail(target, st)
        return FileResponse(file, media_type="image/jpeg", headers={"Cache-Control": cache, "ETag": etag})

    @app.get("/api/image", summary="The original file of an indexed image, streamed")
    def image(request: Request, path: PathParam, v: VersionParam = None) -> Response:
        target, st = service.indexed_file(raw_query_param(request, "path"))
        cache = _IMMUTABLE if v and v == f"{st.st_size:x}-{st.st_mtime_ns:x}" else _REVALIDATE
        etag = _etag(st)
        if (cached := _not_modified(request, etag, cache)) is not None:
            return cached
        media_type = _image_media_type(target)
        return FileResponse(
            target,
            media_type=media_type,
            stat_result=st,
            headers={"Cache-Control": cache, "ETag": etag},
        )

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _search_upload(service: WebService, upload: UploadFile, k: int, folder: str | None, started: float) -> Response:
    """Decode an upload with the indexer's guarded loader, then search by it (in a worker thread)."""
    limit = service.limits.max_upload_bytes
    with tempfile.NamedTemporaryFile(prefix="pixfind-upload-", suffix=".img") as tmp:
        copied = 0
        upload.file.seek(0)
        while chunk := upload.file.read(1 << 20):
            copied += len(chunk)
            if copied > limit:
                raise ApiError(413, f"upload too large: the limit is {limit / (1024 * 1024):g} MB")
            tmp.write(chunk)
        tmp.flush()
        if copied == 0:
            raise ApiError(400, "not a usable image: the upload is empty")
        try:
            loaded = load_image(tmp.name, min_side=UPLOAD_DRAFT_SIDE)
        except ImageLoadError as exc:
            raise ApiError(400, f"not a usable image: {exc.reason}") from exc
    hits = service.call(service.index.search_image, loaded.image, limit=k, under=folder)
    return service.hits_json(hits, started)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(item) for item in error.get("loc", ()) if item not in ("query", "body"))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg")))
    return "bad request: " + "; ".join(parts)


# -- running it -----------------------------------------------------------------------------------


def open_index(settings: Settings) -> ImageIndex:
    """The index ``settings`` name, with the model the collection records."""
    from .api import ImageIndex

    return ImageIndex(settings=settings, create=False)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, or one clear error when the port is taken (port 0: any free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PixfindError(
            f"cannot listen on {host}:{port} ({exc.strerror}): pick another --port, or stop the program using it"
        ) from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(
    settings: Settings | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    thumb_dir: Path | None = None,
    index: ImageIndex | None = None,
    limits: Limits | None = None,
    log_level: str = "warning",
    echo: Callable[[str], None] | None = None,
    exact: bool = False,
) -> None:
    """Run the web app until Ctrl+C. ``pixfind serve`` calls this. ``exact``: keep exact search
    on a large embedded index instead of :meth:`ImageIndex.optimize_for_queries`.

    ``settings``: where the index is (``Settings.from_env()`` when None). ``port`` 0 picks a free
    one. ``thumb_dir``: thumbnail cache (default: ``<cache dir>/thumbs``). ``index``: an index
    already open (it is closed on exit either way). Raises :class:`PixfindError` for problems the
    user can fix (index locked or unreachable, port taken).
    """
    import uvicorn

    from .config import Settings, cache_dir

    say = echo or (lambda line: print(line, flush=True))
    settings = settings or Settings.from_env()
    sock = bind_socket(host, port)
    try:
        index = index or open_index(settings)
    except BaseException:
        sock.close()
        raise
    try:
        if exact:
            with contextlib.suppress(PixfindError):
                index.store.restore_index()  # an IVF index left by a killed serve: exact again
        elif index.optimize_for_queries():  # undone by index.close()
            say(
                "pixfind: large embedded index: approximate (IVF) search while serving, exact again on exit "
                "(--exact keeps it exact)"
            )
        with contextlib.suppress(Exception):
            index.search("a photo", limit=1)  # warm up: the first real query is then fast
        count, where = None, settings.uri
        with contextlib.suppress(Exception):
            details = index.info()
            count = details.get("images", details.get("count"))
            where = details.get("uri") or where
        loopback = host in LOOPBACK_HOSTS
        app = create_app(
            index,
            thumb_dir or cache_dir() / "thumbs",
            limits=limits,
            allowed_hosts=["127.0.0.1", "localhost", "::1", "[::1]"] if loopback else None,
        )
        bound_port = sock.getsockname()[1]
        shown_host = f"[{host}]" if ":" in host else host
        if host in ("0.0.0.0", "::"):
            shown_host = "localhost"
        url = f"http://{shown_host}:{bound_port}/"
        images = f"{count:,} images" if isinstance(count, int) else "the index"
        say(f"pixfind: serving {images} from {where} at {url}")
        if loopback:
            say("  only this computer can connect (pass --host 0.0.0.0 to share it on your network)")
        else:
            say(f"  listening on {host}: other computers on your network can connect, unauthenticated")
        say(f"  API documentation: {url}docs · press Ctrl+C to stop")
        config = uvicorn.Config(
            app, log_level=log_level, access_log=False, timeout_graceful_shutdown=3, server_header=False
        )
        server = uvicorn.Server(config)
        _exit_cleanly_on_sigterm()
        with contextlib.suppress(KeyboardInterrupt), _announce(index, host, bound_port):
            server.run(sockets=[sock])
    finally:
        sock.close()
        index.close()


def _exit_cleanly_on_sigterm() -> None:
    """uvicorn shuts down on SIGTERM, then re-raises it: make that an exit that runs ``finally``
    blocks (closing the index, removing the announcement) instead of an abrupt kill."""
    import signal
    import sys
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _announce(index: ImageIndex, host: str, port: int) -> contextlib.AbstractContextManager[None]:
    """On an embedded index, tell other pixfind commands where to send their searches."""
    if index.store.is_server:
        return contextlib.nullcontext()
    from .remote import announced

    local = "127.0.0.1" if host in ("0.0.0.0", "::", "localhost") else host
    local = f"[{local}]" if ":" in local else local
    return announced(index.store.uri, f"http://{local}:{port}/", index.settings.collection)


def main(argv: list[str] | None = None) -> int:
    """``python -m pixfind.web``: the same as ``pixfind serve``, for when the CLI is not at hand."""
    import argparse
    import sys

    from .config import Settings

    parser = argparse.ArgumentParser(prog="python -m pixfind.web", description=serve.__doc__)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--uri")
    parser.add_argument("--token")
    parser.add_argument("--collection")
    parser.add_argument("--thumb-dir", type=Path)
    args = parser.parse_args(argv)
    settings = Settings.from_env(uri=args.uri, token=args.token, collection=args.collection)
    try:
        serve(settings, args.host, args.port, thumb_dir=args.thumb_dir)
    except PixfindError as exc:
        print(f"pixfind: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
