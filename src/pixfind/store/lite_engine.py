"""The Milvus Lite engine process of one index file, started and stopped by pixfind itself.

Why not milvus_lite's own start (``server_manager_instance.start_and_get_uri``, which
``MilvusClient(path)`` calls): it always waits a fixed time to see whether the engine dies
(docs/speed.md), it imports milvus_lite first, and a failed start deletes the engine's lock
file even when another program holds it. pixfind runs the same command (checked against ``milvus_lite.server.Server``
in the tests), returns as soon as the engine answers on its socket, and hands ``MilvusClient``
that socket's ``unix:`` URI, which pymilvus accepts publicly. The engine then belongs to the
Store that started it, which stops it on close; no private field of milvus_lite is read or
written. Only where milvus_lite is not installed as expected does pixfind use its public
``start_and_get_uri`` / ``release_server`` instead.

For an index opened to read, :class:`EarlyRead` asks the engine for the collection's
description and load over grpc alone while the caller is still importing pymilvus.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import importlib.util
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StoreError

#: How long a starting engine may take to answer on its socket.
START_TIMEOUT_S = 10.0
#: Engines pixfind runs in this process, by resolved file: one per file (pixfind's LiteLock
#: already keeps a second Store of this process off a file that is open).
_RUNNING: dict[str, LiteEngine] = {}
_RUNNING_LOCK = threading.Lock()
#: A folder of an engine whose process is gone, or that never got one, is swept after this long.
STALE_HOME_S = 3600.0


@dataclass(frozen=True)
class EngineCommand:
    args: list[str]
    env: dict[str, str]
    socket_path: str
    lock_path: str
    cwd: str
    home: str


class LiteEngine:
    """A running engine: ``uri`` is what ``MilvusClient`` connects to; :meth:`stop` ends it and
    frees the file for other processes (pymilvus would leave it running until exit)."""

    def __init__(self, key: str, uri: str, stop: Callable[[], None]) -> None:
        self.key = key
        self.uri = uri
        self._stop: Callable[[], None] | None = stop

    @property
    def socket_path(self) -> str:
        return self.uri.removeprefix("unix:")

    def stop(self) -> None:
        stop, self._stop = self._stop, None
        if stop is not None:
            with _RUNNING_LOCK:
                if _RUNNING.get(self.key) is self:
                    del _RUNNING[self.key]
            stop()


def engine_command(key: str) -> EngineCommand | None:
    """How milvus_lite 2.5's ``Server`` starts the engine for ``key`` (binary, arguments, library
    path, socket, lock file), found without importing milvus_lite; None if it is not installed
    as expected."""
    spec = importlib.util.find_spec("milvus_lite")
    if spec is None or not spec.submodule_search_locations:
        return None
    bin_dir = Path(os.environ.get("BIN_PATH") or Path(next(iter(spec.submodule_search_locations))) / "lib")
    bin_dir = bin_dir.absolute()
    if not (bin_dir / "milvus").exists():
        return None
    db = Path(key)
    socket_path = f"{tempfile.mktemp()}_{db.name}.sock"
    lock_path = str(db.parent / f".{db.name}.lock")
    level = os.environ.get("LOG_LEVEL", "ERROR")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH")}
    library_path = str(bin_dir) + ":" + os.environ.get("LD_LIBRARY_PATH", "")
    env.update(LD_LIBRARY_PATH=library_path, DYLD_LIBRARY_PATH=library_path)
    home = engine_home()
    env["HOME"] = home
    args = [str(bin_dir / "milvus"), key, f"unix:{socket_path}", level, lock_path]
    return EngineCommand(args, env, socket_path, lock_path, str(db.parent), home)


def start_engine(db: str) -> LiteEngine | None:
    """Start the engine for ``db``; None if it is refused (another program holds the file, or the
    engine died at start). A file whose engine this process already runs is refused too."""
    key = str(Path(db).absolute().resolve())
    with _RUNNING_LOCK, sigint_kept_from_child():
        if key in _RUNNING:
            return None
        command = engine_command(key)
        engine = _start_with_milvus_lite(key) if command is None else _start(key, command)
        if engine is not None:
            _RUNNING[key] = engine
        return engine


def _start(key: str, command: EngineCommand) -> LiteEngine | None:
    lock_file = open(command.lock_path, "a")  # noqa: SIM115 (held while the engine runs)
    try:
        fcntl.lockf(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        shutil.rmtree(command.home, ignore_errors=True)
        return None  # another program has the file open
    process = None
    try:
        process = subprocess.Popen(args=command.args, env=command.env, cwd=command.cwd)
        Path(command.home, "pid").write_text(str(process.pid))
        if _answers(process, command.socket_path):
            stop = _stopper(process, lock_file, command, remove_lock_file=True)
            return LiteEngine(key, f"unix:{command.socket_path}", stop)
    except BaseException:
        _stopper(process, lock_file, command, remove_lock_file=False)()
        raise
    # Unlike milvus_lite's failed start, the lock file itself stays: another program may hold it.
    _stopper(process, lock_file, command, remove_lock_file=False)()
    return None


def _start_with_milvus_lite(key: str) -> LiteEngine | None:
    from milvus_lite.server_manager import server_manager_instance as manager

    uri = manager.start_and_get_uri(key)
    return None if uri is None else LiteEngine(key, uri, lambda: manager.release_server(key))


def _stopper(process: Any, lock_file: Any, command: EngineCommand, remove_lock_file: bool) -> Callable[[], None]:
    """How to end the engine: unlocking its lock file makes it exit (as milvus_lite's
    ``Server.stop`` relies on), and it is killed if it does not."""

    def stop() -> None:
        with contextlib.suppress(OSError):
            fcntl.lockf(lock_file, fcntl.LOCK_UN)
        lock_file.close()
        if process is not None:
            with contextlib.suppress(Exception):
                process.wait(timeout=2)
            if process.poll() is None:
                process.kill()
                process.wait(timeout=3)
        for path in (command.socket_path, command.lock_path) if remove_lock_file else (command.socket_path,):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        shutil.rmtree(command.home, ignore_errors=True)

    return stop


def _answers(process: Any, socket_path: str) -> bool:
    """Wait until the engine accepts a connection on its socket (True) or exits (False)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if os.path.exists(socket_path):
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(socket_path)
                return True
        time.sleep(0.005)
    return False


