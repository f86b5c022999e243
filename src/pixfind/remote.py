"""Reuse a running ``pixfind serve``: it holds the model and the embedded index, so ``pixfind
search`` and ``pixfind info`` ask it instead of opening the index themselves.

A Milvus Lite file can be open in one process only. While ``pixfind serve`` runs on it, another
command could not open the file at all (and a server never finishes); asking the server instead
answers at once (no model to load, no Milvus to start). ``pixfind serve`` announces itself
in a side file next to the index (``INDEX.db.serve.json``: pid, URL, collection, and the key that
stands for its password when it has one), readable by its user only, and removes it on exit. A
stale file (dead pid), or one that another user owns or could have written, is ignored.

A query image is decoded here, reduced as the server would (:data:`~pixfind.limits.QUERY_IMAGE_SIDE`)
and sent as a PNG: any image this command can read can be searched by, whatever the server's
upload limits, and only a small file travels.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from .errors import PixfindError
from .limits import MAX_UPLOAD_PIXELS, QUERY_IMAGE_SIDE

if TYPE_CHECKING:
    from .filters import Filters
    from .query import Term
    from .search import Hit  # imported when used: numpy and Pillow must not delay a cold search

TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RunningServer:
    """A live ``pixfind serve`` on this index: where, and the key it asks of local commands."""

    url: str
    key: str | None = None
    random_weights: bool = False
    """The index was built with random weights: its rankings mean nothing (said on stderr)."""


def announce_path(db_uri: str) -> Path:
    db = Path(db_uri).expanduser().absolute()
    return db.with_name(db.name + ".serve.json")


@contextlib.contextmanager
def announced(
    db_uri: str, url: str, collection: str, key: str | None = None, random_weights: bool = False
) -> Iterator[None]:
    """Advertise a running server for ``db_uri`` while the block runs (file mode 0600)."""
    path = announce_path(db_uri)
    record = {"pid": os.getpid(), "url": url, "collection": collection, "key": key, "random_weights": random_weights}
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")  # mode 0600
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh)
        os.replace(tmp, path)
    except OSError:
        yield  # an unwritable folder only costs the speed-up
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()


def find_server(db_uri: str, collection: str) -> RunningServer | None:
    """The live ``pixfind serve`` of this user on this index and collection, or None."""
    try:
        data = _read_own_file(announce_path(db_uri))
        pid, url = int(data["pid"]), str(data["url"])
        key = data.get("key")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if data.get("collection") != collection or not _alive(pid) or not url.startswith("http://"):
        return None
    return RunningServer(url, str(key) if key else None, data.get("random_weights") is True)


def _read_own_file(path: Path) -> dict[str, Any]:
    """JSON from ``path`` if this user owns it and nobody else may write it (else ValueError):
    another user's file could send this user's queries, and images, to a server of theirs."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise ValueError("not this user's announcement")
        data = json.loads(fh.read(64 * 1024))
    if not isinstance(data, dict):
        raise ValueError("not an announcement")
    return data


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError also means: it exists (another user's process)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


# -- asking it -------------------------------------------------------------------------------------


def search(
    server: RunningServer,
    *,
    text: str | None = None,
    similar: str | None = None,
    limit: int = 10,
    under: str | None = None,
    combine: bool = True,
    min_score: float | None = None,
    all_copies: bool = False,
    filters: Filters | None = None,
) -> list[Hit]:
    """Ask the server; errors come back as :class:`~pixfind.errors.PixfindError` lines."""
    params: list[tuple[str, str]] = [("k", str(limit)), *_options(min_score, all_copies, filters)]
    if text is not None:
        endpoint = "api/search"
        params.append(("q", text))
        if not combine:
            params.append(("combine", "false"))
    else:
        endpoint = "api/similar"
    query = urlencode(params)
    if similar is not None:
        query += "&path=" + quote(os.fsencode(similar), safe="")
    query += _under(under)
    return [_hit(item) for item in _request(server, f"{endpoint}?{query}")]


def search_image(
    server: RunningServer,
    image: str | Path,
    *,
    limit: int = 10,
    under: str | None = None,
    min_score: float | None = None,
    all_copies: bool = False,
    filters: Filters | None = None,
) -> list[Hit]:
    """Images like the file ``image``: decoded here, sent reduced (see the module's docstring)."""
    boundary = _boundary()
    body = _file_part(boundary, image) + f"--{boundary}--\r\n".encode()
    query = urlencode([("k", str(limit)), *_options(min_score, all_copies, filters)]) + _under(under)
    items = _request(
        server,
        f"api/search/image?{query}",
        body=body,
        content_type=f"multipart/form-data; boundary={boundary}",
    )
    return [_hit(item) for item in items]


def search_terms(
    server: RunningServer,
    terms: Sequence[Term],
    *,
    limit: int = 10,
    under: str | None = None,
    min_score: float | None = None,
    all_copies: bool = False,
    filters: Filters | None = None,
) -> list[Hit]:
    """A combined query with image terms: each image file decoded here and sent reduced, as
    :func:`search_image` does, with the terms in order (``POST /api/search/terms``)."""
    boundary = _boundary()
    described: list[dict[str, object]] = []
    files = b""
    for term in terms:
        if term.text is not None:
            described.append({"sign": term.sign, "text": term.text})
        elif isinstance(term.image, (str, Path)):
            described.append({"sign": term.sign, "image": len(described)})
            files += _file_part(boundary, term.image)
        else:
            raise PixfindError("only texts and image files can be sent to a running pixfind serve")
    images = [item for item in described if "image" in item]
    for number, item in enumerate(images):
        item["image"] = number  # the number of the file part, in order
    head = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="terms"\r\nContent-Type: application/json\r\n\r\n'
        ).encode()
        + json.dumps(described).encode()
        + b"\r\n"
    )
    body = head + files + f"--{boundary}--\r\n".encode()
    query = urlencode([("k", str(limit)), *_options(min_score, all_copies, filters)]) + _under(under)
    items = _request(
        server, f"api/search/terms?{query}", body=body, content_type=f"multipart/form-data; boundary={boundary}"
    )
    return [_hit(item) for item in items]


