"""What differs between an embedded Milvus Lite file and a Milvus server, in one place each.

:class:`Store` asks its policy how to connect, what limits each call gets, how rows are batched,
which index a collection gets, and what a read must wait for; it never asks which backend it is
talking to. Every pymilvus failure becomes one ``StoreError`` line here too.
"""

from __future__ import annotations

import logging
import socket
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import StoreError
from .lite_engine import EarlyRead, EngineStart, LiteEngine
from .lite_files import check_lite_path, make_lite_folder, nearly_full
from .lock import LiteLock
from .records import Row

if TYPE_CHECKING:
    from .milvus import Store

#: The vector metric of new collections. Vectors are unit length, so inner product *is* the
#: cosine, and Milvus Lite's exact search is faster with it (same ranking and scores). Searches
#: name no metric, so Milvus uses the index's: collections made with COSINE keep working.
METRIC = "IP"
#: Rows per insert call on Milvus Lite, which slows down sharply on much larger calls.
WRITE_BATCH = 1000
#: Seconds one Milvus Lite call may take, retries included (without it pymilvus retries a failing
#: call for minutes, e.g. when the disk is full); normal calls take well under a second.
LITE_CALL_TIMEOUT_S = 60
#: On a server, rows per insert call, capped by their size: a server refuses gRPC messages over
#: 64 MiB (``proxy.grpc.serverMaxRecvSize``); keys can be 8 KiB, so rows are counted in bytes.
SERVER_WRITE_ROWS = 5000
SERVER_WRITE_BYTES = 16 << 20
#: A server must accept a TCP connection within this time, then answer gRPC within CONNECT_TIMEOUT_S.
REACH_TIMEOUT_S = 3.0
CONNECT_TIMEOUT_S = 3.0
#: Retries of a call to a server that stopped answering (pymilvus' default retries for minutes).
SERVER_RETRIES = 6
#: Longest one attempt of a call to a server may wait for its answer: a frozen server
#: (connection up, no reply) fails the call in this time instead of holding it. A float on
#: purpose: pymilvus gives a float ``timeout`` to gRPC as each attempt's deadline and keeps
#: counting retries by SERVER_RETRIES, while an int would become the retries' total time too.
SERVER_CALL_TIMEOUT_S = 10.0
#: The same for the calls that build, load or flush a whole collection (minutes at millions of rows).
SERVER_BULK_TIMEOUT_S = 900.0
SERVER_BULK_CALLS = frozenset({"create_collection", "create_index", "load_collection", "flush", "drop_index"})
#: The ANN index on a server, chosen by measurement (benchmarks/search_latency.py; README).
SERVER_INDEX: dict[str, Any] = {
    "index_type": "HNSW",
    "metric_type": METRIC,
    "params": {"M": 16, "efConstruction": 100},
}


