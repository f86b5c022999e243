"""Slow clients and too many of them: what uvicorn's own settings do not cover.

uvicorn (0.54) offers ``timeout_keep_alive`` (idle time *between* requests, reset by every byte),
``limit_concurrency`` (answers 503 to requests above N connections or tasks, but accepts the
connections) and ``h11_max_incomplete_event_size`` (header size). It has no timeout for
receiving a request: a client that sends half its headers, or an upload at 100 bytes a second,
holds a connection for as long as it likes (uvicorn issue #157 lists the missing
``--timeout-request-start``). :func:`guarded_protocol` adds, on uvicorn's own h11 protocol
(``uvicorn.Config(http=...)`` takes a protocol class):

* a deadline for the request head (line and headers), from the first byte or the connection;
* a minimum average rate for the body after a grace period (as Apache's ``mod_reqtimeout``
  ``MinRate``), suspended while the server itself is not reading (flow control);
* a deadline for a client that stops reading a response (the send buffer stays full);
* a cap on open connections: one over it is answered 503 and closed at once.

A request that times out before its answer started gets ``408 Request Timeout``; either way the
connection is closed. The answer is followed by a half-close and a short linger that discards
what the client still sends, so the client reads the answer instead of a reset (a close with
unread input makes the kernel send one). Which part of a request has arrived is read from h11's
connection state.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

#: Seconds a refused connection is kept half-closed, its input discarded, before it is closed.
LINGER_S = 2.0


@dataclass(frozen=True)
class TransportLimits:
    #: Seconds to send the request line and headers.
    header_timeout_s: float = 10.0
    #: Seconds a request body may take before :attr:`min_body_rate` applies...
    body_grace_s: float = 10.0
    #: ...then it must average at least this many bytes a second (8 KiB/s = 64 kbit/s).
    min_body_rate: float = 8 * 1024
    #: Seconds a client may leave a response unread (the send buffer full) before it is dropped.
    send_stall_s: float = 60.0
    #: Open connections at most (a browser opens about 6).
    max_connections: int = 128


def guarded_protocol(limits: TransportLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with ``limits`` enforced; pass it as ``uvicorn.Config(http=...)``."""
    return type("GuardedH11Protocol", (_GuardedH11Protocol,), {"limits": limits})


class _GuardedH11Protocol(H11Protocol):
    limits: ClassVar[TransportLimits] = TransportLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: str | None = None  # "head", "body" or None (nothing being received)
        self._deadline: asyncio.TimerHandle | None = None
        self._stall: asyncio.TimerHandle | None = None
        self._body_started = 0.0
        self._body_bytes = 0
        self._refused = False  # answered and half-closed: what still arrives is discarded

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._close_with(503, "Service Unavailable", "too many connections: try again in a moment")
            return
        self._enter("head")  # a client that connects and sends nothing is timed out too

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        self._follow_request()
        if self._phase == "body":
            self._body_bytes += len(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            self._stall = self.loop.call_later(self.limits.send_stall_s, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    # -- the request's progress -----------------------------------------------------------------------

    def _follow_request(self) -> None:
        state = self.conn.their_state
        if state is h11.IDLE:  # bytes of a request head have arrived, not all of it
            self._enter("head")
        elif state is h11.SEND_BODY:
            self._enter("body")
        else:
            self._enter(None)

    def _enter(self, phase: str | None) -> None:
        if phase == self._phase:
            return
        self._cancel()
        self._phase = phase
        if phase == "head":
            self._deadline = self.loop.call_later(self.limits.header_timeout_s, self._timed_out)
        elif phase == "body":
            self._body_started, self._body_bytes = self.loop.time(), 0
            self._deadline = self.loop.call_later(self.limits.body_grace_s, self._check_body)

    def _check_body(self) -> None:
        self._deadline = None
        if self._phase != "body" or self.transport.is_closing():
            return
        now = self.loop.time()
        if self.flow.read_paused:  # the server is not reading: not the client's fault, start over
            self._body_started, self._body_bytes = now, 0
            self._deadline = self.loop.call_later(self.limits.body_grace_s, self._check_body)
            return
        due = self._body_started + self.limits.body_grace_s + self._body_bytes / self.limits.min_body_rate
        if now >= due:
            self._timed_out()
        else:
            self._deadline = self.loop.call_at(due, self._check_body)

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        what = "headers" if self._phase == "head" else "request body"
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # no answer started yet
            self._close_with(408, "Request Timeout", f"request timeout: the {what} came too slowly")
        else:
            self.transport.close()

    def _stalled(self) -> None:
        self._stall = None
        self.transport.abort()  # the client stopped reading: drop what is buffered for it

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _close_with(self, status: int, reason: str, message: str) -> None:
        body = message.encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self._cancel()
        self._refused = True
        self.transport.write(head.encode() + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()
