"""The web app of ``pixfind serve``: the page, the JSON API and the checks around them.

Routes are small functions on one router; what they ask of the index goes through the
:class:`~pixfind.web.service.WebService` that :func:`create_app` puts in ``app.state``. The query
checks are :mod:`pixfind.limits`' own (the command line forwards its queries here and must not
meet other limits); only how a refusal is answered (400) is decided here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

from fastapi import APIRouter, Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ..errors import PixfindError
from ..limits import DEFAULT_RESULTS, MAX_RESULTS, check_limit, check_query
from ..version import __version__
from .access import AccessGuard, Credentials
from .answers import ApiError, AsciiJSONResponse, validation_message
from .middleware import SecurityHeaders, UploadLimit
from .paths import MAX_PATH_CHARS, OpenedFile, raw_query_param
from .service import Limits, WebService, upload_too_large

if TYPE_CHECKING:
    from ..api import ImageIndex
    from ..search import Hit

STATIC_DIR = Path(str(resources.files("pixfind.web") / "static"))
#: What a multipart body may carry besides the file (boundaries, part headers, a long file name).
MULTIPART_OVERHEAD_BYTES = 64 * 1024

IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"

T = TypeVar("T")


def service_of(request: Request) -> WebService:
    return request.app.state.pixfind


Service = Annotated[WebService, Depends(service_of)]
KParam = Annotated[
    int,
    Query(
        description=f"number of hits (1 to {MAX_RESULTS:,})",
        json_schema_extra={"minimum": 1, "maximum": MAX_RESULTS},
    ),
]
UnderParam = Annotated[str | None, Query(description="only images under this folder (absolute path)")]
PathParam = Annotated[str, Query(description="absolute path of an indexed image")]
VersionParam = Annotated[str | None, Query(description="file version (from a hit's URL)")]
QueryParam = Annotated[str, Query(description="what the picture shows")]
UploadParam = Annotated[UploadFile, File(description="an image (limits: see /api/info)")]

router = APIRouter()


# -- request checks -------------------------------------------------------------------------------


def _refused_as_400(check: Callable[[T], T], value: T, prefix: str = "") -> T:
    """``check(value)``, with its one-line refusal answered as a 400."""
    try:
        return check(value)
    except PixfindError as exc:
        raise ApiError(400, f"{prefix}{exc}") from exc


def checked_query(q: str) -> str:
    return _refused_as_400(check_query, q)


def checked_k(k: int) -> int:
    return _refused_as_400(check_limit, k, "bad request: k: ")


def checked_under(request: Request) -> str | None:
    """The folder filter, read raw like paths so a name that is not UTF-8 cannot become another;
    the routes' ``under`` parameters are there to document it in the OpenAPI schema."""
    under = raw_query_param(request, "under")
    if under is None or not under.strip():
        return None
    folder = os.path.expanduser(under.strip())
    if "\x00" in folder or len(folder) > MAX_PATH_CHARS or not os.path.isabs(folder):
        raise ApiError(400, "folder filter must be an absolute path, e.g. /home/me/Pictures")
    return os.path.normpath(folder)


def hits_answer(hits: list[Hit], started: float) -> Response:
    elapsed = (time.perf_counter() - started) * 1000
    return AsciiJSONResponse(
        [WebService.hit_json(hit) for hit in hits],
        headers={"Server-Timing": f"search;dur={elapsed:.1f}", "Cache-Control": "no-store"},
    )


def _cache_control(opened: OpenedFile, v: str | None) -> str:
    """Hit URLs carry the file's version: such a URL never changes meaning, so it is cached for good."""
    return IMMUTABLE if v and v == opened.version else REVALIDATE


def _not_modified(request: Request, etag: str, cache_control: str) -> Response | None:
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": cache_control})
    return None


# -- the page -------------------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
def page() -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": REVALIDATE})


@router.get("/docs", include_in_schema=False)
def docs(request: Request) -> Response:
    # Swagger UI shipped in static/ (swagger-ui-dist, Apache-2.0): works without internet.
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url or "/openapi.json",
        title="pixfind API",
        swagger_js_url="/static/swagger-ui-bundle.js",
        swagger_css_url="/static/swagger-ui.css",
        swagger_favicon_url="/static/favicon.svg",
        swagger_ui_parameters={"validatorUrl": None},  # the default calls validator.swagger.io
    )


