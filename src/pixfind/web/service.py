"""The state behind the routes: one index and its lock, the thumbnail cache, the upload decoder.

The app holds a single :class:`~pixfind.api.ImageIndex` for its lifetime (an embedded Milvus Lite
file can be opened by one process only, and one model is enough) and serialises calls into it with
a lock, so any number of browsers can search at once. Thumbnail work runs beside searches, at most
one per core; uploads are decoded one at a time, on one thread of their own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..config import ModelSpec, cpu_cores
from ..errors import PixfindError, StoreError
from ..ingest.decode import MAX_PIXELS, ImageLoadError, has_image_extension, load_reduced
from ..limits import (
    MAX_QUERY_CHARS,
    MAX_RESULTS,
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_JPEG_PIXELS,
    MAX_UPLOAD_PIXELS,
    QUERY_IMAGE_SIDE,
)
from ..pathkeys import key_of
from ..version import __version__
from .answers import ApiError
from .jobs import DuplicatesJob
from .paths import NOT_INDEXED, OpenedFile, clean_path, open_indexed, path_query, version_of

if TYPE_CHECKING:
    from PIL import Image

    from ..api import ImageIndex
    from ..query import Term
    from ..search import Hit
    from ..store import StoredFile

#: Longest side of a thumbnail, in pixels.
THUMB_SIZE = 256
THUMB_QUALITY = 82
#: Uploads decoded at once (threads kept for it): decoding is where an upload costs memory, and
#: searches are serialised by the index lock anyway.
UPLOAD_DECODES = 1


@dataclass(frozen=True)
class Limits:
    """This server's own limits; the query limits are :mod:`pixfind.limits`' (shared with the CLI)."""

    thumb_size: int = THUMB_SIZE
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_upload_pixels: int = MAX_UPLOAD_PIXELS
    max_upload_jpeg_pixels: int = MAX_UPLOAD_JPEG_PIXELS
    upload_decodes: int = UPLOAD_DECODES


def upload_too_large(limit: int) -> str:
    return f"upload too large: the limit is {limit / (1024 * 1024):g} MiB"


STOP_CHECK_S = 0.2  # how often a call waiting for the index looks whether the server stops


class WebService:
    """What the routes ask of the index, serialised, with index errors turned into HTTP statuses."""

    def __init__(self, index: ImageIndex, thumb_dir: Path, limits: Limits) -> None:
        self.index = index
        self.thumb_dir = Path(thumb_dir)
        self.limits = limits
        self.lock = threading.Lock()  # one Milvus client and one model: one call at a time
        self.waiting = 0  # calls waiting for the lock: a long run lets them all go first
        self._waiting_guard = threading.Lock()
        #: Set when the server begins to stop: a call still waiting for the lock answers 503 then,
        #: rather than be cancelled by the server's grace period.
        self.stopping = threading.Event()
        self.thumb_slots = threading.BoundedSemaphore(cpu_cores())
        # Decoding is what an upload costs in memory: a few at a time, always on the same threads,
        # so memory one decode freed is reused by the next (each thread has its own malloc arena).
        self.decoder = ThreadPoolExecutor(limits.upload_decodes, thread_name_prefix="pixfind-upload")
        self.watch_state: Callable[[], dict[str, Any]] | None = None  # set by `pixfind serve --watch`
        self.duplicates = DuplicatesJob(index, self.lock, waiting=lambda: self.waiting)

    def begin_stop(self) -> None:
        """The server begins to stop: calls waiting for the index answer 503, a duplicates run
        ends at its next batch."""
        self.stopping.set()
        self.duplicates.cancel()

    def close(self) -> None:
        self.duplicates.cancel(wait=True)  # at the next batch; the index is closed after this
        self.decoder.shutdown(wait=False, cancel_futures=True)

    # -- index calls, serialised

    def call(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``func`` under the index lock; Milvus unreachable is a 503, anything else the index
        cannot answer (an empty index, say) a 409."""
        try:
            with self.index_turn():
                return func(*args, **kwargs)
        except StoreError as exc:
            raise ApiError(503, str(exc)) from exc
        except PixfindError as exc:
            raise ApiError(409, str(exc)) from exc

    @contextlib.contextmanager
    def index_turn(self) -> Iterator[None]:
        """The index lock, counted in :attr:`waiting` until it is held."""
        with self._waiting_guard:
            self.waiting += 1
        try:
            while not self.lock.acquire(timeout=STOP_CHECK_S):
                if self.stopping.is_set():
                    raise ApiError(503, "pixfind is stopping: ask again once it is back")
        finally:
            with self._waiting_guard:
                self.waiting -= 1
        try:
            yield
        finally:
            self.lock.release()

    def search_image(self, image: Image.Image, k: int, under: str | None, **options: Any) -> list[Hit]:
        return self.call(self.index.search_image, image, limit=k, under=under, **options)

    def search_terms(self, terms: list[Term], k: int, under: str | None, **options: Any) -> list[Hit]:
        return self.call(self.index.search_terms, terms, limit=k, under=under, **options)

    def indexed_path(self, raw: str | None) -> str:
        """The path a "more like this" request names, when the index holds it; a 404 otherwise."""
        target = clean_path(raw)
        if target is None or not self.call(self.index.contains, target):
            raise ApiError(404, "not in the index: pass the path of an indexed image")
        return target

    def similar(self, path: str, k: int, under: str | None, **options: Any) -> list[Hit]:
        return self.call(self.index.similar, path, limit=k, under=under, **options)

    def info(self) -> dict[str, Any]:
        """``ImageIndex.info()`` without the token, plus ``random_weights`` and this server's limits."""
        data = dict(self.call(self.index.info))
        data.pop("token", None)
        data["random_weights"] = random_weights(data)
        data["server"] = {
            "version": __version__,
            "thumb_size": self.limits.thumb_size,
            "max_upload_bytes": self.limits.max_upload_bytes,
            "max_upload_pixels": self.limits.max_upload_pixels,
            "max_upload_jpeg_pixels": self.limits.max_upload_jpeg_pixels,
            "max_query_chars": MAX_QUERY_CHARS,
            "max_results": MAX_RESULTS,
        }
        if self.watch_state is not None:
            data["watch"] = self.watch_state()
        return data

    # -- indexed files

    def record(self, path: str) -> StoredFile | None:
        """The index row's record of exactly ``path``, asked afresh (a removal counts at once)."""
        store = self.index.store
        key = key_of(path)
        return self.call(lambda: store.lookup([key]).get(key) if store.exists() else None)

    def indexed_file(self, raw: str | None) -> OpenedFile:
        """The requested indexed image, opened and checked, or a 404."""
        path = clean_path(raw)
        if path is None or not has_image_extension(os.path.basename(path)):
            raise ApiError(404, NOT_INDEXED)
        record = self.record(path)
        if record is None:
            raise ApiError(404, NOT_INDEXED)
        return open_indexed(path, record)

    # -- answers

    @staticmethod
    def hit_json(hit: Hit) -> dict[str, Any]:
        """A hit as ``pixfind search --json`` writes it, plus ``size`` and the URLs the page uses."""
        data = hit.to_dict()
        data["size"] = int(hit.size)
        query = path_query(hit.path)
        version = version_of(hit.path)
        suffix = f"&v={version}" if version else ""
        data["thumb"] = f"/api/thumb?path={query}{suffix}"
        data["image"] = f"/api/image?path={query}{suffix}"
        data["similar"] = f"/api/similar?path={query}"
        return data

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
            if not target.is_file():
                _write_thumbnail(opened, size, target)
        return target

    def decode_upload(self, upload: IO[bytes]) -> Image.Image:
        """An upload decoded at reduced size (in a worker thread); its pixel count is checked from
        the header first, so an image too large to search by costs nothing."""
        upload.seek(0)
        try:
            loaded = load_reduced(
                upload,
                min_side=QUERY_IMAGE_SIDE,
                max_pixels=self.limits.max_upload_pixels,
                max_jpeg_pixels=self.limits.max_upload_jpeg_pixels,
            )
        except ImageLoadError as exc:
            hint = ": a smaller copy finds the same pictures" if exc.reason.startswith("too large") else ""
            raise ApiError(400, f"not a usable image: {exc.reason}{hint}") from exc
        return loaded.image


def _write_thumbnail(opened: OpenedFile, size: int, target: Path) -> None:
    """Decode reduced, shrink and write atomically: a reader never sees half a JPEG."""
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


def random_weights(info: dict[str, Any]) -> bool:
    """Was the index built with random weights (``--pretrained none``)? Its rankings mean nothing."""
    if not info.get("exists") or "model" not in info:
        return False
    spec = ModelSpec.from_weights(str(info["model"]), str(info.get("weights", "")))
    return spec.pretrained is None and spec.checkpoint is None
