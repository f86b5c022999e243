"""Who may ask ``pixfind serve`` anything: which address it listens on, which page sends the
request, and (off loopback) who knows the password.

Checked before any route, in this order:

1. **Host** (loopback binds): a request must name the server by a loopback name, so a web page
   cannot reach it through a DNS name that resolves to 127.0.0.1 (DNS rebinding);
2. **the sending page** (:class:`CrossSiteGuard`): a browser says which site a request comes from
   (``Sec-Fetch-Site``; ``Origin`` on a POST). Requests made by pages of other sites are refused
   with a 403, except plain navigations (a link to the page); tools that send neither header,
   such as ``pixfind search`` or curl, are not browsers' pages and pass;
3. **authentication** (:class:`Credentials`): HTTP basic auth, which browsers ask for by
   themselves, or the bearer key that a running server leaves for pixfind commands of the same
   user (see :mod:`pixfind.remote`). Compared in constant time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import os
import secrets
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import PixfindError
from .answers import send_error

#: The user name of HTTP basic auth (the password is what matters; browsers ask for both).
USER = "pixfind"
#: Environment variable holding the password (a command-line option would show it to ``ps``).
PASSWORD_ENV = "PIXFIND_SERVE_PASSWORD"
MIN_PASSWORD_CHARS = 8
#: A wrong password is answered this much later: online guessing gets slow.
FAILED_AUTH_DELAY_S = 1.0

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443}

Scope = MutableMapping[str, Any]


# -- where it listens ------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and any loopback address (127.0.0.0/8, ::1, ::ffff:127.x.y.z)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def loopback_host_names(host: str, bound: str) -> list[str]:
    """``Host`` header names a loopback server answers to: what it was told to bind, the address it
    bound, and the usual loopback names (bracketed, as a Host header writes IPv6)."""
    names = {"localhost", "127.0.0.1", "[::1]"}
    for name in (host, bound):
        name = name.strip().strip("[]").lower()
        names.add(f"[{name}]" if ":" in name else name)
    return sorted(names)


# -- authentication ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """What a request must carry: the password (HTTP basic, user :data:`USER`) or the local key."""

    password: str
    local_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    generated: bool = False

    @classmethod
    def generate(cls) -> Credentials:
        return cls(secrets.token_urlsafe(16), generated=True)

    def accepts(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, value = authorization.strip().partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer":
            return hmac.compare_digest(value.encode(), self.local_key.encode())
        if scheme != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value, validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        user_ok = hmac.compare_digest(user, USER.encode())
        return hmac.compare_digest(password, self.password.encode()) and user_ok


def read_password_file(path: Path) -> str:
    """The first line of ``path``: the password (a file keeps it out of ``ps`` and shell history)."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PixfindError(f"cannot read --password-file {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    lines = text.splitlines()
    return check_password(lines[0].strip() if lines else "", f"--password-file {path}")


def password_from_environment() -> str | None:
    """``$PIXFIND_SERVE_PASSWORD``, checked, or None when unset or empty.

    Read here, not through :class:`pixfind.config.Settings`: Settings say how to reach the index and
    the model, travel with the index into every layer and are safe to show; this secret is only
    the server's, and is read once, where it is used.
    """
    value = os.environ.get(PASSWORD_ENV)
    return check_password(value, PASSWORD_ENV) if value else None


def check_password(password: str, source: str) -> str:
    if len(password) < MIN_PASSWORD_CHARS:
        raise PixfindError(
            f"the password in {source} is too short: use at least {MIN_PASSWORD_CHARS} characters "
            "(or leave it out and pixfind serve makes one up)"
        )
    return password


# -- what a server decides at start ---------------------------------------------------------------------


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
    if password is None and (password := password_from_environment()) is not None:
        source = PASSWORD_ENV
    if password is not None and no_auth:
        raise PixfindError(f"--no-auth and a password ({source}) both given: choose one")
    credentials = Credentials(password) if password is not None else None
    if is_loopback(bound):
        if credentials is None:
            line = "  only this computer can connect (--host 0.0.0.0 shares it on your network, with a password)"
        else:
            line = f"  only this computer can connect, as user {USER} with the password from {source}"
        return Access(True, loopback_host_names(host, bound), credentials, [line])
    if credentials is not None:
        return Access(False, None, credentials, [f"  other computers can connect: user {USER}, password from {source}"])
    if no_auth:
        warning = (
            f"  other computers can connect WITHOUT a password (--no-auth): anyone who reaches port {port} "
            "sees every indexed picture"
        )
        return Access(False, None, None, [warning])
    made = Credentials.generate()
    lines = [
        f"  other computers can connect: user {USER}, password {made.password}",
        f"  (to choose the password: {PASSWORD_ENV}=... or --password-file FILE)",
    ]
    return Access(False, None, made, lines)


# -- the middleware -----------------------------------------------------------------------------------


def cross_site_refusal(scope: Scope) -> str | None:
    """Why a browser request from another site's page is refused, or None when it may pass.

    Fetch Metadata's resource isolation policy: requests whose ``Sec-Fetch-Site`` is
    ``cross-site`` or ``same-site`` (another port of this host is the same *site*) are refused
    unless they are plain navigations; a POST must come from this origin when it names one.
    """
    headers = _headers(scope)
    method = scope.get("method", "GET").upper()
    site = headers.get("sec-fetch-site")
    if site in ("cross-site", "same-site"):
        navigation = (
            method == "GET"
            and headers.get("sec-fetch-mode") == "navigate"
            and headers.get("sec-fetch-dest") not in ("object", "embed", "iframe", "frame")
        )
        if not navigation:
            return "refused: this request comes from another site's page"
    origin = headers.get("origin")
    if method not in _SAFE_METHODS and origin is not None and not _same_origin(origin, scope, headers):
        return "refused: this request comes from another site's page"
    return None


def _same_origin(origin: str, scope: Scope, headers: dict[str, str]) -> bool:
    scheme = scope.get("scheme", "http")
    try:
        sent = urlsplit(origin)
        own = urlsplit(f"{scheme}://{headers.get('host', '')}")
        sent_port = sent.port or _DEFAULT_PORTS.get(sent.scheme)
        own_port = own.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        return False
    return (
        sent.scheme == scheme
        and bool(sent.hostname)
        and sent.hostname == own.hostname
        and sent_port == own_port
        and not sent.path.strip("/")
    )


def _headers(scope: Scope) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers") or []}


class AccessGuard:
    """ASGI middleware: refuse other sites' pages (403), then unauthenticated requests (401)."""

    def __init__(self, app: Any, credentials: Credentials | None) -> None:
        self.app = app
        self.credentials = credentials

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = cross_site_refusal(scope)
        if refusal is not None:
            await send_error(send, 403, refusal)
            return
        if self.credentials is not None:
            authorization = _headers(scope).get("authorization")
            if not self.credentials.accepts(authorization):
                if authorization:
                    await asyncio.sleep(FAILED_AUTH_DELAY_S)
                await send_error(
                    send,
                    401,
                    f"password needed: user {USER}, and the password pixfind serve printed or was given",
                    [(b"www-authenticate", b'Basic realm="pixfind", charset="UTF-8"')],
                )
                return
        await self.app(scope, receive, send)
