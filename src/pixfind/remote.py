"""Reuse a running ``pixfind serve``: it holds the model and the embedded index, so a command-line
search can ask it instead of opening the index itself.

A Milvus Lite file can be open in one process only. While ``pixfind serve`` runs on it, a
``pixfind search`` in another terminal could not open the file at all; asking the server instead
answers in a fraction of a second (no model, no Milvus start). ``pixfind serve`` announces itself
in a side file next to the index (``INDEX.db.serve.json``: pid, URL, collection) and removes it on
exit; a stale file (dead pid) is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode

if TYPE_CHECKING:
    from .search import Hit  # imported when used: numpy and Pillow must not delay a cold search

#: Most results the web API returns per query; larger ``-k`` searches open the index locally.
REMOTE_MAX_RESULTS = 200
TIMEOUT_S = 30.0


def announce_path(db_uri: str) -> Path:
    db = Path(db_uri).expanduser().absolute()
    return db.with_name(db.name + ".serve.json")


@contextlib.contextmanager
def announced(db_uri: str, url: str, collection: str) -> Iterator[None]:
    """Advertise a running server for ``db_uri`` while the block runs."""
    path = announce_path(db_uri)
    try:
        path.write_text(json.dumps({"pid": os.getpid(), "url": url, "collection": collection}))
    except OSError:
        yield  # an unwritable folder only costs the speed-up
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()


def find_server(db_uri: str, collection: str) -> str | None:
    """URL of a live ``pixfind serve`` on this index and collection, or None."""
    try:
        data = json.loads(announce_path(db_uri).read_text())
        pid, url = int(data["pid"]), str(data["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if data.get("collection") != collection or not _alive(pid):
        return None
    return url


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError also means: it exists (another user's process)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def search(
    url: str, *, text: str | None = None, similar: str | None = None, limit: int = 10, under: str | None = None
) -> list[Hit]:
    """Ask the server; errors come back as :class:`~pixfind.errors.PixfindError` lines."""
    params: list[tuple[str, str]] = [("k", str(limit))]
    if text is not None:
        endpoint = "api/search"
        params.append(("q", text))
    else:
        endpoint = "api/similar"
    query = urlencode(params)
    if similar is not None:
        query += "&path=" + quote(os.fsencode(similar), safe="")
    if under:
        query += "&under=" + quote(os.fsencode(under), safe="")
    return [_hit(item) for item in _get_json(f"{url.rstrip('/')}/{endpoint}?{query}")]


def _get_json(address: str) -> list[dict[str, object]]:
    from urllib.error import HTTPError, URLError
    from urllib.request import urlopen

    from .errors import PixfindError

    try:
        with urlopen(address, timeout=TIMEOUT_S) as response:
            return json.loads(response.read())
    except HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", exc.reason)
        except ValueError:
            detail = exc.reason
        raise PixfindError(f"{detail}") from exc
    except (URLError, TimeoutError, OSError) as exc:
        raise PixfindError(f"the running pixfind serve at {address.split('/api')[0]} did not answer: {exc}") from exc


def _hit(item: dict[str, object]) -> Hit:
    from .search import Hit

    return Hit(
        rank=int(item["rank"]),  # type: ignore[arg-type]
        score=float(item["score"]),  # type: ignore[arg-type]
        path=str(item["path"]),
        width=int(item.get("width", 0)),  # type: ignore[arg-type]
        height=int(item.get("height", 0)),  # type: ignore[arg-type]
        size=int(item.get("size", 0)),  # type: ignore[arg-type]
    )
