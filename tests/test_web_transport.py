"""Slow and greedy clients against pixfind's uvicorn server (``web.make_server``), over raw sockets.

A small ASGI app stands in for pixfind's (it reads the body and answers its length, or streams a
large answer), with short limits so each test takes a few seconds; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pixfind.web.server import bind_socket, make_server
from pixfind.web.transport import TransportLimits

BIG_ANSWER = 64 * 1024 * 1024
#: Generous bounds: each limit below is 1-2 s; a shared, busy machine must not make these flaky.
BOUND_S = 20.0


async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    length, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        length += len(message.get("body", b""))
        more = message.get("more_body", False)
    if scope["path"] == "/big":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % BIG_ANSWER)]})
        chunk = b"x" * (1024 * 1024)
        for _ in range(BIG_ANSWER // len(chunk)):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    body = str(length).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def serving(limits: TransportLimits, asgi_app=app) -> Iterator[int]:  # type: ignore[no-untyped-def]
    sock = bind_socket("127.0.0.1", 0)
    server = make_server(asgi_app, limits)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the test server did not start"
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def connect(port: int) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port), timeout=BOUND_S)
    client.settimeout(BOUND_S)
    return client


def read_all(client: socket.socket) -> bytes:
    """Everything the server sends until it closes (bounded by the socket's timeout)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := client.recv(65536):
            data += chunk
    return data


def request(method: str, path: str, body: bytes = b"", keep_alive: bool = False) -> bytes:
    connection = "keep-alive" if keep_alive else "close"
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
    return f"{head}Connection: {connection}\r\n\r\n".encode() + body


def read_answer(client: socket.socket) -> bytes:
    """One answer on a kept-alive connection: its head, then Content-Length bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += client.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += client.recv(65536)
    return head + b"\r\n\r\n" + body


SHORT = TransportLimits(header_timeout_s=1.5, body_grace_s=1.5, min_body_rate=1000, send_stall_s=1.5)


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow:"], ids=["nothing", "half"])
def test_a_request_head_sent_too_slowly_gets_408(sent: bytes) -> None:
    with serving(SHORT) as port, connect(port) as client:
        started = time.monotonic()
        client.sendall(sent)
        answer = read_all(client)  # returns when the server closes
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer[:80]
    assert b"headers came too slowly" in answer
    assert waited < BOUND_S


def test_an_upload_at_100_bytes_a_second_is_cut_off() -> None:
    with serving(SHORT) as port, connect(port) as client:
        client.sendall(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n")
        started = time.monotonic()
        answer = b""
        while time.monotonic() - started < BOUND_S:
            client.sendall(b"x" * 10)  # the server discards what comes after its answer
            client.settimeout(0.1)
            with contextlib.suppress(TimeoutError):
                chunk = client.recv(65536)
                answer += chunk
                if not chunk:
                    break
        client.settimeout(BOUND_S)
        with contextlib.suppress(OSError):
            answer += read_all(client)
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer[:80]
    assert b"request body came too slowly" in answer
    assert waited < BOUND_S


def test_normal_clients_are_not_affected() -> None:
    limits = TransportLimits(header_timeout_s=1.0, body_grace_s=1.0, min_body_rate=1000, send_stall_s=5)
    with serving(limits) as port:
        with connect(port) as client:  # keep-alive: idle longer than the head timeout between requests
            client.sendall(request("GET", "/", keep_alive=True))
            assert read_answer(client).startswith(b"HTTP/1.1 200")
            time.sleep(2.5)
            client.sendall(request("POST", "/", b"y" * 1_000_000))
            answer = read_all(client)
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"1000000"), answer[-40:]
        with connect(port) as client:  # a body slower than the grace, faster than the minimum rate
            client.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 6000\r\nConnection: close\r\n\r\n")
            for _ in range(12):
                client.sendall(b"z" * 500)
                time.sleep(0.25)  # 2,000 bytes a second for 3 s
            answer = read_all(client)
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"6000"), answer[-40:]


def test_connections_over_the_cap_are_refused_at_once() -> None:
    limits = TransportLimits(header_timeout_s=60, max_connections=3)
    with serving(limits) as port:
        idle = [connect(port) for _ in range(3)]
        try:
            time.sleep(0.5)  # let the server register them
            with connect(port) as extra:
                started = time.monotonic()
                answer = read_all(extra)
                assert answer.startswith(b"HTTP/1.1 503"), answer[:80]
                assert b"too many connections" in answer
                assert time.monotonic() - started < BOUND_S / 2
            idle.pop().close()
            time.sleep(0.5)
            with connect(port) as client:
                client.sendall(request("GET", "/"))
                assert read_all(client).startswith(b"HTTP/1.1 200")
        finally:
            for client in idle:
                client.close()


def test_a_client_that_stops_reading_is_dropped() -> None:
    with serving(SHORT) as port:
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.settimeout(BOUND_S)
        client.connect(("127.0.0.1", port))
        with client:
            client.sendall(request("GET", "/big"))
            time.sleep(SHORT.send_stall_s + 3)  # read nothing for longer than the stall limit
            received = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := client.recv(1024 * 1024):
                    received += len(chunk)
    assert received < BIG_ANSWER / 2, received


def test_the_408_reaches_a_client_that_keeps_sending() -> None:
    """Closing on a client that is still sending makes the kernel answer its next bytes with a
    reset, which throws away the 408 before the client reads it; the server half-closes and
    discards instead, for a while."""
    with serving(SHORT) as port, connect(port) as client:
        client.sendall(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n")
        started = time.monotonic()
        while time.monotonic() - started < SHORT.body_grace_s + 1.5:  # past the deadline, still sending
            client.sendall(b"x" * 10)
            time.sleep(0.05)
        answer = read_all(client)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer[:80]


async def early_answer(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    """Answers 413 before reading the body, as pixfind's upload limit does."""
    if scope["type"] == "lifespan":
        await app(scope, receive, send)
        return
    body = b'{"detail":"upload too large"}'
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@pytest.mark.parametrize("connection", ["keep-alive", "close"])
def test_an_early_answer_is_read_by_a_client_still_sending(connection: str) -> None:
    """A client that sends its whole upload before reading (as urllib does, with "Connection:
    close") gets the 413, not a reset: the server reads and discards the rest of the body."""
    with serving(SHORT, early_answer) as port, connect(port) as client:
        size = 32 * 1024 * 1024
        head = f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {size}\r\nConnection: {connection}\r\n\r\n"
        client.sendall(head.encode())
        chunk = b"u" * (1024 * 1024)
        for _ in range(size // len(chunk)):
            client.sendall(chunk)
        answer = read_answer(client)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:80]
    assert answer.endswith(b'{"detail":"upload too large"}')
