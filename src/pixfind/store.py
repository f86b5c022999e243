"""Where vectors are written and searched: one Milvus collection, embedded (Lite) or on a server.

Schema (version 1), explicit, no dynamic fields:

    path         VARCHAR  primary key: the file's absolute path (see pathkeys for the few escapes)
    vector       FLOAT_VECTOR(dim), COSINE
    size         INT64    bytes          } together with mtime: "has this file changed?"
    mtime_ns     INT64    nanoseconds    }
    width        INT32    pixels as displayed (EXIF rotation applied)
    height       INT32
    fingerprint  VARCHAR  hash of size + first and last 64 KiB: finds renamed or moved files

The collection's description holds JSON recording the app, schema version, model, weights and
dimension, so a collection is never filled or searched with vectors from another model.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ModelSpec, is_server_uri
from .errors import IndexLockedError, ModelMismatchError, StoreError
from .pathkeys import MAX_KEY_BYTES, folder_prefix_filter, keys_filter, path_of

SCHEMA_VERSION = 1
APP = "pixfind"
VECTOR = "vector"
META_FIELDS = ["path", "size", "mtime_ns", "width", "height", "fingerprint"]

#: Rows per insert call. Milvus Lite 2.5 slows ~30x on calls of 4,000+ rows; a server's gRPC
#: limit (64 MiB) allows ~30k 512-d rows. 1,000 is fast on both.
WRITE_BATCH = 1000
#: Keys per ``path in [...]`` lookup or delete.
LOOKUP_BATCH = 500
CONNECT_TIMEOUT_S = 8.0


@dataclass(frozen=True)
class CollectionInfo:
    """What a collection records about itself."""

    model: ModelSpec
    dim: int
    schema: int = SCHEMA_VERSION

    def to_description(self) -> str:
        return json.dumps(
            {
                "app": APP,
                "schema": self.schema,
                "model": self.model.name,
                "weights": self.model.weights,
                "dim": self.dim,
            }
        )

    @classmethod
    def from_description(cls, text: str) -> CollectionInfo | None:
        try:
            data = json.loads(text)
        except (TypeError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("app") != APP:
            return None
        return cls(
            model=ModelSpec.from_weights(str(data["model"]), str(data["weights"])),
            dim=int(data["dim"]),
            schema=int(data.get("schema", 1)),
        )


@dataclass
class StoredFile:
    size: int
    mtime_ns: int
    fingerprint: str


@dataclass
class Row:
    """One image ready to be written."""

    key: str
    vector: Sequence[float]
    size: int
    mtime_ns: int
    width: int
    height: int
    fingerprint: str

    def to_entity(self) -> dict[str, Any]:
        return {
            "path": self.key,
            VECTOR: list(map(float, self.vector)),
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "width": self.width,
            "height": self.height,
            "fingerprint": self.fingerprint,
        }


@dataclass
class SearchHit:
    path: str
    score: float
    width: int
    height: int
    size: int


#: Seconds one Milvus Lite call may take, retries included (without it pymilvus retries a failing
#: call 75 times, for 3.5 minutes, e.g. when the disk is full). The slowest normal call (1,000-row
#: upsert, 1M-row search) takes well under a second.
LITE_CALL_TIMEOUT_S = 60
#: File names Milvus Lite 2.5 accepts for its database (it refuses others with a traceback).
LITE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")
LITE_NAME_MAX = 36
#: Free space below which a failed write on Milvus Lite is reported as "disk full".
NEARLY_FULL_BYTES = 4 << 20


class LiteLock:
    """An ``fcntl`` lock on a side file of a Milvus Lite database.

    Milvus Lite 2.5's own lock is unreliable (a failed second opener deletes the lock it never
    held, after which two processes write one file), so pixfind takes its own before opening.
    The lock file holds the owner's pid, to name it in the error.
    """

    def __init__(self, db_path: Path, wait: bool = False, timeout: float | None = None) -> None:
        self.path = db_path.with_name(db_path.name + ".lock")
        self.wait = wait
        self.timeout = timeout
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(
                f"cannot create {self.path}: {exc.strerror}; choose a writable place with --uri"
            ) from exc
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not self.wait or (deadline is not None and time.monotonic() > deadline):
                    owner = _read_pid(fd)
                    os.close(fd)
                    who = f"pid {owner}" if owner else "another process"
                    raise IndexLockedError(
                        f"index {self.path.with_suffix('')} is being used by {who}: "
                        "wait for it to finish (or pass --wait), or use a Milvus server for "
                        "concurrent access"
                    ) from None
                time.sleep(0.2)
        with contextlib.suppress(OSError):  # the pid is only for messages; a full disk may refuse it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


class Store:
    """A pixfind collection in Milvus. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        uri: str,
        token: str | None = None,
        collection: str = "pixfind",
        wait: bool = False,
        create: bool = True,
    ) -> None:
        self.uri = uri
        self.token = token
        self.collection = collection
        self.is_server = is_server_uri(uri)
        self._lock: LiteLock | None = None
        self._info: CollectionInfo | None = None
        if not self.is_server:
            db = Path(uri).expanduser().absolute()
            if not create and not db.exists():
                raise StoreError(f"no index at {db} yet: run `pixfind index FOLDER` first, or pass --uri")
            self._prepare_lite_path(db)
            self.uri = str(db)
            self._lock = LiteLock(db, wait=wait)
            self._lock.acquire()
        try:
            self.client = self._connect() if self.is_server else self._connect_lite()
        except BaseException:
            self.close()
            raise

    # -- connection -------------------------------------------------------------------------

    @staticmethod
    def _prepare_lite_path(db: Path) -> None:
        if not set(db.name) <= LITE_NAME_CHARS or len(db.name) > LITE_NAME_MAX:
            raise StoreError(
                f"Milvus Lite cannot use the file name {db.name!r}: use at most {LITE_NAME_MAX} letters, "
                "digits, '.', '-' or '_' (e.g. --uri pixfind.db)"
            )
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create folder {db.parent}: {exc.strerror}; pass --uri with a writable path"
            ) from exc
        if db.exists() and db.is_dir():
            raise StoreError(f"{db} is a folder, not an index file: pass --uri FILE.db")
        if db.exists() and db.stat().st_size > 0 and not _looks_like_lite(db):
            raise StoreError(
                f"{db} is not a Milvus Lite index (foreign or corrupt file): "
                "move it away or pass --uri with another path"
            )
        if not os.access(db.parent, os.W_OK):
            raise StoreError(f"index folder {db.parent} is not writable: pass --uri with a writable path")

    def _connect(self) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pymilvus import MilvusClient
        for name in ("pymilvus", "pymilvus.milvus_client", "pymilvus.bulk_writer"):
            logging.getLogger(name).setLevel(logging.CRITICAL)  # its errors become one StoreError line

        kwargs: dict[str, Any] = {"uri": self.uri}
        if self.is_server:
            kwargs["timeout"] = CONNECT_TIMEOUT_S
            if self.token:
                kwargs["token"] = self.token
        try:
            with warnings.catch_warnings(), _sigint_kept_from_child(not self.is_server):
                warnings.simplefilter("ignore")
                return MilvusClient(**kwargs)
        except Exception as exc:
            raise self._connection_error(exc) from exc

    def _connect_lite(self) -> Any:
        try:
            return self._connect()
        except StoreError as exc:
            if "Open local milvus failed" not in str(exc):
                raise
            if _nearly_full(Path(self.uri).parent):
                raise StoreError(f"no space left for index {self.uri}: free some disk space and run again") from exc
            raise StoreError(
                f"Milvus Lite could not open {self.uri}: the file is damaged, or a program other than "
                "pixfind has it open; move it away or pass --uri with another path"
            ) from exc

    def _connection_error(self, exc: BaseException) -> StoreError:
        text = str(exc)
        lowered = text.lower()
        if "auth" in lowered or "credential" in lowered or "permission" in lowered:
            return StoreError(f"authentication failed for {self.uri}: check --token / PIXFIND_TOKEN")
        if self.is_server:
            # pymilvus >= 2.6 reports a rejected token as "server unavailable"
            unavailable = "unavailable" in lowered or "fail connecting" in lowered
            if self.token and unavailable and _server_answers(self.uri):
                return StoreError(f"authentication failed for {self.uri}: check --token / PIXFIND_TOKEN")
            return StoreError(
                f"cannot reach Milvus at {self.uri}: is the server running? check --uri / PIXFIND_URI"
            )
        return StoreError(f"cannot open index {self.uri}: {_short(text)}")

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
            self.client = None
            if not self.is_server:
                _release_lite(self.uri)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- collection ---------------------------------------------------------------------------

    def exists(self) -> bool:
        return bool(self._call(self.client.has_collection, self.collection))

    def info(self) -> CollectionInfo | None:
        """What the collection records, or None when it does not exist yet."""
        if self._info is None and self.exists():
            description = self._call(self.client.describe_collection, self.collection)
            info = CollectionInfo.from_description(description.get("description", ""))
            if info is None:
                raise StoreError(
                    f"collection {self.collection!r} at {self.uri} was not created by pixfind: "
                    "choose another with --collection / PIXFIND_COLLECTION"
                )
            if info.schema > SCHEMA_VERSION:
                raise StoreError(
                    f"collection {self.collection!r} has schema v{info.schema}, newer than this "
                    f"pixfind (v{SCHEMA_VERSION}): upgrade pixfind"
                )
            self._check_fields(description)
            _check_vector_dim(description, info, self.collection)
            self._info = info
        return self._info

    def _check_fields(self, description: dict[str, Any]) -> None:
        names = {f["name"] for f in description.get("fields", [])}
        missing = set([*META_FIELDS, VECTOR]) - names
        if missing:
            raise StoreError(
                f"collection {self.collection!r} lacks fields {sorted(missing)}: it is damaged or "
                "foreign; choose another with --collection"
            )

    def ensure(self, model: ModelSpec, dim: int) -> CollectionInfo:
        """Open the collection for ``model``, creating it if needed; refuse another model's."""
        info = self.info()
        if info is not None:
            check_same_model(info, model, dim, self.collection)
            return info
        self._create(CollectionInfo(model=model, dim=dim))
        self._info = None
        created = self.info()
        assert created is not None
        return created

    def _create(self, info: CollectionInfo) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(
            auto_id=False, enable_dynamic_field=False, description=info.to_description()
        )
        schema.add_field("path", DataType.VARCHAR, is_primary=True, max_length=MAX_KEY_BYTES)
        schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=info.dim)
        schema.add_field("size", DataType.INT64)
        schema.add_field("mtime_ns", DataType.INT64)
        schema.add_field("width", DataType.INT32)
        schema.add_field("height", DataType.INT32)
        schema.add_field("fingerprint", DataType.VARCHAR, max_length=64)
        index = self.client.prepare_index_params()
        index.add_index(VECTOR, **self._index_config())
        self._call(
            self.client.create_collection,
            self.collection,
            schema=schema,
            index_params=index,
            consistency_level="Strong" if not self.is_server else "Bounded",
        )

    def _index_config(self) -> dict[str, Any]:
        if not self.is_server:
            return {"index_type": "FLAT", "metric_type": "COSINE"}
        return {
            "index_type": "HNSW",
            "metric_type": "COSINE",
            "params": {"M": 16, "efConstruction": 200},
        }

    def count(self) -> int:
        if not self.exists():
            return 0
        result = self._call(
            self.client.query, self.collection, filter="", output_fields=["count(*)"]
        )
        return int(result[0]["count(*)"]) if result else 0

    def drop(self) -> None:
        if self.exists():
            self._call(self.client.drop_collection, self.collection)
        self._info = None

    # -- rows -----------------------------------------------------------------------------------

    def lookup(self, keys: Sequence[str]) -> dict[str, StoredFile]:
        """Stored size/mtime/fingerprint for those of ``keys`` that are in the index."""
        found: dict[str, StoredFile] = {}
        for start in range(0, len(keys), LOOKUP_BATCH):
            chunk = list(keys[start : start + LOOKUP_BATCH])
            rows = self._call(
                self.client.query,
                self.collection,
                filter=keys_filter(chunk),
                output_fields=["path", "size", "mtime_ns", "fingerprint"],
            )
            for row in rows:
                found[row["path"]] = StoredFile(row["size"], row["mtime_ns"], row["fingerprint"])
        return found

    def find_by_fingerprint(self, fingerprints: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """Rows (with vectors) whose fingerprint is one of ``fingerprints``: rename candidates."""
        out: dict[str, list[dict[str, Any]]] = {}
        for start in range(0, len(fingerprints), LOOKUP_BATCH):
            chunk = list(fingerprints[start : start + LOOKUP_BATCH])
            rows = self._call(
                self.client.query,
                self.collection,
                filter=keys_filter(chunk, field="fingerprint"),
                output_fields=[*META_FIELDS, VECTOR],
            )
            for row in rows:
                out.setdefault(row["fingerprint"], []).append(row)
        return out

    def write(self, rows: Sequence[Row]) -> None:
        """Upsert rows: a path already stored is replaced, never duplicated."""
        for start in range(0, len(rows), WRITE_BATCH):
            entities = [row.to_entity() for row in rows[start : start + WRITE_BATCH]]
            self._call(self.client.upsert, self.collection, entities)

    def delete(self, keys: Sequence[str]) -> int:
        deleted = 0
        for start in range(0, len(keys), LOOKUP_BATCH):
            chunk = list(keys[start : start + LOOKUP_BATCH])
            result = self._call(self.client.delete, self.collection, filter=keys_filter(chunk))
            deleted += _delete_count(result, len(chunk))
        return deleted

    def iter_keys(self, folder: str | None = None, batch: int = 1000) -> Iterator[list[str]]:
        """Stream the stored keys (under ``folder``), ``batch`` at a time, without holding all."""
        expr = folder_prefix_filter(folder) if folder else 'path != ""'
        iterator = self._call(
            self.client.query_iterator,
            self.collection,
            batch_size=batch,
            filter=expr,
            output_fields=["path"],
        )
        try:
            while True:
                page = self._call(iterator.next)
                if not page:
                    break
                yield [row["path"] for row in page]
        finally:
            with contextlib.suppress(Exception):
                iterator.close()

    def flush(self) -> None:
        """Make every write visible to searches and durable (a no-op cost on Lite)."""
        if self.is_server:
            self._call(self.client.flush, self.collection)

    def search(
        self, vectors: Sequence[Sequence[float]], limit: int, folder: str | None = None
    ) -> list[list[SearchHit]]:
        params: dict[str, Any] = {"metric_type": "COSINE"}
        if self.is_server:
            params["params"] = {"ef": max(128, limit * 2)}
        results = self._call(
            self.client.search,
            self.collection,
            data=[list(map(float, v)) for v in vectors],
            limit=limit,
            filter=folder_prefix_filter(folder) if folder else "",
            output_fields=["path", "width", "height", "size"],
            search_params=params,
        )
        return [[_hit(item) for item in result] for result in results]

    def vectors_of(self, keys: Sequence[str]) -> dict[str, list[float]]:
        rows = self._call(
            self.client.query,
            self.collection,
            filter=keys_filter(list(keys)),
            output_fields=["path", VECTOR],
        )
        return {row["path"]: row[VECTOR] for row in rows}

    # -- errors ---------------------------------------------------------------------------------

    def _call(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.is_server and getattr(func, "__self__", None) is self.client:
            kwargs.setdefault("timeout", LITE_CALL_TIMEOUT_S)  # bounds pymilvus's retries too
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            if type(exc).__module__.startswith("pymilvus") or "grpc" in type(exc).__module__:
                raise self._operation_error(exc) from exc
            raise

    def _operation_error(self, exc: BaseException) -> StoreError:
        if not self.is_server and _nearly_full(Path(self.uri).parent):
            # Milvus Lite only says "Unexpected error in RPC handling" when its disk is full
            return StoreError(
                f"no space left for index {self.uri}: free some disk space and run again "
                "(everything written before is kept)"
            )
        text = _short(str(getattr(exc, "message", "") or exc))
        lowered = text.lower()
        if "auth" in lowered or "permission denied" in lowered:
            return StoreError(f"authentication failed for {self.uri}: check --token / PIXFIND_TOKEN")
        if "unavailable" in lowered or "connect" in lowered:
            return StoreError(f"lost connection to Milvus at {self.uri}: {text}")
        if "no space" in lowered or "disk" in lowered:
            return StoreError(f"index {self.uri} could not be written ({text}): free disk space")
        return StoreError(f"Milvus error on {self.uri} ({self.collection}): {text}")


def check_same_model(info: CollectionInfo, model: ModelSpec, dim: int | None, name: str) -> None:
    if info.model != model or (dim is not None and info.dim != dim):
        raise ModelMismatchError(
            f"collection {name!r} was built with {info.model.describe()}, not {model.describe()}: "
            "drop the model flags to use the recorded one, or use another --collection"
        )


def _hit(item: dict[str, Any]) -> SearchHit:
    entity = item.get("entity", item)
    return SearchHit(
        path=path_of(entity.get("path", item.get("id"))),
        score=float(item["distance"]),
        width=int(entity.get("width", 0)),
        height=int(entity.get("height", 0)),
        size=int(entity.get("size", 0)),
    )


def _delete_count(result: Any, default: int) -> int:
    """Lite returns the deleted keys, a server ``{'delete_count': N}``."""
    if isinstance(result, dict):
        return int(result.get("delete_count", default))
    try:
        return len(result)
    except TypeError:
        return default


def _release_lite(db: str) -> None:
    """Stop the Milvus Lite engine of ``db``: pymilvus leaves it running (holding the file) until
    the process exits, so another process could not open the index after :meth:`Store.close`."""
    with contextlib.suppress(Exception):
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(db)


def _looks_like_lite(db: Path) -> bool:
    """Milvus Lite 2.5 files are SQLite databases with its ``collection_meta`` table. Another
    program's SQLite database is not one: Milvus Lite would add its tables to it."""
    try:
        with db.open("rb") as fh:
            if fh.read(16) != b"SQLite format 3\x00":
                return False
    except OSError:
        return False
    import sqlite3
    from urllib.parse import quote

    try:
        with contextlib.closing(sqlite3.connect(f"file:{quote(str(db))}?mode=ro", uri=True, timeout=5)) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error:
        return False
    return "collection_meta" in tables


def _server_answers(uri: str) -> bool:
    """Is something listening at ``uri``? Tells a rejected token from a dead server."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    try:
        with socket.create_connection((parsed.hostname or "localhost", parsed.port or 19530), 2):
            return True
    except OSError:
        return False


def _check_vector_dim(description: dict[str, Any], info: CollectionInfo, name: str) -> None:
    """The vector field must have the dimension the collection's record claims."""
    for field in description.get("fields", []):
        if field.get("name") == VECTOR:
            dim = (field.get("params") or {}).get("dim")
            if dim is not None and int(dim) != info.dim:
                raise StoreError(
                    f"collection {name!r} records {info.model.describe()} vectors of dimension "
                    f"{info.dim} but stores dimension {dim}: it is damaged or was changed by another "
                    "tool; choose another with --collection"
                )


def _nearly_full(folder: Path) -> bool:
    try:
        info = os.statvfs(folder)
    except OSError:
        return False
    return info.f_bavail * info.f_frsize < NEARLY_FULL_BYTES


def _short(text: str) -> str:
    line = " ".join(text.split())
    return line[:200]


@contextlib.contextmanager
def _sigint_kept_from_child(active: bool) -> Iterator[None]:
    """Start Milvus Lite's server process with SIGINT blocked, so that a Ctrl-C (which the terminal
    sends to the whole process group) reaches pixfind only. Without this the server dies on the
    first Ctrl-C, and the batch pixfind then writes before stopping hangs in pymilvus's retries.
    The signal stays pending here while blocked and is handled as soon as the server is up."""
    import signal

    if not active or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