@contextlib.contextmanager
def sigint_kept_from_child() -> Iterator[None]:
    """Start the engine process with SIGINT blocked, so that a Ctrl-C (which the terminal sends
    to the whole process group) reaches pixfind only. Without this the engine dies on the first
    Ctrl-C, and the batch pixfind then writes before stopping hangs in pymilvus's retries. The
    signal stays pending here while blocked and is handled as soon as the engine is up."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class EngineStart:
    """Starts the engine of ``db`` in a thread, so that its start-up overlaps the pymilvus import
    a cold search needs anyway; with ``preload`` (a collection name), it then starts an
    :class:`EarlyRead` of that collection."""

    def __init__(self, db: str, preload: str | None, timeout: float) -> None:
        self._db = db
        self._preload = preload
        self._timeout = timeout
        self._engine: LiteEngine | None = None
        self._error: BaseException | None = None
        self.early: EarlyRead | None = None
        self._thread = threading.Thread(target=self._start, name="pixfind-lite-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            self._engine = start_engine(self._db)
        except Exception as exc:  # handed to the caller by result()
            self._error = exc
            return
        if self._engine is not None and self._preload:
            with contextlib.suppress(Exception):  # only a head start: the normal calls follow
                self.early = EarlyRead(self._engine.socket_path, self._preload, self._timeout)

    def result(self) -> LiteEngine | None:
        """Wait for the start: the engine, or None if it was refused; raises what the start raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._engine


def _stop_all() -> None:
    """At exit, end the engines of Stores that were never closed (as milvus_lite does for its own)."""
    with _RUNNING_LOCK:
        engines = list(_RUNNING.values())
    for engine in engines:
        with contextlib.suppress(Exception):
            engine.stop()


atexit.register(_stop_all)


