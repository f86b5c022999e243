"""Which file a request names, and serving it only as the index recorded it.

A requested path must be one the index could hold (absolute, normalised, an image extension), and
the file is opened once and that *open file* is checked against its index row: a regular file
with the row's size, mtime and fingerprint. Everything an answer needs is then read from that
open file, never through the name again, so a name swapped for a link mid-request serves nothing
else (docs/web.md, "Trust", says how this was attacked).
"""

from __future__ import annotations

import os
import stat
from typing import IO, TYPE_CHECKING
from urllib.parse import parse_qsl, quote

from fastapi import Request

from ..ingest.content import fingerprint
from .answers import ApiError

if TYPE_CHECKING:
    from ..store import StoredFile

#: Longest path accepted in a request (Linux PATH_MAX).
MAX_PATH_CHARS = 4096

NOT_INDEXED = "not found: only images in the index are served"
CHANGED = "not found: the file changed since it was indexed (run pixfind index on its folder)"


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


def version_of(path: str) -> str | None:
    """``size-mtime`` of a file: part of its URLs, so a changed file gets new ones."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _version(st)


def _version(st: os.stat_result) -> str:
    return f"{st.st_size:x}-{st.st_mtime_ns:x}"


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
        return _version(self.stat)

    def etag(self, extra: str = "") -> str:
        return f'"{self.version}{extra}"'

    def media_type(self) -> str:
        """The MIME type Pillow finds in the open file's header; a file it does not know is not served."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.source) as img:
                fmt = img.format
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            raise ApiError(404, "not found: the file is not an image any more") from None
        return Image.MIME.get(fmt or "", "application/octet-stream")

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
            raise ApiError(404, CHANGED)
        opened = OpenedFile(path, handle, info, record)
        if fingerprint(opened.source, info.st_size) != record.fingerprint:
            raise ApiError(404, CHANGED)
        return opened
    except ApiError:
        handle.close()
        raise
    except OSError:
        handle.close()
        raise ApiError(404, "not found: the file cannot be read") from None