def ann_search_params(index_type: str, effort: int, limit: int) -> dict[str, int]:
    """The search effort an ANN index of ``index_type`` is given for one search effort ``effort``
    (``--ef``): HNSW takes it as ``ef`` (at least ``limit``, which HNSW requires); IVF probes
    half as many lists, which at the default reached recall@10 >= 0.98 on 1M rows with room to
    spare (docs/scale.md). Other indexes (FLAT) take none. Milvus Lite 2.5 ignores ``nprobe``."""
    if index_type == "HNSW":
        return {"ef": max(effort, limit)}
    if index_type.startswith("IVF"):
        return {"nprobe": max(1, min(65536, effort // 2))}
    return {}


#: Server reads see this process's own writes (pymilvus records their timestamps), without the
#: wait for the newest timestamp that "Strong" costs on every call.
READ_CONSISTENCY = "Session"


def _client_class() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pymilvus import MilvusClient
    for name in ("pymilvus", "pymilvus.milvus_client", "pymilvus.bulk_writer"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # its errors become one StoreError line
    return MilvusClient


def _new_client(**kwargs: Any) -> Any:
    client_class = _client_class()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return client_class(**kwargs)


def is_milvus_error(exc: BaseException) -> bool:
    module = type(exc).__module__
    return module.startswith("pymilvus") or "grpc" in module


def short(text: str) -> str:
    """``text`` as one line of bounded length, for an error message."""
    return " ".join(text.split())[:200]


def common_operation_error(exc: BaseException, uri: str, collection: str) -> StoreError:
    """A failed call, in words, where the backend adds nothing more specific."""
    text = short(str(getattr(exc, "message", "") or exc))
    lowered = text.lower()
    if "auth" in lowered or "permission denied" in lowered:
        return auth_error(uri)
    if "unavailable" in lowered or "connect" in lowered:
        return StoreError(f"lost connection to Milvus at {uri}: is the server still running? ({text})")
    if "no space" in lowered or "disk" in lowered:
        return StoreError(f"index {uri} could not be written ({text}): free disk space")
    return StoreError(f"Milvus error on {uri} ({collection}): {text}")


def auth_error(uri: str) -> StoreError:
    return StoreError(f"authentication failed for {uri}: check --token / PIXFIND_TOKEN")


def _is_auth_failure(text: str) -> bool:
    lowered = text.lower()
    return "auth" in lowered or "credential" in lowered or "permission" in lowered


class LitePolicy:
    """A Milvus Lite file: locked by pixfind, its engine started by pixfind, searched exactly
    (FLAT) and written in bounded batches; reads see every write at once."""

    is_server = False

    def __init__(self, uri: str, wait: bool) -> None:
        self.uri = str(Path(uri).expanduser().absolute())
        self._wait = wait
        self._lock: LiteLock | None = None
        self._engine: LiteEngine | None = None
        self.early: EarlyRead | None = None  # while an index opened to read is described early

    # -- opening and closing

    def check_location(self, create: bool) -> None:
        db = Path(self.uri)
        if not create and not db.exists():
            raise StoreError(f"no index at {db} yet: run `pixfind index FOLDER` first, or pass --uri")
        check_lite_path(db.resolve())

    def can_defer(self) -> bool:
        """Whether the file does not exist yet (once any run making it right now has finished)."""
        db = Path(self.uri)
        if not db.exists():
            LiteLock(db, wait=self._wait).wait_until_free()
        return not db.exists()

    def connect(self, collection: str, preload: bool) -> Any:
        """Lock the file (making its folder), start its engine and connect. ``preload``: the index
        is opened to read, so its collection is described and loaded as soon as the engine
        answers; the first read needs it anyway."""
        db = Path(self.uri)
        make_lite_folder(db.resolve())
        self._lock = LiteLock(db, wait=self._wait)
        self._lock.acquire()
        starting = EngineStart(self.uri, collection if preload else None, LITE_CALL_TIMEOUT_S)
        _client_class()  # the pymilvus import, while the engine starts
        try:
            self._engine = starting.result()
        except Exception as exc:
            raise StoreError(f"cannot open index {self.uri}: {short(str(exc))}") from exc
        finally:
            self.early = starting.early
        if self._engine is None:
            raise self.open_error()
        try:
            return _new_client(uri=self._engine.uri)
        except Exception as exc:
            if _is_auth_failure(str(exc)):
                raise auth_error(self.uri) from exc
            raise StoreError(f"cannot open index {self.uri}: {short(str(exc))}") from exc

    def open_error(self) -> StoreError:
        if nearly_full(Path(self.uri).parent):
            return StoreError(f"no space left for index {self.uri}: free some disk space and run again")
        return StoreError(
            f"Milvus Lite could not open {self.uri}: the file is damaged, or a program other than "
            "pixfind has it open; move it away or pass --uri with another path"
        )

    def end_early_read(self) -> None:
        if self.early is not None:
            self.early.close()
            self.early = None

    def close(self) -> None:
        """After the client is closed: stop the engine (pymilvus would keep it, and so the file,
        until this process exits) and unlock the file."""
        self.end_early_read()
        if self._engine is not None:
            self._engine.stop()
            self._engine = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- calls

    def call_options(self, name: str, on_client: bool, retry: bool) -> dict[str, Any]:
        return {"timeout": LITE_CALL_TIMEOUT_S} if on_client else {}  # bounds pymilvus's retries too

    def operation_error(self, exc: BaseException, collection: str) -> StoreError:
        if nearly_full(Path(self.uri).parent):
            # Milvus Lite only says "Unexpected error in RPC handling" when its disk is full
            return StoreError(
                f"no space left for index {self.uri}: free some disk space and run again "
                "(everything written before is kept)"
            )
        return common_operation_error(exc, self.uri, collection)

    # -- collections and rows

    create_consistency = "Strong"
    #: A long-lived process may put the file on an IVF index while it serves (see
    #: ``Store.index_for_serving``); otherwise the exact FLAT index, which takes no parameters.
    serving_index = True

    def index_config(self) -> dict[str, Any]:
        """The exact index a Lite file keeps on disk (an IVF index is rebuilt on every open)."""
        return {"index_type": "FLAT", "metric_type": METRIC}

    @staticmethod
    def serving_index_config(rows: int) -> dict[str, Any]:
        nlist = max(64, min(4096, int(4 * rows**0.5)))
        return {"index_type": "IVF_FLAT", "metric_type": METRIC, "params": {"nlist": nlist}}

    @staticmethod
    def write_batches(rows: Sequence[Row]) -> Iterator[Sequence[Row]]:
        for start in range(0, len(rows), WRITE_BATCH):
            yield rows[start : start + WRITE_BATCH]

    # -- what reads must wait for: nothing, Lite reads see every write

    unsynced = False

    def ready(self, store: Store) -> None:
        pass

    def read_options(self) -> dict[str, Any]:
        return {}

    def wrote(self, deleted: bool = False) -> None:
        pass

    def sync(self, store: Store) -> None:
        pass

    def flush(self, store: Store) -> None:
        pass

    def forget(self) -> None:
        self.end_early_read()  # its description is of a dropped collection


class ServerPolicy:
    """A Milvus server: reachability checked first, every call bounded in time and retries, an
    HNSW index loaded once per Store, and reads that wait for this process's own writes."""

    is_server = True
    early = None
    create_consistency = "Bounded"
    serving_index = False  # a server's ANN index serves as it is

    def __init__(self, uri: str, token: str | None) -> None:
        self.uri = uri
        self.token = token
        self._loaded = False
        self.unsynced = False  # written since the last sync
        self._deleted = False  # deleted since the last Strong read

    def check_location(self, create: bool) -> None:
        pass

    def can_defer(self) -> bool:
        return False

    def connect(self, collection: str, preload: bool) -> Any:
        _client_class()
        self._check_reachable()
        kwargs: dict[str, Any] = {"uri": self.uri, "timeout": CONNECT_TIMEOUT_S}
        if self.token:
            kwargs["token"] = self.token
        try:
            return _new_client(**kwargs)
        except Exception as exc:
            raise self._connection_error(exc) from exc

    def _check_reachable(self) -> None:
        """Fail in seconds, not after gRPC's retries, when nothing listens at the URI."""
        from urllib.parse import urlsplit

        parsed = urlsplit(self.uri)
        if parsed.scheme == "unix" or not parsed.hostname:
            return
        try:
            port = parsed.port or (443 if parsed.scheme == "https" else 19530)
        except ValueError:
            raise StoreError(f"bad port in {self.uri}: check --uri / PIXFIND_URI") from None
        try:
            with socket.create_connection((parsed.hostname, port), REACH_TIMEOUT_S):
                return
        except socket.gaierror:
            why = f"unknown host {parsed.hostname!r}"
        except TimeoutError:
            why = f"no answer within {REACH_TIMEOUT_S:g} s"
        except ConnectionRefusedError:
            why = "connection refused (is the server running?)"
        except OSError as exc:
            why = exc.strerror or str(exc)
        raise StoreError(f"cannot reach Milvus at {self.uri}: {why}; check --uri / PIXFIND_URI")

    def _connection_error(self, exc: BaseException) -> StoreError:
        text = str(exc)
        if _is_auth_failure(text):
            return auth_error(self.uri)
        lowered = text.lower()
        if "unavailable" in lowered or "fail connecting" in lowered:
            # Something accepted the TCP probe but gave no Milvus answer in time: another
            # program on that port, or (pymilvus >= 2.6 reports it so) a rejected token.
            token_hint = "--token / PIXFIND_TOKEN" if self.token else "a token (--token / PIXFIND_TOKEN)"
            return StoreError(
                f"cannot connect to Milvus at {self.uri}: something accepts connections there but "
                f"gave no Milvus answer within {CONNECT_TIMEOUT_S:g} s; check the port (Milvus "
                f"listens on 19530) and {token_hint}"
            )
        return StoreError(f"cannot connect to Milvus at {self.uri}: {short(text)}")

    def end_early_read(self) -> None:
        pass

    def close(self) -> None:
        pass

    def call_options(self, name: str, on_client: bool, retry: bool) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if retry:
            options["retry_times"] = SERVER_RETRIES
        if on_client:
            options["timeout"] = SERVER_BULK_TIMEOUT_S if name in SERVER_BULK_CALLS else SERVER_CALL_TIMEOUT_S
        return options

    def operation_error(self, exc: BaseException, collection: str) -> StoreError:
        return common_operation_error(exc, self.uri, collection)

    def index_config(self) -> dict[str, Any]:
        return dict(SERVER_INDEX)

    @staticmethod
    def write_batches(rows: Sequence[Row]) -> Iterator[Sequence[Row]]:
        start, size = 0, 0
        for end, row in enumerate(rows):
            row_bytes = 4 * len(row.vector) + len(row.key.encode()) + len(row.fingerprint) + 256
            if end > start and (end - start >= SERVER_WRITE_ROWS or size + row_bytes > SERVER_WRITE_BYTES):
                yield rows[start:end]
                start, size = end, 0
            size += row_bytes
        if start < len(rows):
            yield rows[start:]

    def ready(self, store: Store) -> None:
        """Load the collection once per Store (a restart or a release unloads it)."""
        if self._loaded:
            return
        from pymilvus.client.types import LoadState

        state = store._call(store.client.get_load_state, store.collection).get("state")
        if state == LoadState.NotLoad:
            store._call(store.client.load_collection, store.collection)
        self._loaded = state != LoadState.NotExist

    def read_options(self) -> dict[str, Any]:
        """A read sees this process's writes."""
        if self._deleted:
            # Milvus 2.3 returns no timestamp for a delete, so "Session" cannot wait for it
            self._deleted = False
            return {"consistency_level": "Strong"}
        return {"consistency_level": READ_CONSISTENCY}

    def wrote(self, deleted: bool = False) -> None:
        self.unsynced = True
        self._deleted = self._deleted or deleted

    def sync(self, store: Store) -> None:
        """Wait until every write made so far is visible to searches from any process."""
        if store.exists():
            self.ready(store)
            store._call(
                store.client.query, store.collection, filter="", output_fields=["count(*)"], consistency_level="Strong"
            )
        self.unsynced = self._deleted = False

    def flush(self, store: Store) -> None:
        """Seal the growing segments (so the ANN index is built for them), then sync."""
        store._call(store.client.flush, store.collection)
        self.sync(store)

    def forget(self) -> None:
        """The collection was dropped."""
        self._loaded = False
        self.unsynced = self._deleted = False