def engine_home() -> str:
    """A HOME of its own for one engine, removed when it stops.

    The engine keeps memory-mapped data under ``$HOME/.cache/milvus`` and empties that folder when
    it stops. Shared by several engines (two indexes open at once, or an engine still stopping
    after its pixfind was killed while the next one starts), one engine's clean-up pulls the
    folder from under another, whose every write then fails with ``Assert "init_flag_ == true"
    => Mmap manager has not been init`` — as it does where ``$HOME`` cannot be written (a service
    account, a locked-down container). So each engine gets a private folder: under
    ``milvus-lite`` in pixfind's cache folder, or else in the temporary folder. Folders that
    killed runs left behind are swept here.
    """
    from ..config import cache_dir

    for parent in (cache_dir() / "milvus-lite", Path(tempfile.gettempdir()) / f"pixfind-milvus-{os.getuid()}"):
        with contextlib.suppress(OSError):
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not _own_private_folder(parent):
                continue
            _sweep_stale_homes(parent)
            home = tempfile.mkdtemp(prefix="engine-", dir=parent)
            os.mkdir(os.path.join(home, ".cache"))
            return home
    raise StoreError(
        "Milvus Lite needs a folder to work in: make pixfind's cache folder writable "
        "(PIXFIND_CACHE_DIR) or the temporary folder (TMPDIR)"
    )


def _own_private_folder(path: Path) -> bool:
    """A real folder of this user that nobody else may write (not a link another user left in /tmp)."""
    info = path.lstat()
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def _sweep_stale_homes(parent: Path) -> None:
    """Remove engine folders whose engine is gone (its pid no longer runs), or that never got an
    engine and are old."""
    for home in parent.glob("engine-*"):
        try:
            pid = int((home / "pid").read_text())
            stale = not _pid_alive(pid) and time.time() - home.stat().st_mtime > 5
        except FileNotFoundError:
            stale = time.time() - home.stat().st_mtime > STALE_HOME_S
        except (OSError, ValueError):
            continue
        if stale:
            shutil.rmtree(home, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class EarlyRead:
    """A collection's description, then its load, asked of a just-started engine over its socket
    with grpc alone (pymilvus' import is far slower, most of it pandas), so that the load starts
    sooner. The description comes first because the engine answers one request at a time: asked
    after the load, it would wait for it, and so would the query encoder that needs the
    collection's model. The description is decoded with pymilvus' own classes when asked for."""

    SERVICE = "/milvus.proto.milvus.MilvusService/"

    def __init__(self, socket_path: str, collection: str, timeout: float) -> None:
        import grpc

        self._channel = grpc.insecure_channel(f"unix:{socket_path}")
        request = collection_request(collection)
        self._described: bytes | None = self._method("DescribeCollection")(request, timeout=timeout)
        self._loading = self._method("LoadCollection").future(request, timeout=timeout)

    def _method(self, name: str) -> Any:
        return self._channel.unary_unary(
            self.SERVICE + name, request_serializer=_as_bytes, response_deserializer=_as_bytes
        )

    def description(self) -> dict[str, Any] | None:
        """What ``MilvusClient.describe_collection`` would have returned, once; None if the
        collection did not exist or the answer cannot be read."""
        raw, self._described = self._described, None
        if raw is None:
            return None
        from pymilvus.client.abstract import CollectionSchema
        from pymilvus.client.utils import is_successful
        from pymilvus.grpc_gen import milvus_pb2

        try:
            response = milvus_pb2.DescribeCollectionResponse.FromString(raw)
            return CollectionSchema(raw=response).dict() if is_successful(response.status) else None
        except Exception:
            return None

    def close(self) -> None:
        self._channel.close()


def _as_bytes(data: bytes) -> bytes:
    return data


def collection_request(collection: str) -> bytes:
    """The bytes of a Describe- or LoadCollectionRequest naming only ``collection``: both have
    ``collection_name`` as field 3. The message is declared here with protobuf's public API,
    because pymilvus' own classes cannot be imported without all of pymilvus."""
    return _collection_request_class()(collection_name=collection).SerializeToString()


@functools.cache
def _collection_request_class() -> Any:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="pixfind_early_read.proto", package="pixfind_early_read")
    message = proto.message_type.add(name="CollectionRequest")
    message.field.add(name="collection_name", number=3, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("pixfind_early_read.CollectionRequest"))
