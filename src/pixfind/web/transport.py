"""Slow clients and too many of them: what uvicorn's own settings do not cover.

uvicorn offers ``timeout_keep_alive`` (idle time *between* requests, reset by every byte),
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
* a cap on open connections: one over it is answered 503 and closed at once;
* a lingering close (as nginx's): closing a connection while the client still sends a request
  body makes the kernel answer its next bytes with a reset, which destroys the answer (a 413 for
  an upload over the limit) before the client reads it. Instead the server half-closes (the
  answer and a FIN go out) and discards what still arrives, for at most :data:`DISCARD_S`.

A request that times out before its answer started gets ``408 Request Timeout``; either way the
connection is closed. Which part of a request has arrived is read from h11's connection state.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

#: Seconds a connection refused by these limits (408, 503) lingers before it is closed.
LINGER_S = 2.0
#: Seconds at most that the rest of a request body answered early (a 413) is read and discarded.
DISCARD_S = 30.0


@dataclass(frozen=True)
class TransportLimits:
    """How long and how many: generous for a browser on a slow link, short for a client holding on."""

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
        self._phase: str | None = None  # "head", "body", "discard" or None (nothing being received)
        self._deadline: asyncio.TimerHandle | None = None
        self._stall: asyncio.TimerHandle | None = None
        self._body_started = 0.0
        self._body_bytes = 0
        self._discarding = False  # answered and half-closed: what still arrives is dropped
        self._shutting_down = False

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        if len(self.connections) > self.limits.max_connections:
            self._close_with(503, "Service Unavailable", "too many connections: try again in a moment")
            return
        self._enter("head")  # a client that connects and sends nothing is timed out too

    def data_received(self, data: bytes) -> None:
        if self._discarding:
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

    def shutdown(self) -> None:
        """The server is stopping: no lingering (uvicorn would wait for it, then log an error)."""
        self._shutting_down = True
        transport: _LingeringTransport = self.transport  # type: ignore[assignment]
        if transport.is_closing():
            transport.close_now()
            return
        super().shutdown()

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

    def may_linger(self) -> bool:
        """Is the client in the middle of sending a request body (and the server not stopping)?"""
        return self.conn.their_state is h11.SEND_BODY and not self._shutting_down

    def discard_input(self) -> None:
        self._cancel()
        self._discarding = True

    def _follow_request(self) -> None:
        state = self.conn.their_state
        if state is h11.IDLE:  # bytes of a request head have arrived, not all of it
            self._enter("head")
        elif state is h11.SEND_BODY:
            answered = self.conn.our_state in (h11.DONE, h11.MUST_CLOSE)
            self._enter("discard" if answered else "body")
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
        elif phase == "discard":  # answered already; uvicorn reads the rest of the body and drops it
            self._deadline = self.loop.call_later(DISCARD_S, self._close_now)

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
            self._close_now()

    def _stalled(self) -> None:
        self._stall = None
        self.transport.abort()  # the client stopped reading: drop what is buffered for it

    def _close_now(self) -> None:
        self._deadline = None
        transport: _LingeringTransport = self.transport  # type: ignore[assignment]
        transport.close_now()

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
        self.transport.write(head.encode() + body)
        transport: _LingeringTransport = self.transport  # type: ignore[assignment]
        transport.linger(LINGER_S)


class _LingeringTransport:
    """The connection's transport as uvicorn sees it, with a polite :meth:`close`: while the client
    is still sending a request body, half-close and discard its input for a while (see the
    module's docstring); everything else is the real transport's."""

    def __init__(self, transport: asyncio.Transport, protocol: _GuardedH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self._closing:
            self._transport.write(data)

    def close(self) -> None:
        if self.is_closing():
            return
        if self._protocol.may_linger():
            self.linger(DISCARD_S)
        else:
            self.close_now()

    def close_now(self) -> None:
        self._closing = True
        self._transport.close()

    def linger(self, seconds: float) -> None:
        """Send what is written and a FIN now, drop what arrives, close after ``seconds``."""
        if self.is_closing():
            return
        self._closing = True
        self._protocol.discard_input()
        self._protocol.flow.resume_reading()  # paused while the body waited for the app: read to drop it
        if self._transport.can_write_eof():
            self._transport.write_eof()
            self._protocol.loop.call_later(seconds, self._transport.close)
        else:
            self._transport.close()
