"""ASGI middleware of the web app: a cap on upload bodies, and the headers every answer carries.

Both run outside FastAPI's routing, so they also see answers the routes never make (a 413 before
the body is read, the access checks' 401 and 403).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from .answers import send_error
from .service import upload_too_large

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]

#: The page's Content-Security-Policy: nothing from elsewhere, no inline script or style, no framing.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


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

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
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

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
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
        # No "connection: close": closing while the client still sends would reset the connection
        # before it reads this answer; the server reads and discards the rest for a while instead.
        await send_error(send, 413, upload_too_large(self.file_limit))


class _TooLarge(Exception):
    """Raised into the app when a body without Content-Length passes the limit: it stops reading."""


class SecurityHeaders:
    """ASGI middleware: headers on every answer, the refusals of the outer checks included.

    ``Cross-Origin-Resource-Policy: same-origin`` stops pages of other sites from loading any
    answer (an ``<img src=…/api/thumb?path=…>`` would otherwise tell them which files are indexed).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        page = scope["path"] == "/" or scope["path"].startswith("/static/") or scope["path"] == "/docs"

        async def send_with_headers(message: Message) -> None:
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
                        extra += [(b"content-security-policy", PAGE_CSP.encode())]
                message["headers"] = headers + [(name, value) for name, value in extra if name not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)
