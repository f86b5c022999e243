"""A real Milvus standalone server for tests and benchmarks, reachable on 127.0.0.1 only.

The PyPI package ``milvus`` (2.3.5) ships a Milvus standalone binary and a ``milvus-server``
wrapper; ``.ci/server-setup.sh`` installs it into its own venv (``.venv-server``). The binary
listens on *every* interface (``:19530``, ``:9091`` and seven internal ports) and has no setting
to change that, so it is started inside a private network namespace whose only interface is
loopback. Two listening sockets bound to ``127.0.0.1`` in the caller's namespace are handed to
a small supervisor inside the namespace (file descriptors keep their namespace), which relays
them to the server's gRPC port and its health endpoint. Consequences:

* nothing is ever reachable from another address, and nothing is bound to 19530 or 9091 on
  the host: each server gets free loopback ports (or the ``port`` asked for, failing clearly
  when it is taken), so several can run at once;
* stopping is by pid: the supervisor sends SIGINT to the wrapper (which SIGTERMs, then
  SIGKILLs the ``milvus run standalone`` process after 1 s), then SIGKILLs whatever is left
  of its own descendants; :meth:`MilvusServer.stop` checks that every pid it saw is gone.

Run it by hand::

    python tests/milvus_server.py            # prints the URI and token, Ctrl+C stops it
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
ENV_BIN = "PIXFIND_MILVUS_SERVER_BIN"
DEFAULT_BIN = REPO / ".venv-server" / "bin" / "milvus-server"
ROOT_TOKEN = "root:Milvus"
#: Ports the server uses inside its namespace (the wrapper's defaults; the namespace is empty).
INNER_GRPC = 19530
INNER_HEALTH = 9091
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0


class ServerStartError(RuntimeError):
    """The Milvus server could not be started (message says why and where the logs are)."""


def server_bin() -> Path:
    """The ``milvus-server`` wrapper: ``$PIXFIND_MILVUS_SERVER_BIN`` or ``.venv-server``."""
    path = Path(os.environ.get(ENV_BIN) or DEFAULT_BIN)
    if not path.is_file() or not os.access(path, os.X_OK):
        raise ServerStartError(
            f"milvus-server not found at {path}: run .ci/server-setup.sh (creates .venv-server with "
            f"milvus==2.3.5) or set {ENV_BIN}"
        )
    return path


def bind_loopback(port: int = 0) -> socket.socket:
    """A listening TCP socket on 127.0.0.1:``port`` (0: a free one); clear error when taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only, never a live listener
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise ServerStartError(
            f"cannot listen on 127.0.0.1:{port} for the Milvus server ({exc.strerror}): "
            "another process holds it; stop it or choose another port"
        ) from exc
    sock.listen(64)
    return sock


