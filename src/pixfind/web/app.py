"""The web app of ``pixfind serve``: the page, the JSON API and the checks around them.

Routes are small functions on one router; what they ask of the index goes through the
:class:`~pixfind.web.service.WebService` that :func:`create_app` puts in ``app.state``. The query
checks are :mod:`pixfind.limits`' own (the command line forwards its queries here and must not
meet other limits); only how a refusal is answered (400) is decided here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ..duplicates import DEFAULT_THRESHOLD, check_threshold
from ..errors import PixfindError
from ..filters import Filters
from ..limits import DEFAULT_RESULTS, MAX_QUERY_TERMS, MAX_RESULTS, check_limit, check_min_score, check_query
from ..query import Term, check_terms, parse_query
from ..version import __version__
from .access import AccessGuard, Credentials
from .answers import ApiError, AsciiJSONResponse, validation_message
from .jobs import MAX_GROUPS_PER_ANSWER
from .middleware import SecurityHeaders, UploadLimit
from .paths import MAX_PATH_CHARS, OpenedFile, raw_query_param
from .service import Limits, WebService, upload_too_large

if TYPE_CHECKING:
    from PIL import Image

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
QueryParam = Annotated[
    str, Query(description='what the picture shows; terms combine with " + " and " - " (spaces around)')
]
UploadParam = Annotated[UploadFile, File(description="an image (limits: see /api/info)")]
NotParam = Annotated[
    list[str] | None, Query(alias="not", description="words the pictures should not show (repeatable)")
]
MinScoreParam = Annotated[float | None, Query(description="only hits at or above this cosine (-1 to 1)")]
AllParam = Annotated[bool, Query(alias="all", description="every copy of a file, not one hit per content")]
CombineParam = Annotated[bool, Query(description='false: search for `q` as written, " - " included')]
TermsParam = Annotated[
    str,
    Form(
        description='JSON list of terms in order: {"sign": 1 or -1, and one of "text": words, '
        '"image": number of the file part (0 first), "similar": path of an indexed image}'
    ),
]
FilesParam = Annotated[list[UploadFile] | None, File(description="the images the terms number (limits: see /api/info)")]


def filter_params(
    after: Annotated[str | None, Query(description="only photos taken on this day or later (YYYY-MM-DD)")] = None,
    before: Annotated[
        str | None, Query(description="only photos taken on this day or earlier, the day included (YYYY-MM-DD)")
    ] = None,
    camera: Annotated[
        str | None, Query(description="only photos from a camera whose make/model have words starting with these")
    ] = None,
    file_type: Annotated[
        str | None,
        Query(alias="type", description="only these types, comma-separated: jpeg, png, webp, gif, bmp, tiff"),
    ] = None,
    orientation: Annotated[str | None, Query(description="landscape, portrait or square")] = None,
    min_width: Annotated[int | None, Query(description="only images at least this wide (pixels)")] = None,
    min_height: Annotated[int | None, Query(description="only images at least this tall (pixels)")] = None,
) -> Filters:
    """The filters on what a photo is (:mod:`pixfind.filters`), checked; a bad one is a 400."""
    return _refused_as_400(
        lambda _: Filters.of(
            after=after,
            before=before,
            camera=camera,
            types=file_type,
            orientation=orientation,
            min_width=min_width,
            min_height=min_height,
        ),
        None,
        "bad request: ",
    )


FiltersParam = Annotated[Filters, Depends(filter_params)]

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


def search_options(min_score: float | None, all_copies: bool, filters: Filters | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "min_score": _refused_as_400(check_min_score, min_score, "bad request: min_score: "),
        "all_copies": all_copies,
    }
    if filters:
        options["filters"] = filters
    return options


def not_terms(nots: list[str] | None) -> list[Term]:
    """The ``not`` words alone, as terms to take away from an image search (none when all are blank)."""
    return text_terms(None, nots) if nots and any(word.strip() for word in nots) else []


def text_terms(q: str | None, nots: list[str] | None, combine: bool = True) -> list[Term]:
    """The terms of ``q`` and of the ``not`` words; image paths are refused: this server reads
    only the files it indexed, and a query image comes as an upload."""
    terms = _refused_as_400(lambda text: parse_query(text, combine), q) if q is not None else []
    if any(term.image is not None for term in terms):
        raise ApiError(
            400,
            "image terms are not read from the server's disk: upload the image (POST /api/search/terms) "
            "or write the term without a leading / ./ ../ ~/",
        )
    terms += [Term(text=_refused_as_400(check_query, word), sign=-1) for word in nots or [] if word.strip()]
    return _refused_as_400(check_terms, terms)


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
    request: Request,
    service: Service,
    filters: FiltersParam,
    q: QueryParam,
    k: KParam = DEFAULT_RESULTS,
    under: UnderParam = None,
    nots: NotParam = None,
    min_score: MinScoreParam = None,
    all_copies: AllParam = False,
    combine: CombineParam = True,
) -> Response:
    checked_query(q)
    terms, folder, k = text_terms(q, nots, combine), checked_under(request), checked_k(k)
    options = search_options(min_score, all_copies, filters)
    started = time.perf_counter()
    return hits_answer(service.search_terms(terms, k, folder, **options), started)


@router.post("/api/search/image", summary="Search by an uploaded image (multipart field `file`)")
async def search_image(
    request: Request,
    service: Service,
    filters: FiltersParam,
    file: UploadParam,
    k: KParam = DEFAULT_RESULTS,
    under: UnderParam = None,
    nots: NotParam = None,
    min_score: MinScoreParam = None,
    all_copies: AllParam = False,
) -> Response:
    try:
        folder, k = checked_under(request), checked_k(k)
        options = search_options(min_score, all_copies, filters)
        subtract = not_terms(nots)
        started = time.perf_counter()
        image = await decoded_upload(service, file)
        hits = await run_in_threadpool(service.search_image, image, k, folder, subtract=subtract, **options)
        return hits_answer(hits, started)
    finally:
        await file.close()


@router.post("/api/search/terms", summary="Search by a combination of words, uploaded images and indexed images")
async def search_terms(
    request: Request,
    service: Service,
    filters: FiltersParam,
    terms: TermsParam,
    file: FilesParam = None,
    k: KParam = DEFAULT_RESULTS,
    under: UnderParam = None,
    min_score: MinScoreParam = None,
    all_copies: AllParam = False,
) -> Response:
    uploads = file or []
    try:
        folder, k = checked_under(request), checked_k(k)
        options = search_options(min_score, all_copies, filters)
        described = described_terms(terms, len(uploads))
        started = time.perf_counter()
        images = [await decoded_upload(service, upload) for upload in uploads]
        built = [built_term(service, item, images) for item in described]
        hits = await run_in_threadpool(service.search_terms, _refused_as_400(check_terms, built), k, folder, **options)
        return hits_answer(hits, started)
    finally:
        for upload in uploads:
            await upload.close()


@router.get("/api/similar", summary="Images like one in the index (more like this; never the image itself)")
def similar(
    request: Request,
    service: Service,
    filters: FiltersParam,
    path: PathParam,
    k: KParam = DEFAULT_RESULTS,
    under: UnderParam = None,
    nots: NotParam = None,
    min_score: MinScoreParam = None,
    all_copies: AllParam = False,
) -> Response:
    target = service.indexed_path(raw_query_param(request, "path"))
    options = search_options(min_score, all_copies, filters)
    subtract = not_terms(nots)
    started = time.perf_counter()
    hits = service.similar(target, checked_k(k), checked_under(request), subtract=subtract, **options)
    return hits_answer(hits, started)


async def decoded_upload(service: WebService, file: UploadFile) -> Image.Image:
    """An uploaded image, its size checked, decoded reduced on the upload thread."""
    limit = service.limits.max_upload_bytes
    if file.size is not None and file.size > limit:
        raise ApiError(413, upload_too_large(limit))
    if not file.size:
        raise ApiError(400, "not a usable image: the upload is empty")
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(service.decoder, service.decode_upload, file.file)


def described_terms(raw: str, files: int) -> list[dict[str, Any]]:
    """The ``terms`` field, checked for shape before any upload is decoded."""
    try:
        items = json.loads(raw)
    except ValueError:
        items = None
    shapes_ok = isinstance(items, list) and all(
        isinstance(item, dict)
        and item.get("sign", 1) in (1, -1)
        and len(set(item) & {"text", "image", "similar"}) == 1
        and (not isinstance(item.get("image"), bool) and isinstance(item.get("image", 0), int))
        and all(isinstance(item.get(name, ""), str) for name in ("text", "similar"))
        for item in items
    )
    if not shapes_ok:
        raise ApiError(400, 'bad request: terms: a JSON list of {"sign": 1 or -1, "text"|"image"|"similar": ...}')
    assert isinstance(items, list)
    if len(items) > MAX_QUERY_TERMS or files > MAX_QUERY_TERMS:
        raise ApiError(400, f"too many terms in the query (limit {MAX_QUERY_TERMS})")
    numbers = sorted(item["image"] for item in items if "image" in item)
    if numbers != list(range(files)):
        raise ApiError(400, "bad request: terms: each uploaded file is named once, by its number (0 first)")
    return items


def built_term(service: WebService, item: dict[str, Any], images: list[Image.Image]) -> Term:
    sign = int(item.get("sign", 1))
    if "text" in item:
        return Term(text=_refused_as_400(check_query, item["text"]), sign=sign)
    if "image" in item:
        return Term(image=images[item["image"]], sign=sign)
    return Term(indexed=service.indexed_path(item["similar"]), sign=sign)


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


# -- duplicates and the live index ----------------------------------------------------------------

ThresholdParam = Annotated[
    float | None, Query(description="cosine at or above which two images are duplicates (0 to 1; default 0.95)")
]
OffsetParam = Annotated[int, Query(ge=0, description="groups to leave out (the page asks for the next ones)")]
GroupsParam = Annotated[int, Query(ge=1, le=MAX_GROUPS_PER_ANSWER, description="groups in this answer at most")]


def job_answer(service: WebService, status: int = 200, offset: int = 0, limit: int = MAX_GROUPS_PER_ANSWER) -> Response:
    data = service.duplicates.status.to_dict(offset, limit)
    data["default_threshold"] = DEFAULT_THRESHOLD
    return AsciiJSONResponse(data, status_code=status, headers={"Cache-Control": "no-store"})


@router.post(
    "/api/duplicates",
    summary="Start looking for duplicates (one run at a time; 409 with the running one's state while it runs)",
    status_code=202,
)
def start_duplicates(
    request: Request, service: Service, threshold: ThresholdParam = None, under: UnderParam = None
) -> Response:
    limit = _refused_as_400(check_threshold, DEFAULT_THRESHOLD if threshold is None else threshold, "bad request: ")
    started = service.duplicates.start(limit, checked_under(request))
    return job_answer(service, 202 if started else 409)


@router.get("/api/duplicates", summary="How the duplicates run goes; once done, its groups (largest file first)")
def duplicates_state(service: Service, offset: OffsetParam = 0, limit: GroupsParam = 100) -> Response:
    return job_answer(service, offset=offset, limit=limit)


@router.delete("/api/duplicates", summary="Cancel the duplicates run (it stops after the batch in hand)")
def cancel_duplicates(service: Service) -> Response:
    service.duplicates.cancel()
    return job_answer(service)


@router.get("/api/watch", summary="What `pixfind serve --watch` is doing (active: false without --watch)")
def watch_state(service: Service) -> Response:
    data = {"active": False} if service.watch_state is None else {"active": True, **service.watch_state()}
    return AsciiJSONResponse(data, headers={"Cache-Control": "no-store"})


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
    app.add_middleware(
        UploadLimit,
        limit=(limits.max_upload_bytes + MULTIPART_OVERHEAD_BYTES) * MAX_QUERY_TERMS,
        file_limit=limits.max_upload_bytes,
        paths=("/api/search/terms",),
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