@router.get("/favicon.ico", include_in_schema=False)
def favicon() -> Response:
    return RedirectResponse("/static/favicon.svg", status_code=308)


# -- searching ------------------------------------------------------------------------------------


@router.get("/api/search", summary="Search by text")
def search(
    request: Request, service: Service, q: QueryParam, k: KParam = DEFAULT_RESULTS, under: UnderParam = None
) -> Response:
    text, folder, k = checked_query(q), checked_under(request), checked_k(k)
    started = time.perf_counter()
    return hits_answer(service.search(text, k, folder), started)


@router.post("/api/search/image", summary="Search by an uploaded image (multipart field `file`)")
async def search_image(
    request: Request, service: Service, file: UploadParam, k: KParam = DEFAULT_RESULTS, under: UnderParam = None
) -> Response:
    try:
        folder, k = checked_under(request), checked_k(k)
        started = time.perf_counter()
        limit = service.limits.max_upload_bytes
        if file.size is not None and file.size > limit:
            raise ApiError(413, upload_too_large(limit))
        if not file.size:
            raise ApiError(400, "not a usable image: the upload is empty")
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(service.decoder, service.decode_upload, file.file)
        hits = await run_in_threadpool(service.search_image, image, k, folder)
        return hits_answer(hits, started)
    finally:
        await file.close()


@router.get("/api/similar", summary="Images like one in the index (more like this)")
def similar(
    request: Request, service: Service, path: PathParam, k: KParam = DEFAULT_RESULTS, under: UnderParam = None
) -> Response:
    target = service.indexed_path(raw_query_param(request, "path"))
    started = time.perf_counter()
    return hits_answer(service.similar(target, checked_k(k), checked_under(request)), started)


@router.get("/api/info", summary="What the index holds, and this server's limits")
def info(service: Service) -> Response:
    return AsciiJSONResponse(service.info(), headers={"Cache-Control": "no-store"})


# -- indexed files --------------------------------------------------------------------------------


@router.get("/api/thumb", summary="JPEG thumbnail of an indexed image")
def thumb(request: Request, service: Service, path: PathParam, v: VersionParam = None) -> Response:
    opened = service.indexed_file(raw_query_param(request, "path"))
    try:
        cache = _cache_control(opened, v)
        etag = opened.etag(f"-t{service.limits.thumb_size}")
        if (cached := _not_modified(request, etag, cache)) is not None:
            return cached
        file = service.thumbnail(opened)
    finally:
        opened.close()
    return FileResponse(file, media_type="image/jpeg", headers={"Cache-Control": cache, "ETag": etag})


@router.get("/api/image", summary="The original file of an indexed image, streamed")
def image(request: Request, service: Service, path: PathParam, v: VersionParam = None) -> Response:
    opened = service.indexed_file(raw_query_param(request, "path"))
    try:
        cache = _cache_control(opened, v)
        etag = opened.etag()
        if (cached := _not_modified(request, etag, cache)) is not None:
            opened.close()
            return cached
        return FileResponse(
            opened.source,  # the file opened and checked above, not the path again
            media_type=opened.media_type(),
            stat_result=opened.stat,
            headers={"Cache-Control": cache, "ETag": etag},
            background=BackgroundTask(opened.close),
        )
    except BaseException:
        opened.close()
        raise


# -- the app --------------------------------------------------------------------------------------


async def _api_error(_: Request, exc: ApiError) -> Response:
    return AsciiJSONResponse({"detail": exc.message}, status_code=exc.status)


async def _bad_request(_: Request, exc: RequestValidationError) -> Response:
    return AsciiJSONResponse({"detail": validation_message(exc)}, status_code=400)


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
    (None: any; :func:`~pixfind.web.server.serve` passes the loopback names when bound to
    loopback). ``credentials``: what every request must carry (None: nothing).
    """
    limits = limits or Limits()
    service = WebService(index, thumb_dir, limits)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(
        lifespan=lifespan,
        title="pixfind",
        version=__version__,
        docs_url=None,  # served by the router from the package: the default page loads Swagger UI from a CDN
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
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _bad_request)  # type: ignore[arg-type]
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
