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

Trust (docs/web.md says how each was attacked):

* only files in the index are read, and only while they are what the index recorded: a request
  opens the file once (never blocking on a pipe) and checks that open file (regular, size, mtime,
  the fingerprint of its first and last 64 KiB) against the index row, asked afresh each time;
  the media type, the thumbnail and the bytes are then read from that open file, never from the
  name again, so a name swapped for a link mid-request serves nothing else;
* uploads are limited in bytes and pixels (from the header, before decoding), decoded at reduced
  size, one at a time;
* :mod:`pixfind.web_access`: loopback names only on a loopback bind, no requests from other sites'
  pages, a password off loopback; :mod:`pixfind.web_transport`: slow clients are timed out and
  connections are capped.

Concurrency with indexing: an embedded (Lite) index is locked by the server while it runs, so
``pixfind index`` must wait for it; with a Milvus server (``--uri http://...``) an index run can add
images while ``pixfind serve`` answers, and new images show up in results once written.
"""

from __future__ import annotations

import asyncio
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
from collections.abc import AsyncIterator, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qsl, quote

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from . import __version__
from .config import ModelSpec, cpu_cores
from .errors import PixfindError, StoreError
from .ingest.content import fingerprint
from .ingest.decode import MAX_PIXELS, ImageLoadError, has_image_extension, load_reduced
from .limits import (
    DEFAULT_RESULTS,
    MAX_QUERY_CHARS,
    MAX_RESULTS,
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_JPEG_PIXELS,
    MAX_UPLOAD_PIXELS,
    QUERY_IMAGE_SIDE,
)
from .pathkeys import key_of
from .web_access import (
    PASSWORD_ENV,
    USER,
    AccessGuard,
    Credentials,
    check_password,
    is_loopback,
    loopback_host_names,
)
from .web_transport import TransportLimits, guarded_protocol

if TYPE_CHECKING:
    from .api import ImageIndex
    from .config import Settings
    from .search import Hit
    from .store import StoredFile

log = logging.getLogger("pixfind.web")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
#: Longest side of a thumbnail, in pixels.
THUMB_SIZE = 256
THUMB_QUALITY = 82
#: What a multipart body may carry besides the file (boundaries, part headers, a long file name).
MULTIPART_OVERHEAD_BYTES = 64 * 1024
#: Longest path accepted in a request (Linux PATH_MAX).
MAX_PATH_CHARS = 4096
#: Uploads decoded at once (threads kept for it): decoding is where an upload costs memory (up to
#: ~190 MiB for a 12 MP WebP); searches are serialised by the index lock anyway.
UPLOAD_DECODES = 1

STATIC_DIR = Path(str(resources.files("pixfind") / "static"))

_IMMUTABLE = "public, max-age=31536000, immutable"
_REVALIDATE = "no-cache"
_PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_NOT_INDEXED = "not found: only images in the index are served"
_CHANGED = "not found: the file changed since it was indexed (run pixfind index on its folder)"


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
    """This server's own limits; the query limits are :mod:`pixfind.limits`' (shared with the CLI)."""

    thumb_size: int = THUMB_SIZE
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_upload_pixels: int = MAX_UPLOAD_PIXELS
    max_upload_jpeg_pixels: int = MAX_UPLOAD_JPEG_PIXELS
    upload_decodes: int = UPLOAD_DECODES


KParam = Annotated[int, Query(ge=1, description=f"number of hits (at most {MAX_RESULTS:,})")]
UnderParam = Annotated[str | None, Query(description="only images under this folder (absolute path)")]
PathParam = Annotated[str, Query(description="absolute path of an indexed image")]
VersionParam = Annotated[str | None, Query(description="file version (from a hit's URL)")]
QueryParam = Annotated[str, Query(description="what the picture shows")]
UploadParam = Annotated[UploadFile, File(description="an image (limits: see /api/info)")]


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


# -- an indexed file, opened once ---------------------------------------------------------------


class OpenedFile:
    """An indexed image opened once and checked against its index record.

    Everything a request reads (the media type, the thumbnail, the bytes it streams) comes from
    this one open file through :attr:`source`, the kernel's name for the open file itself
    (``/proc/self/fd/N``): opening it again reaches the same inode even if the path now names
    something else. Closed by :meth:`close`, or when the object is collected.
    """

    def __init__(self, path: str, handle: IO[bytes], info: os.stat_result, record: StoredFile) -> None:
        self.path = path
        self.handle = handle
        self.stat = info
        self.record = record

    @property
    def source(self) -> str:
        fd = self.handle.fileno()
        os.lseek(fd, 0, os.SEEK_SET)  # where /dev/fd shares the offset (macOS), start at 0
        return f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else f"/dev/fd/{fd}"

    @property
    def version(self) -> str:
        return f"{self.stat.st_size:x}-{self.stat.st_mtime_ns:x}"

    def close(self) -> None:
        self.handle.close()


def open_indexed(path: str, record: StoredFile) -> OpenedFile:
    """Open ``path`` once and check the open file against ``record``; an ApiError 404 otherwise.

    ``O_NONBLOCK``: a name swapped for a named pipe must not hang the request (the open file is
    checked to be a regular file before anything reads it).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        raise ApiError(404, "not found: the file is no longer there or cannot be read") from None
    handle = os.fdopen(fd, "rb")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ApiError(404, "not found: not a regular file")
        if (info.st_size, info.st_mtime_ns) != (record.size, record.mtime_ns):
            raise ApiError(404, _CHANGED)
        opened = OpenedFile(path, handle, info, record)
        if fingerprint(opened.source, info.st_size) != record.fingerprint:
            raise ApiError(404, _CHANGED)
        return opened
    except ApiError:
        handle.close()
        raise
    except OSError:
        handle.close()
        raise ApiError(404, "not found: the file cannot be read") from None


def _image_media_type(opened: OpenedFile) -> str:
    """The MIME type Pillow finds in the open file's header; a file it does not know is not served."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(opened.source) as img:
            fmt = img.format
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise ApiError(404, "not found: the file is not an image any more") from None
    return Image.MIME.get(fmt or "", "application/octet-stream")


# -- the app ------------------------------------------------------------------------------------


class WebService:
    """The state behind the routes: the index, its lock, the thumbnail cache, the upload slots."""

    def __init__(self, index: ImageIndex, thumb_dir: Path, limits: Limits) -> None:
        self.index = index
        self.thumb_dir = Path(thumb_dir)
        self.limits = limits
        self.lock = threading.Lock()  # one Milvus client and one model: one call at a time
        self.thumb_slots = threading.BoundedSemaphore(cpu_cores())
        # Decoding is what an upload costs in memory: a few at a time, always on the same threads,
        # so memory one decode freed is reused by the next (each thread has its own malloc arena).
        self.decoder = ThreadPoolExecutor(limits.upload_decodes, thread_name_prefix="pixfind-upload")

    # index calls, serialised

    def call(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            with self.lock:
                return func(*args, **kwargs)
        except StoreError as exc:
            raise ApiError(503, str(exc)) from exc
        except PixfindError as exc:
            raise ApiError(409, str(exc)) from exc

    def record(self, path: str) -> StoredFile | None:
        """The index row's record of exactly ``path``, asked afresh (a removal counts at once)."""
        store = self.index.store
        key = key_of(path)
        return self.call(lambda: store.lookup([key]).get(key) if store.exists() else None)

    def indexed_file(self, raw: str | None) -> OpenedFile:
        """The requested indexed image, opened and checked, or a 404."""
        path = clean_path(raw)
        if path is None or not has_image_extension(os.path.basename(path)):
            raise ApiError(404, _NOT_INDEXED)
        record = self.record(path)
        if record is None:
            raise ApiError(404, _NOT_INDEXED)
        return open_indexed(path, record)

    # hits

    def hit_json(self, hit: Hit) -> dict[str, Any]:
        data = hit.to_dict()  # {rank, score, path, width, height}: as `pixfind search --json`
        data["size"] = int(hit.size)
        query = path_query(hit.path)
        version = _version_of(hit.path)
        data["thumb"] = f"/api/thumb?path={query}" + (f"&v={version}" if version else "")
        data["image"] = f"/api/image?path={query}" + (f"&v={version}" if version else "")
        data["similar"] = f"/api/similar?path={query}"
        return data

    def hits_json(self, hits: list[Hit], started: float) -> Response:
        body = [self.hit_json(hit) for hit in hits]
        elapsed = (time.perf_counter() - started) * 1000
        return AsciiJSONResponse(
            body,
            headers={"Server-Timing": f"search;dur={elapsed:.1f}", "Cache-Control": "no-store"},
        )

    # thumbnails

    def thumbnail(self, opened: OpenedFile) -> Path:
        """The cached thumbnail of an opened, checked file (made from that open file). Named by
        the record it was checked against, so a thumbnail made before a file changed is never
        served for the new one."""
        size = self.limits.thumb_size
        st = opened.stat
        name = f"2\0{size}\0{st.st_size}\0{st.st_mtime_ns}\0{opened.record.fingerprint}\0{opened.path}"
        digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()
        target = self.thumb_dir / digest[:2] / f"{digest}.jpg"
        if target.is_file():
            return target
        with self.thumb_slots:
            if target.is_file():
                return target
            try:
                image = load_reduced(opened.source, min_side=size, max_pixels=MAX_PIXELS).image
            except ImageLoadError as exc:
                raise ApiError(404, f"no thumbnail: {exc.reason}") from exc
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


def _etag(opened: OpenedFile, extra: str = "") -> str:
    return f'"{opened.version}{extra}"'


def _not_modified(request: Request, etag: str, cache_control: str) -> Response | None:
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": cache_control})
    return None


def _random_weights(info: dict[str, Any]) -> bool:
    """Was the index built with random weights (``--pretrained none``)? Its rankings mean nothing."""
    if not info.get("exists") or "model" not in info:
        return False
    spec = ModelSpec.from_weights(str(info["model"]), str(info.get("weights", "")))
    return spec.pretrained is None and spec.checkpoint is None


class UploadLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes on ``paths`` with a 413.

    The declared Content-Length is checked before anything is read; a body without one (chunked)
    is counted as it arrives and cut off at the limit. ``limit`` is the file's limit plus the
    multipart framing; the route checks the file's own size exactly.
    """

    def __init__(self, app: Any, limit: int, file_limit: int, paths: tuple[str, ...]) -> None:
        self.app = app
        self.limit = limit
        self.file_limit = file_limit
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
        body = json.dumps({"detail": upload_too_large(self.file_limit)}).encode()
        # No "connection: close": closing while the client still sends would reset the connection
        # before it reads this answer; the server reads and discards the rest for a while instead.
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def upload_too_large(limit: int) -> str:
    return f"upload too large: the limit is {limit / (1024 * 1024):g} MiB"


class SecurityHeaders:
    """ASGI middleware: headers on every answer, the refusals of the outer checks included.

    ``Cross-Origin-Resource-Policy: same-origin`` stops pages of other sites from loading any
    answer (an ``<img src=…/api/thumb?path=…>`` would otherwise tell them which files are indexed).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        page = scope["path"] == "/" or scope["path"].startswith("/static/") or scope["path"] == "/docs"

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                present = {name.lower() for name, _ in headers}
                extra = [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cross-origin-resource-policy", b"same-origin"),
                ]
                if page:
                    extra += [(b"x-frame-options", b"DENY")]
                    if scope["path"] != "/docs":  # Swagger UI's page has inline script
                        extra += [(b"content-security-policy", _PAGE_CSP.encode())]
                message["headers"] = headers + [(name, value) for name, value in extra if name not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(
    index: ImageIndex,
    thumb_dir: Path,
    *,
    limits: Limits | None = None,
    allowed_hosts: list[str] | None = None,
    credentials: Credentials | None = None,
) -> FastAPI:
    """The pixfind web app over ``index`` (kept open; the caller closes it).

    ``thumb_dir``: where thumbnails are cached. ``allowed_hosts``: Host header names accepted
    (None: any; :func:`serve` passes the loopback names when bound to loopback). ``credentials``:
    what every request must carry (None: nothing).
    """
    limits = limits or Limits()
    service = WebService(index, thumb_dir, limits)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        lifespan=lifespan,
        title="pixfind",
        version=__version__,
        docs_url=None,  # served below from the package: the default page loads Swagger UI from a CDN
        redoc_url=None,
        description="Find pictures by describing them. Hits have the shape of `pixfind search --json` "
        "plus `size` and `thumb`, `image` and `similar` URLs.",
    )
    app.state.pixfind = service
    # added innermost first: SecurityHeaders sees every answer, the Host check runs first
    app.add_middleware(
        UploadLimit,
        limit=limits.max_upload_bytes + MULTIPART_OVERHEAD_BYTES,
        file_limit=limits.max_upload_bytes,
        paths=("/api/search/image",),
    )
    app.add_middleware(AccessGuard, credentials=credentials)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    app.add_middleware(SecurityHeaders)

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
        if len(text) > MAX_QUERY_CHARS:
            raise ApiError(400, f"query too long: at most {MAX_QUERY_CHARS:,} characters")
        return text

    def check_k(k: int) -> int:
        if k > MAX_RESULTS:
            raise ApiError(400, f"bad request: k: at most {MAX_RESULTS:,} results")
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
        try:
            folder, k = check_under(request), check_k(k)
            started = time.perf_counter()
            if file.size is not None and file.size > limits.max_upload_bytes:
                raise ApiError(413, upload_too_large(limits.max_upload_bytes))
            if not file.size:
                raise ApiError(400, "not a usable image: the upload is empty")
            loop = asyncio.get_running_loop()
            image = await loop.run_in_executor(service.decoder, _decode_upload, file.file, limits)
            hits = await run_in_threadpool(service.call, index.search_image, image, limit=k, under=folder)
            return service.hits_json(hits, started)
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
        if target is None or not service.call(index.contains, target):
            raise ApiError(404, "not in the index: pass the path of an indexed image")
        started = time.perf_counter()
        hits = service.call(index.similar, target, limit=check_k(k), under=check_under(request))
        return service.hits_json(hits, started)

    @app.get("/api/info", summary="What the index holds, and this server's limits")
    def info() -> Response:
        data = dict(service.call(index.info))
        data.pop("token", None)
        data["random_weights"] = _random_weights(data)
        data["server"] = {
            "version": __version__,
            "thumb_size": limits.thumb_size,
            "max_upload_bytes": limits.max_upload_bytes,
            "max_upload_pixels": limits.max_upload_pixels,
            "max_upload_jpeg_pixels": limits.max_upload_jpeg_pixels,
            "max_query_chars": MAX_QUERY_CHARS,
            "max_results": MAX_RESULTS,
        }
        return AsciiJSONResponse(data, headers={"Cache-Control": "no-store"})

    @app.get("/api/thumb", summary="JPEG thumbnail of an indexed image")
    def thumb(request: Request, path: PathParam, v: VersionParam = None) -> Response:
        opened = service.indexed_file(raw_query_param(request, "path"))
        try:
            cache = _IMMUTABLE if v and v == opened.version else _REVALIDATE
            etag = _etag(opened, f"-t{limits.thumb_size}")
            if (cached := _not_modified(request, etag, cache)) is not None:
                return cached
            file = service.thumbnail(opened)
        finally:
            opened.close()
        return FileResponse(file, media_type="image/jpeg", headers={"Cache-Control": cache, "ETag": etag})

    @app.get("/api/image", summary="The original file of an indexed image, streamed")
    def image(request: Request, path: PathParam, v: VersionParam = None) -> Response:
        opened = service.indexed_file(raw_query_param(request, "path"))
        try:
            cache = _IMMUTABLE if v and v == opened.version else _REVALIDATE
            etag = _etag(opened)
            if (cached := _not_modified(request, etag, cache)) is not None:
                opened.close()
                return cached
            media_type = _image_media_type(opened)
            return FileResponse(
                opened.source,  # the file opened and checked above, not the path again
                media_type=media_type,
                stat_result=opened.stat,
                headers={"Cache-Control": cache, "ETag": etag},
                background=BackgroundTask(opened.close),
            )
        except BaseException:
            opened.close()
            raise

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _decode_upload(upload: IO[bytes], limits: Limits) -> Any:
    """An upload decoded at reduced size (in a worker thread); its pixel count is checked from
    the header first, so an image too large to search by costs nothing."""
    upload.seek(0)
    try:
        loaded = load_reduced(
            upload,
            min_side=QUERY_IMAGE_SIDE,
            max_pixels=limits.max_upload_pixels,
            max_jpeg_pixels=limits.max_upload_jpeg_pixels,
        )
    except ImageLoadError as exc:
        hint = ": a smaller copy finds the same pictures" if exc.reason.startswith("too large") else ""
        raise ApiError(400, f"not a usable image: {exc.reason}{hint}") from exc
    return loaded.image


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


@dataclass(frozen=True)
class Access:
    """How a server may be reached, and who may ask it: decided from where it listens."""

    loopback: bool
    allowed_hosts: list[str] | None
    credentials: Credentials | None
    lines: list[str]  # what to tell the person who started it


def decide_access(host: str, bound: str, port: int, password: str | None, no_auth: bool) -> Access:
    """Loopback: loopback Host names only, a password only when one is given. Any other address:
    a password always (``password``, ``$PIXFIND_SERVE_PASSWORD`` or one made up and shown once),
    unless ``no_auth`` says to share without one."""
    source = "--password-file"
    if password is None and os.environ.get(PASSWORD_ENV):
        password, source = check_password(os.environ[PASSWORD_ENV], PASSWORD_ENV), PASSWORD_ENV
    if password is not None and no_auth:
        raise PixfindError(f"--no-auth and a password ({source}) both given: choose one")
    loopback = is_loopback(bound)
    credentials = Credentials(password) if password is not None else None
    if loopback:
        allowed = loopback_host_names(host, bound)
        if credentials is None:
            line = "  only this computer can connect (--host 0.0.0.0 shares it on your network, with a password)"
        else:
            line = f"  only this computer can connect, as user {USER} with the password from {source}"
        return Access(True, allowed, credentials, [line])
    if credentials is not None:
        return Access(False, None, credentials, [f"  other computers can connect: user {USER}, password from {source}"])
    if no_auth:
        warning = (
            f"  other computers can connect WITHOUT a password (--no-auth): anyone who reaches port {port} "
            "sees every indexed picture"
        )
        return Access(False, None, None, [warning])
    made = Credentials.generate()
    return Access(
        False,
        None,
        made,
        [
            f"  other computers can connect: user {USER}, password {made.password}",
            f"  (to choose the password: {PASSWORD_ENV}=... or --password-file FILE)",
        ],
    )


def make_server(app: FastAPI, transport: TransportLimits | None = None, log_level: str = "warning") -> Any:
    """The uvicorn server for ``app``, with slow clients timed out and connections capped."""
    import uvicorn

    config = uvicorn.Config(
        app,
        http=guarded_protocol(transport or TransportLimits()),
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=3,
        server_header=False,
    )
    return uvicorn.Server(config)


def serve(
    settings: Settings | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    thumb_dir: Path | None = None,
    index: ImageIndex | None = None,
    limits: Limits | None = None,
    transport: TransportLimits | None = None,
    log_level: str = "warning",
    echo: Callable[[str], None] | None = None,
    exact: bool = False,
    password: str | None = None,
    no_auth: bool = False,
) -> None:
    """Run the web app until Ctrl+C. ``pixfind serve`` calls this. ``exact``: keep exact search
    on a large embedded index instead of :meth:`ImageIndex.optimize_for_queries`.

    ``settings``: where the index is (``Settings.from_env()`` when None). ``port`` 0 picks a free
    one. ``thumb_dir``: thumbnail cache (default: ``<cache dir>/thumbs``). ``index``: an index
    already open (it is closed on exit either way). ``password``/``no_auth``: see
    :func:`decide_access`. Raises :class:`PixfindError` for problems the user can fix (index locked
    or unreachable, port taken, a password too short).
    """
    from .config import Settings, cache_dir

    say = echo or (lambda line: print(line, flush=True))
    settings = settings or Settings.from_env()
    sock = bind_socket(host, port)
    try:
        bound, bound_port = sock.getsockname()[:2]
        access = decide_access(host, bound, bound_port, password, no_auth)
        index = index or open_index(settings)
    except BaseException:
        sock.close()
        if index is not None:
            index.close()
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
        app = create_app(
            index,
            thumb_dir or cache_dir() / "thumbs",
            limits=limits,
            allowed_hosts=access.allowed_hosts,
            credentials=access.credentials,
        )
        shown_host = f"[{host}]" if ":" in host else host
        if host in ("0.0.0.0", "::"):
            shown_host = "localhost"
        url = f"http://{shown_host}:{bound_port}/"
        images = f"{count:,} images" if isinstance(count, int) else "the index"
        say(f"pixfind: serving {images} from {where} at {url}")
        for line in access.lines:
            say(line)
        say(f"  API documentation: {url}docs · press Ctrl+C to stop")
        server = make_server(app, transport, log_level)
        _exit_cleanly_on_sigterm()
        with contextlib.suppress(KeyboardInterrupt), _announce(index, bound, bound_port, access.credentials):
            server.run(sockets=[sock])
    finally:
        sock.close()
        index.close()


def _exit_cleanly_on_sigterm() -> None:
    """uvicorn shuts down on SIGTERM, then re-raises it: make that an exit that runs ``finally``
    blocks (closing the index, removing the announcement) instead of an abrupt kill."""
    import signal
    import sys

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _announce(
    index: ImageIndex, bound: str, port: int, credentials: Credentials | None
) -> contextlib.AbstractContextManager[None]:
    """On an embedded index, tell other pixfind commands of this user where to send their queries
    (and, when this server asks for a password, the key that stands for it)."""
    if index.store.is_server:
        return contextlib.nullcontext()
    from .remote import announced

    local = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bound, bound)
    local = f"[{local}]" if ":" in local else local
    key = credentials.local_key if credentials else None
    return announced(index.store.uri, f"http://{local}:{port}/", index.settings.collection, key=key)


def main(argv: list[str] | None = None) -> int:
    """``python -m pixfind.web``: the same as ``pixfind serve``, for when the CLI is not at hand."""
    import argparse
    import sys

    from .config import Settings
    from .web_access import read_password_file

    parser = argparse.ArgumentParser(prog="python -m pixfind.web", description=serve.__doc__)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--uri")
    parser.add_argument("--token")
    parser.add_argument("--collection")
    parser.add_argument("--thumb-dir", type=Path)
    parser.add_argument("--password-file", type=Path)
    parser.add_argument("--no-auth", action="store_true")
    args = parser.parse_args(argv)
    settings = Settings.from_env(uri=args.uri, token=args.token, collection=args.collection)
    try:
        password = read_password_file(args.password_file) if args.password_file else None
        serve(settings, args.host, args.port, thumb_dir=args.thumb_dir, password=password, no_auth=args.no_auth)
    except PixfindError as exc:
        print(f"pixfind: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