@dataclass
class MilvusServer:
    """One Milvus standalone, started by :meth:`start` and stopped by :meth:`stop`."""

    auth: bool = True
    port: int = 0  # 0: any free loopback port
    data_dir: Path | None = None
    keep_data: bool = False
    uri: str = ""
    token: str | None = None
    health_url: str = ""
    start_s: float = 0.0
    stop_s: float = 0.0
    _proc: subprocess.Popen[bytes] | None = None
    _pids: set[int] = field(default_factory=set)
    _tmp: bool = False

    # -- life cycle -------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT_S) -> MilvusServer:
        wrapper = server_bin()
        grpc_sock = bind_loopback(self.port)
        health_sock = bind_loopback(0)
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="pixfind-milvus-"))
            self._tmp = True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        grpc_port = grpc_sock.getsockname()[1]
        self.uri = f"http://127.0.0.1:{grpc_port}"
        self.token = ROOT_TOKEN if self.auth else None
        self.health_url = f"http://127.0.0.1:{health_sock.getsockname()[1]}/healthz"
        log = (self.data_dir / "supervisor.log").open("wb")
        began = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--supervise",
                    json.dumps(
                        {
                            "wrapper": str(wrapper),
                            "data": str(self.data_dir),
                            "auth": self.auth,
                            "fds": {
                                str(grpc_sock.fileno()): INNER_GRPC,
                                str(health_sock.fileno()): INNER_HEALTH,
                            },
                        }
                    ),
                ],
                pass_fds=(grpc_sock.fileno(), health_sock.fileno()),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            grpc_sock.close()
            health_sock.close()
            log.close()
        try:
            self._wait_healthy(began + timeout)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.monotonic() - began
        return self

    def _wait_healthy(self, deadline: float) -> None:
        assert self._proc is not None
        while time.monotonic() < deadline:
            self._pids |= _descendants(self._proc.pid)
            if self._proc.poll() is not None:
                raise ServerStartError(
                    f"Milvus server exited with status {self._proc.returncode} while starting: {self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.health_url, timeout=2) as resp:
                    if b"OK" in resp.read():
                        self._pids |= _descendants(self._proc.pid)
                        if self._grpc_ready(deadline):
                            return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise ServerStartError(f"Milvus server not healthy within the deadline: {self._log_tail()}")

    def _grpc_ready(self, deadline: float) -> bool:
        """healthz answers before the proxy serves requests: wait for a real call to succeed."""
        try:
            from pymilvus import MilvusClient
        except ImportError:
            return True
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                client = MilvusClient(uri=self.uri, token=self.token or "", timeout=5)
                try:
                    client.list_collections()
                finally:
                    client.close()
                return True
            except Exception as exc:  # retried until the deadline
                last = exc
                time.sleep(0.3)
        raise ServerStartError(f"Milvus gRPC not ready: {last}: {self._log_tail()}")

    def stop(self) -> None:
        """Stop the supervisor and everything it started; raise if a process survived."""
        began = time.monotonic()
        proc, self._proc = self._proc, None
        if proc is not None:
            self._pids |= _descendants(proc.pid)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_GRACE_S + 5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait(timeout=5)
            survivors = {pid for pid in self._pids if _alive(pid)}
            for pid in survivors:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _wait_gone(survivors, 5.0)
            still = {pid for pid in survivors if _alive(pid)}
            self._pids.clear()
            if still:
                raise RuntimeError(f"Milvus processes {sorted(still)} survived SIGKILL")
            self.stop_s = time.monotonic() - began
        if self._tmp and self.data_dir is not None and not self.keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def process_ids(self) -> set[int]:
        """The live processes this server runs (supervisor, wrapper, standalone): for memory figures."""
        if self._proc is None:
            return set()
        return {pid for pid in {self._proc.pid} | _descendants(self._proc.pid) if _alive(pid)}

    def _log_tail(self) -> str:
        if self.data_dir is None:
            return ""
        parts = []
        for name in ("supervisor.log", "logs/milvus-stderr.log"):
            path = self.data_dir / name
            if path.is_file():
                text = path.read_text(errors="replace").strip().splitlines()[-15:]
                if text:
                    parts.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(parts) or f"(no logs in {self.data_dir})"

    def __enter__(self) -> MilvusServer:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- process helpers ------------------------------------------------------------------------------


def _descendants(pid: int) -> set[int]:
    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def _wait_gone(pids: set[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


# -- inside the namespace ---------------------------------------------------------------------------

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1


def _enter_private_network() -> None:
    """Move this process into a new network namespace (as root, or via a user namespace)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot create a network namespace: {os.strerror(err)}")
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
        Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    _loopback_up()


def _loopback_up() -> None:
    import fcntl
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(sock, siocgifflags, req))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


def _relay(listener: socket.socket, port: int) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            conn.close()
            continue
        upstream.settimeout(None)
        for sock in (conn, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for src, dst in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=_pump, args=(src, dst), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(262144)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            src.shutdown(socket.SHUT_RD)


def _supervise(spec: dict[str, object]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # the test process died: clean up
    if os.getppid() == 1:
        return 1
    try:
        _enter_private_network()
    except OSError as exc:
        print(f"pixfind milvus supervisor: {exc}", flush=True)
        return 3
    data = str(spec["data"])
    cmd = [str(spec["wrapper"]), "--data", data]
    if spec["auth"]:
        cmd += ["--authorization-enabled", "true"]  # "false" is parsed as true: omit to disable
    wrapper = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=open(os.path.join(data, "wrapper.log"), "wb"),  # noqa: SIM115 - lives as long as it
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: libc.prctl(PR_SET_PDEATHSIG, signal.SIGINT),
    )
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fds = spec["fds"]
    assert isinstance(fds, dict)
    for fd, port in fds.items():
        listener = socket.socket(fileno=int(fd))
        threading.Thread(target=_relay, args=(listener, int(port)), daemon=True).start()
    print(f"wrapper pid {wrapper.pid}", flush=True)
    while not stopping.is_set() and wrapper.poll() is None:
        stopping.wait(0.2)
    seen = _descendants(os.getpid()) - {wrapper.pid}
    if wrapper.poll() is None:
        wrapper.send_signal(signal.SIGINT)  # the wrapper's own stop: SIGTERM, 1 s, SIGKILL
        try:
            wrapper.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            wrapper.kill()
            wrapper.wait()
    else:
        print(f"wrapper exited with status {wrapper.returncode}", flush=True)
    seen |= _descendants(os.getpid())
    for pid in seen:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    _wait_gone(seen, 5.0)
    return 0 if stopping.is_set() else 2


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--supervise":
        return _supervise(json.loads(sys.argv[2]))
    server = MilvusServer(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    server.start()
    print(f"Milvus up in {server.start_s:.1f} s: --uri {server.uri} --token {server.token}", flush=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.stop()
        print(f"stopped in {server.stop_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
