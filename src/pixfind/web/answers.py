"""How the web app answers: one error type every layer raises, and JSON any file name survives.

Kept apart from the routes so the lowest layers (:mod:`.paths`, :mod:`.service`) can refuse a
request with the right status without knowing about FastAPI's routing.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


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


async def send_error(send: Any, status: int, detail: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer ``{"detail": detail}`` straight through ASGI: for the checks that run before routing."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})


def validation_message(exc: RequestValidationError) -> str:
    """FastAPI's validation errors as one line (``bad request: k: ...``), as every error is."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(item) for item in error.get("loc", ()) if item not in ("query", "body"))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg")))
    return "bad request: " + "; ".join(parts)
