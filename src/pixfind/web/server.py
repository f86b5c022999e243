"""Running the web app: the listening socket, uvicorn with its guards, and the announcement
that lets other pixfind commands of this user ask the running server.

What can go wrong at start (port taken, index locked or unreachable, a short password) is found
before the server says where it listens, and is one :class:`~pixfind.errors.PixfindError`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PixfindError
from .access import Credentials, decide_access
from .app import create_app
from .service import Limits
from .transport import TransportLimits, guarded_protocol

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..api import ImageIndex
    from ..config import Settings
    from ..ingest.watch import Watcher

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def open_index(settings: Settings) -> ImageIndex:
    """The index ``settings`` name, with the model the collection records."""
    from ..api import ImageIndex

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


def make_server(
    app: FastAPI,
    transport: TransportLimits | None = None,
    log_level: str = "warning",
    on_stop: Sequence[Callable[[], None]] = (),
) -> Any:
    """The uvicorn server for ``app``, with slow clients timed out and connections capped.
    ``on_stop``: called as soon as a stop is asked (Ctrl+C, SIGTERM), before the server's grace
    period for requests in flight, so that work holding them up (a watch's batch, a request waiting
    for the index) ends within it."""
    import uvicorn

    class Server(uvicorn.Server):  # type: ignore[misc]
        def handle_exit(self, sig: int, frame: Any) -> None:
            for call in on_stop:
                call()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        http=guarded_protocol(transport or TransportLimits()),
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=3,
        server_header=False,
    )
    return Server(config)


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
    watch: Sequence[str] = (),
    poll: float | None = None,
) -> None:
    """Run the web app until Ctrl+C. ``pixfind serve`` calls this. ``exact``: keep exact search
    on a large embedded index instead of :meth:`ImageIndex.optimize_for_queries`.

    ``settings``: where the index is (``Settings.from_env()`` when None). ``port`` 0 picks a free
    one. ``thumb_dir``: thumbnail cache (default: ``<cache dir>/thumbs``). ``index``: an index
    already open (it is closed on exit either way). ``password``/``no_auth``: see
    :func:`decide_access`. ``watch``: folders to index and keep current while serving
    (:mod:`pixfind.ingest.watch`; ``poll``: seconds between polls instead of file events).
    Raises :class:`PixfindError` for problems the user can fix (index locked or unreachable,
    port taken, a password too short, a folder that cannot be watched).
    """
    from ..config import Settings, cache_dir
    from ..ingest.watch import watching_in_background

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
        _ready_for_queries(index, exact, say)
        app = create_app(
            index,
            thumb_dir or cache_dir() / "thumbs",
            limits=limits,
            allowed_hosts=access.allowed_hosts,
            credentials=access.credentials,
        )
        watcher = _watcher(index, app, watch, poll)  # a folder that cannot be watched fails here
        url = f"http://{_shown_host(host)}:{bound_port}/"
        say(f"pixfind: serving {_what_is_served(index, settings)} at {url}")
        for line in access.lines:
            say(line)
        say(f"  API documentation: {url}docs · press Ctrl+C to stop")
        stop_watch = threading.Event()
        server = make_server(app, transport, log_level, on_stop=(app.state.pixfind.begin_stop, stop_watch.set))
        _exit_cleanly_on_sigterm()
        with (
            contextlib.suppress(KeyboardInterrupt),
            _announce(index, bound, bound_port, access.credentials),
            watching_in_background(watcher, say, stop_watch),
        ):
            server.run(sockets=[sock])
    finally:
        sock.close()
        index.close()


def _watcher(index: ImageIndex, app: FastAPI, folders: Sequence[str], poll: float | None) -> Watcher | None:
    """The watch of ``folders``, receiving events already; its batches take the routes' index
    lock, and ``/api/info`` says what it is doing."""
    if not folders:
        return None
    from ..ingest.watch import Watcher

    service = app.state.pixfind
    watcher = Watcher(index, folders, poll=poll, lock=service.lock)
    watcher.start()
    service.watch_state = watcher.state.to_dict
    return watcher


def _ready_for_queries(index: ImageIndex, exact: bool, say: Callable[[str], None]) -> None:
    """The search index the run wants, and one query made, so the first real one is fast."""
    if exact:
        with contextlib.suppress(PixfindError):
            index.store.restore_index()  # an IVF index left by a killed serve: exact again
    elif index.optimize_for_queries():  # undone by index.close()
        say(
            "pixfind: large embedded index: approximate (IVF) search while serving, exact again on exit "
            "(--exact keeps it exact)"
        )
    with contextlib.suppress(Exception):
        index.search("a photo", limit=1)


def _what_is_served(index: ImageIndex, settings: Settings) -> str:
    """``N images from URI`` for the start line; the start goes on when the index cannot say."""
    count, where = None, settings.uri
    with contextlib.suppress(Exception):
        details = index.info()
        count = details.get("images", details.get("count"))
        where = details.get("uri") or where
    images = f"{count:,} images" if isinstance(count, int) else "the index"
    return f"{images} from {where}"


def _shown_host(host: str) -> str:
    """The host part of the URL printed at start: one a browser on this computer can open."""
    if host in ("0.0.0.0", "::"):
        return "localhost"
    return f"[{host}]" if ":" in host else host


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
    from ..remote import announced

    local = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bound, bound)
    local = f"[{local}]" if ":" in local else local
    key = credentials.local_key if credentials else None
    random = index.model_spec().weights == "none"
    return announced(
        index.store.uri, f"http://{local}:{port}/", index.settings.collection, key=key, random_weights=random
    )