def _options(min_score: float | None, all_copies: bool, filters: Filters | None = None) -> list[tuple[str, str]]:
    params = [("min_score", repr(min_score))] if min_score is not None else []
    params += filters.params() if filters else []
    return params + ([("all", "true")] if all_copies else [])


def info(server: RunningServer) -> dict[str, Any]:
    """``ImageIndex.info()`` as the server reports it (without its own fields)."""
    data = _request(server, "api/info")
    if not isinstance(data, dict):
        raise PixfindError(f"the running pixfind serve at {server.url} gave an unexpected answer")
    data.pop("server", None)
    data.pop("random_weights", None)
    return data


def _under(under: str | None) -> str:
    return "&under=" + quote(os.fsencode(under), safe="") if under else ""


def _boundary() -> str:
    return "pixfind-" + secrets.token_hex(16)


def _file_part(boundary: str, image: str | Path) -> bytes:
    """One multipart ``file`` part: the image decoded here, reduced, as a PNG."""
    import io

    from .ingest.decode import ImageLoadError, load_image

    if Path(image).is_dir():
        raise PixfindError(f"query image {image} is a folder: give an image file")
    if not Path(image).is_file():
        raise PixfindError(f"query image not found: {image}")
    try:
        loaded = load_image(image, min_side=QUERY_IMAGE_SIDE)
    except ImageLoadError as exc:
        raise PixfindError(f"cannot read query image {image}: {exc.reason}") from exc
    small = loaded.image
    if small.width * small.height > MAX_UPLOAD_PIXELS:  # a very long panorama, even reduced
        scale = (MAX_UPLOAD_PIXELS / (small.width * small.height)) ** 0.5
        small = small.resize((int(small.width * scale), int(small.height * scale)))
    png = io.BytesIO()
    small.save(png, "PNG", compress_level=1)
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="query.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    return head + png.getvalue() + b"\r\n"


def _request(server: RunningServer, path: str, body: bytes | None = None, content_type: str | None = None) -> Any:
    from urllib.error import HTTPError, URLError
    from urllib.request import Request, urlopen

    address = f"{server.url.rstrip('/')}/{path}"
    headers = {"Accept": "application/json"}
    if server.key:
        headers["Authorization"] = f"Bearer {server.key}"
    if content_type:
        headers["Content-Type"] = content_type
    request = Request(address, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urlopen(request, timeout=TIMEOUT_S) as response:
            return json.loads(response.read())
    except HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", exc.reason)
        except (ValueError, AttributeError):
            detail = exc.reason
        raise PixfindError(f"{detail}") from exc
    except (URLError, TimeoutError, OSError, ValueError) as exc:
        raise PixfindError(f"the running pixfind serve at {server.url} did not answer: {exc}") from exc


def _hit(item: dict[str, object]) -> Hit:
    from .search import Hit

    return Hit(
        rank=int(item["rank"]),  # type: ignore[arg-type]
        score=float(item["score"]),  # type: ignore[arg-type]
        path=str(item["path"]),
        width=int(item.get("width", 0)),  # type: ignore[arg-type]
        height=int(item.get("height", 0)),  # type: ignore[arg-type]
        size=int(item.get("size", 0)),  # type: ignore[arg-type]
        copies=int(item.get("copies", 1)),  # type: ignore[arg-type]
        copy_paths=tuple(str(path) for path in item.get("copy_paths", ()) or ()),  # type: ignore[attr-defined]
        taken=_text_or_none(item.get("taken")),
        taken_from=_text_or_none(item.get("taken_from")),
        camera=_text_or_none(item.get("camera")),
        type=_text_or_none(item.get("type")),
    )


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
