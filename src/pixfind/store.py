"""Where vectors are written and searched: one Milvus collection, embedded (Lite) or on a server.

Schema (version 2), explicit, no dynamic fields:

    path         VARCHAR  primary key: the file's absolute path (see pathkeys for the few escapes)
    vector       FLOAT_VECTOR(dim), unit length, inner product (= cosine; older files: COSINE)
    meta         JSON     the file's record:
        size         bytes          } together with mtime: "has this file changed?"
        mtime_ns     nanoseconds    }
        width        pixels as displayed (EXIF rotation applied)
        height
        fingerprint  hash of size + first and last 64 KiB: finds candidates for renamed, moved
                     or copied files
        content      ``blake3:<hex>`` of the whole file, recorded when it is embedded: a candidate
                     reuses this row's vector only if its own content hash is equal (absent
                     in rows written before it existed: those are never reused)

Version 1 (collections made before) had the five as typed fields of their own. Milvus Lite
loads a collection field by field and row by row, only when first asked, and a cold search waits
for that: at 100k rows it took 1.27 s with the five fields and 1.02 s with one JSON field
(docs/speed.md). Both layouts are read and written; a collection keeps the one it was made with.
Schema 1 has no place for the content hash, so its rows never lend their vector to another path.

The collection's description holds JSON recording the app, schema version, model, weights and
dimension, so a collection is never filled or searched with vectors from another model.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ModelSpec, default_search_ef, is_server_uri, search_ef_from
from .errors import IndexLockedError, ModelMismatchError, StoreError
from .pathkeys import MAX_KEY_BYTES, folder_prefix_filter, key_of, keys_filter, path_of
from .vectors import unit_rows

SCHEMA_VERSION = 2
APP = "pixfind"
VECTOR = "vector"
META = "meta"
#: The file's record: one JSON field ``meta`` from schema 2, fields of their own in schema 1.
FILE_FIELDS = ("size", "mtime_ns", "width", "height", "fingerprint")
#: The record's content hash (schema 2's JSON field only).
CONTENT = "content"
HIT_FIELDS_V1 = ["width", "height", "size"]

#: The vector metric of new collections. Vectors are unit length (encoders normalise; the store
#: normalises anything that is not), so inner product *is* the cosine, and Milvus Lite's exact
#: search is faster with it: 18.4 ms against 25.5 ms for COSINE at 100k vectors (same ranking and
#: scores). Searches name no metric, so Milvus uses the index's: collections made with COSINE
#: keep working; a Lite file's FLAT index moves to IP on the next index run.
METRIC = "IP"

#: Rows per insert call on Milvus Lite: 2.5 slows ~30x on calls of 4,000+ rows.
WRITE_BATCH = 1000
#: On a server, rows per insert call, capped by their size: a server refuses gRPC messages over
#: 64 MiB (``proxy.grpc.serverMaxRecvSize``); keys can be 8 KiB, so rows are counted in bytes.
SERVER_WRITE_ROWS = 5000
SERVER_WRITE_BYTES = 16 << 20
#: Keys per ``path in [...]`` lookup or delete.
LOOKUP_BATCH = 500
#: Lite collections from this size get an IVF index while ``pixfind serve`` runs (below it, the
#: exact search takes a few ms anyway).
LITE_SERVING_MIN_ROWS = 50_000
#: Keys per page when streaming stored keys (Milvus caps a query page at 16,384 rows).
ITER_BATCH = 5000
#: A server must accept a TCP connection within this time, then answer gRPC within CONNECT_TIMEOUT_S.
REACH_TIMEOUT_S = 3.0
CONNECT_TIMEOUT_S = 3.0
#: Retries of a call to a server that stopped answering (backoff 0.01 s x3 each: ~4 s in all).
SERVER_RETRIES = 6
#: Longest one attempt of a call to a server may wait for its answer: a frozen server
#: (connection up, no reply) fails the call in this time instead of holding it. A float on
#: purpose: pymilvus gives a float ``timeout`` to gRPC as each attempt's deadline and keeps
#: counting retries by SERVER_RETRIES, while an int would become the retries' total time too (a
#: server that went away would then be retried for the whole 10 s instead of ~4).
SERVER_CALL_TIMEOUT_S = 10.0
#: The same for the calls that build, load or flush a whole collection (minutes at millions of rows).
SERVER_BULK_TIMEOUT_S = 900.0
SERVER_BULK_CALLS = frozenset({"create_collection", "create_index", "load_collection", "flush", "drop_index"})
#: The ANN index on a server, chosen by measurement (benchmarks/search_latency.py, 100k clustered
#: 512-d vectors, Milvus 2.3.5 on 2 cores): HNSW M=16 gives recall@10 0.996 at ef 32 and 0.999 at
#: ef 64, p50 3 ms, ~1,500 q/s in batches; efConstruction 100 builds in 40 s where 200 takes 84 s
#: for the same recall. IVF_FLAT (nlist 1024) matched the recall but served batches 10x slower.
SERVER_INDEX: dict[str, Any] = {
    "index_type": "HNSW",
    "metric_type": METRIC,
    "params": {"M": 16, "efConstruction": 100},
}
#: Server reads see this process's own writes (pymilvus records their timestamps), without the
#: wait for the newest timestamp that "Strong" costs on every call (~200 ms).
READ_CONSISTENCY = "Session"


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
    content: str | None = None  # the whole file's hash (ingest.content.content_hash); schema 2 only

    def to_entity(self, schema: int = SCHEMA_VERSION) -> dict[str, Any]:
        record: dict[str, Any] = {name: getattr(self, name) for name in FILE_FIELDS}
        if schema >= 2:
            if self.content:
                record[CONTENT] = self.content
            return {"path": self.key, VECTOR: unit_rows(self.vector)[0].tolist(), META: record}
        return {"path": self.key, VECTOR: unit_rows(self.vector)[0].tolist(), **record}


def record_fields(schema: int) -> list[str]:
    """The output fields that hold a file's record in a collection of ``schema``."""
    return [META] if schema >= 2 else list(FILE_FIELDS)


def flat_record(row: dict[str, Any]) -> dict[str, Any]:
    """A row read from either layout, with the record's entries at its top level."""
    record = row.get(META)
    return {**row, **record} if isinstance(record, dict) else row


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
    The lock file holds the owner's pid, to name it in the error. It sits beside the file with
    its links resolved, so that two routes to one file (a symbolic link, the real name) take the
    one lock.
    """

    def __init__(self, db_path: Path, wait: bool = False, timeout: float | None = None) -> None:
        real = db_path.resolve()
        self.path = real.with_name(real.name + ".lock")
        self.index = db_path
        self.wait = wait
        self.timeout = timeout
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot create {self.path}: {exc.strerror}; choose a writable place with --uri") from exc
        self._lock(fd)
        with contextlib.suppress(OSError):  # the pid is only for messages; a full disk may refuse it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def wait_until_free(self) -> None:
        """Return once nobody holds the lock (at once if its file does not exist), creating
        nothing; without ``wait``, raise IndexLockedError if it is held."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # no lock file: nobody is making or using the index
        self._lock(fd)  # closes fd if it fails
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _lock(self, fd: int) -> None:
        """Lock ``fd`` exclusively, waiting if asked; on failure ``fd`` is closed."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if not self.wait or (deadline is not None and time.monotonic() > deadline):
                    owner = _read_pid(fd)
                    os.close(fd)
                    who = f"pid {owner}" if owner else "another process"
                    raise IndexLockedError(
                        f"index {self.index} is being used by {who}: "
                        "wait for it to finish (or pass --wait), or use a Milvus server for "
                        "concurrent access"
                    ) from None
                time.sleep(0.2)

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
        search_ef: int | None = None,
        defer: bool = False,
    ) -> None:
        """``search_ef``: effort of a server search (HNSW ``ef``; IVF ``nprobe`` is derived from
        it), trading speed for recall; None: ``$PIXFIND_SEARCH_EF`` or the default. Embedded
        Lite indexes are searched exactly and ignore it.

        ``defer``: a Lite file that does not exist yet is made (its folder, lock file and the
        file itself) only when a collection is created in it (:meth:`ensure`), so that a run
        failing before it has anything to store (no weights, an unknown model, no image) leaves
        nothing behind. Until then the store reads as empty, and holds no lock; the lock is taken
        before the file is made, so two runs can never both create it."""
        self.uri = uri
        self.token = token
        self.collection = collection
        self.is_server = is_server_uri(uri)
        self.search_ef = default_search_ef() if search_ef is None else search_ef_from(search_ef)
        self._lock: LiteLock | None = None
        self._info: CollectionInfo | None = None
        self._loaded = False
        self._index_described: tuple[str, str] | None = None  # (type, metric)
        self._serving_index = False  # Lite switched to IVF_FLAT by index_for_serving()
        self._unsynced = False  # written on a server since the last sync
        self._deleted = False  # deleted on a server since the last Strong read
        self._early: _EarlyRead | None = None  # a Lite index opened to read: see _LiteEngineStart
        self._wait = wait
        self._pending: Path | None = None  # a deferred Lite file, made by _open_pending()
        self.client: Any = None
        if self.is_server:
            self._open(preload=False)
            return
        db = Path(uri).expanduser().absolute()
        self.uri = str(db)
        if not create and not db.exists():
            raise StoreError(f"no index at {db} yet: run `pixfind index FOLDER` first, or pass --uri")
        self._check_lite_path(db.resolve())
        if defer and not db.exists():
            LiteLock(db, wait=wait).wait_until_free()  # another run may be making it right now
        if defer and not db.exists():
            self._pending = db
            return
        self._open(preload=not create)

    def _open(self, preload: bool) -> None:
        """Connect; a Lite file is locked first (and its folder made)."""
        if not self.is_server:
            db = Path(self.uri)
            self._make_lite_folder(db.resolve())
            self._lock = LiteLock(db, wait=self._wait)
            self._lock.acquire()
        try:
            self.client = self._connect() if self.is_server else self._connect_lite(preload=preload)
        except BaseException:
            self.close()
            raise

    def _open_pending(self) -> None:
        """Make the deferred Lite file now: there is something to store."""
        if self._pending is not None:
            self._open(preload=False)  # may fail (the lock is held): then still pending
            self._pending = None
            self._info = None  # another run may have made it meanwhile: read its record

    # -- connection -------------------------------------------------------------------------

    @staticmethod
    def _check_lite_path(db: Path) -> None:
        """Refuse, without creating anything, a Lite location that cannot work (``db`` with its
        links resolved: Milvus Lite opens that file)."""
        if not set(db.name) <= LITE_NAME_CHARS or len(db.name) > LITE_NAME_MAX:
            raise StoreError(
                f"Milvus Lite cannot use the file name {db.name!r}: use at most {LITE_NAME_MAX} letters, "
                "digits, '.', '-' or '_' (e.g. --uri pixfind.db)"
            )
        existing = db.parent
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if not existing.is_dir():
            raise StoreError(f"cannot create folder {db.parent}: {existing} is a file; pass --uri with a writable path")
        if not os.access(existing, os.W_OK):
            what = "index folder" if existing == db.parent else f"cannot create folder {db.parent}:"
            raise StoreError(f"{what} {existing} is not writable: pass --uri with a writable path")
        if db.exists() and db.is_dir():
            raise StoreError(f"{db} is a folder, not an index file: pass --uri FILE.db")
        if db.exists() and db.stat().st_size > 0 and not _looks_like_lite(db):
            raise StoreError(
                f"{db} is not a Milvus Lite index (foreign or corrupt file): "
                "move it away or pass --uri with another path"
            )

    @staticmethod
    def _make_lite_folder(db: Path) -> None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create folder {db.parent}: {exc.strerror}; pass --uri with a writable path"
            ) from exc
        if not os.access(db.parent, os.W_OK):
            raise StoreError(f"index folder {db.parent} is not writable: pass --uri with a writable path")

    def _connect(self, lite_engine: _LiteEngineStart | None = None) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pymilvus import MilvusClient
        for name in ("pymilvus", "pymilvus.milvus_client", "pymilvus.bulk_writer"):
            logging.getLogger(name).setLevel(logging.CRITICAL)  # its errors become one StoreError line

        if lite_engine is not None and lite_engine.result() is False:
            # no second try: a failed start deletes the engine's lock file (milvus_lite's
            # Server.stop), so a retry would open a file another program holds
            raise self._lite_open_error()
        if self.is_server:
            self._check_reachable()
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

    def _connect_lite(self, preload: bool) -> Any:
        """``preload``: the index is opened to read (search, info, serve), so its collection is
        loaded as soon as the engine answers; the first read needs it anyway."""
        starting = _LiteEngineStart(self.uri, self.collection if preload else None)
        try:
            return self._connect(starting)
        except StoreError as exc:
            if "Open local milvus failed" not in str(exc):
                raise
            raise self._lite_open_error() from exc
        finally:
            starting.result()
            self._early = starting.early

    def _lite_open_error(self) -> StoreError:
        if _nearly_full(Path(self.uri).parent):
            return StoreError(f"no space left for index {self.uri}: free some disk space and run again")
        return StoreError(
            f"Milvus Lite could not open {self.uri}: the file is damaged, or a program other than "
            "pixfind has it open; move it away or pass --uri with another path"
        )

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
        why = None
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
        lowered = text.lower()
        if "auth" in lowered or "credential" in lowered or "permission" in lowered:
            return self._auth_error()
        if self.is_server:
            if "unavailable" in lowered or "fail connecting" in lowered:
                # Something accepted the TCP probe but gave no Milvus answer in time: another
                # program on that port, or (pymilvus >= 2.6 reports it so) a rejected token.
                token_hint = "--token / PIXFIND_TOKEN" if self.token else "a token (--token / PIXFIND_TOKEN)"
                return StoreError(
                    f"cannot connect to Milvus at {self.uri}: something accepts connections there but "
                    f"gave no Milvus answer within {CONNECT_TIMEOUT_S:g} s; check the port (Milvus "
                    f"listens on 19530) and {token_hint}"
                )
            return StoreError(f"cannot connect to Milvus at {self.uri}: {_short(text)}")
        return StoreError(f"cannot open index {self.uri}: {_short(text)}")

    def _auth_error(self) -> StoreError:
        return StoreError(f"authentication failed for {self.uri}: check --token / PIXFIND_TOKEN")

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            if self._unsynced:
                # other processes (a search right after `pixfind index`) must see every row
                with contextlib.suppress(Exception):
                    self.sync()
            with contextlib.suppress(Exception):
                client.close()
            self.client = None
            self._end_early_read()
            if not self.is_server:
                _release_lite(self.uri)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _end_early_read(self) -> None:
        if self._early is not None:
            self._early.close()
            self._early = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- collection ---------------------------------------------------------------------------

    def exists(self) -> bool:
        if self._pending is not None:
            return False
        return bool(self._call(self.client.has_collection, self.collection))

    def info(self) -> CollectionInfo | None:
        """What the collection records, or None when it does not exist yet."""
        if self._info is None:
            description = self._early.description() if self._early is not None else None
            if description is None:
                if not self.exists():
                    return None
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
            self._check_fields(description, info.schema)
            _check_vector_dim(description, info, self.collection)
            self._info = info
        return self._info

    def _check_fields(self, description: dict[str, Any], schema: int) -> None:
        names = {f["name"] for f in description.get("fields", [])}
        missing = {"path", VECTOR, *record_fields(schema)} - names
        if missing:
            raise StoreError(
                f"collection {self.collection!r} lacks fields {sorted(missing)}: it is damaged or "
                "foreign; choose another with --collection"
            )

    def ensure(self, model: ModelSpec, dim: int) -> CollectionInfo:
        """Open the collection for ``model``, creating it if needed; refuse another model's."""
        self._open_pending()
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
        if info.schema >= 2:
            schema.add_field(META, DataType.JSON)
        else:  # only made by tests now, to check that such collections keep working
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
            return {"index_type": "FLAT", "metric_type": METRIC}
        return dict(SERVER_INDEX)

    def _ready(self) -> None:
        """On a server, load the collection once per Store (a restart or a release unloads it)."""
        if not self.is_server or self._loaded:
            return
        from pymilvus.client.types import LoadState

        state = self._call(self.client.get_load_state, self.collection).get("state")
        if state == LoadState.NotLoad:
            self._call(self.client.load_collection, self.collection)
        self._loaded = state != LoadState.NotExist

    def _reads(self) -> dict[str, Any]:
        """Keyword arguments for a read: on a server, see this process's writes."""
        self._ready()
        if not self.is_server:
            return {}
        if self._deleted:
            # Milvus 2.3 returns no timestamp for a delete, so "Session" cannot wait for it
            self._deleted = False
            return {"consistency_level": "Strong"}
        return {"consistency_level": READ_CONSISTENCY}

    def count(self) -> int:
        if not self.exists():
            return 0
        result = self._call(self.client.query, self.collection, filter="", output_fields=["count(*)"], **self._reads())
        return int(result[0]["count(*)"]) if result else 0

    def sync(self) -> None:
        """Wait until every write made so far is visible to searches from any process."""
        if self.is_server and self.exists():
            self._ready()
            self._call(
                self.client.query,
                self.collection,
                filter="",
                output_fields=["count(*)"],
                consistency_level="Strong",
            )
        self._unsynced = self._deleted = False

    def drop(self) -> None:
        if self.exists():
            self._call(self.client.drop_collection, self.collection)
        self._end_early_read()  # its description is of the dropped collection
        self._info = None
        self._loaded = False
        self._index_described = None
        self._unsynced = self._deleted = False

    # -- rows -----------------------------------------------------------------------------------

    def _schema(self) -> int:
        """The layout of the collection (new ones: :data:`SCHEMA_VERSION`)."""
        info = self.info()
        return info.schema if info is not None else SCHEMA_VERSION

    def lookup(self, keys: Sequence[str]) -> dict[str, StoredFile]:
        """Stored size/mtime/fingerprint for those of ``keys`` that are in the index."""
        found: dict[str, StoredFile] = {}
        if self._pending is not None:
            return found
        fields = ["path", *record_fields(self._schema())]
        for start in range(0, len(keys), LOOKUP_BATCH):
            chunk = list(keys[start : start + LOOKUP_BATCH])
            rows = self._call(
                self.client.query, self.collection, filter=keys_filter(chunk), output_fields=fields, **self._reads()
            )
            for row in map(flat_record, rows):
                found[row["path"]] = StoredFile(row["size"], row["mtime_ns"], row["fingerprint"])
        return found

    def find_by_fingerprint(self, fingerprints: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """Rows (with vectors, the record's entries at the top level) whose fingerprint is one of
        ``fingerprints``: rename candidates."""
        out: dict[str, list[dict[str, Any]]] = {}
        if self._pending is not None:
            return out
        schema = self._schema()
        field = f'{META}["fingerprint"]' if schema >= 2 else "fingerprint"
        for start in range(0, len(fingerprints), LOOKUP_BATCH):
            chunk = list(fingerprints[start : start + LOOKUP_BATCH])
            rows = self._call(
                self.client.query,
                self.collection,
                filter=keys_filter(chunk, field=field),
                output_fields=["path", *record_fields(schema), VECTOR],
                **self._reads(),
            )
            for row in map(flat_record, rows):
                out.setdefault(row["fingerprint"], []).append(row)
        return out

    def write(self, rows: Sequence[Row]) -> None:
        """Upsert rows: a path already stored is replaced, never duplicated.

        Rows are visible to this Store's reads at once; to other processes after :meth:`sync`,
        :meth:`flush` or :meth:`close` (each waits once, not per batch).
        """
        schema = self._schema()
        for batch in self._write_batches(rows):
            self._call(self.client.upsert, self.collection, [row.to_entity(schema) for row in batch])
            self._unsynced = self.is_server

    def _write_batches(self, rows: Sequence[Row]) -> Iterator[Sequence[Row]]:
        if not self.is_server:
            for start in range(0, len(rows), WRITE_BATCH):
                yield rows[start : start + WRITE_BATCH]
            return
        start, size = 0, 0
        for end, row in enumerate(rows):
            row_bytes = 4 * len(row.vector) + len(row.key.encode()) + len(row.fingerprint) + 256
            if end > start and (end - start >= SERVER_WRITE_ROWS or size + row_bytes > SERVER_WRITE_BYTES):
                yield rows[start:end]
                start, size = end, 0
            size += row_bytes
        if start < len(rows):
            yield rows[start:]

    def delete(self, keys: Sequence[str]) -> int:
        """Remove these keys; returns how many were stored (Milvus's own count includes absent
        keys on a server and differs on Lite, so it is not used)."""
        deleted = 0
        keys = list(dict.fromkeys(keys))
        for start in range(0, len(keys), LOOKUP_BATCH):
            present = list(self.lookup(keys[start : start + LOOKUP_BATCH]))
            if present:
                self._call(self.client.delete, self.collection, filter=keys_filter(present))
                self._unsynced = self.is_server
                deleted += len(present)
        # later reads must see the deletions (the chunks above are disjoint, so need not)
        self._deleted = self._deleted or (self.is_server and deleted > 0)
        return deleted

    def delete_paths(self, paths: Sequence[str]) -> int:
        """Remove the row of each of ``paths`` (absolute) and the rows of every file under it (a
        folder, existing or not); returns how many rows went. Names go through :mod:`pathkeys`,
        so a folder ``a_b`` never takes ``axb``'s rows with it."""
        if not self.exists():
            return 0
        deleted = 0
        for path in dict.fromkeys(paths):
            expr = f"{keys_filter([key_of(path)])} or {folder_prefix_filter(path)}"
            found = self._call(
                self.client.query, self.collection, filter=expr, output_fields=["count(*)"], **self._reads()
            )
            count = int(found[0]["count(*)"]) if found else 0
            if count:
                self._call(self.client.delete, self.collection, filter=expr)
                self._unsynced = self.is_server
                self._deleted = self.is_server
                deleted += count
        return deleted

    def iter_keys(self, folder: str | None = None, batch: int = ITER_BATCH) -> Iterator[list[str]]:
        """Stream the stored keys (under ``folder``), ``batch`` at a time, without holding all.

        A query iterator pages through the keys in order, so a million stored rows never sit in
        client memory at once.
        """
        if self._pending is not None:
            return
        expr = folder_prefix_filter(folder) if folder else 'path != ""'
        if self._unsynced:
            self.sync()  # the iterator reads at its own timestamp, not this process's session
        self._ready()
        iterator = self._call(
            self.client.query_iterator,
            self.collection,
            batch_size=batch,
            filter=expr,
            output_fields=["path"],
        )
        try:
            while True:
                page = self._call(iterator.next, _retry=False)  # retries were set for the iterator
                if not page:
                    break
                yield [row["path"] for row in page]
        finally:
            with contextlib.suppress(Exception):
                iterator.close()

    def flush(self) -> None:
        """After a bulk write: make every row durable, indexed and visible to every process.

        On a server this seals the growing segments (so the ANN index is built for them) and
        waits until searches see all writes; call it once at the end, not per batch.
        """
        if self.is_server:
            self._call(self.client.flush, self.collection)
            self.sync()

    def search(
        self, vectors: Sequence[Sequence[float]], limit: int, folder: str | None = None
    ) -> list[list[SearchHit]]:
        if self._pending is not None:
            return [[] for _ in vectors]
        reads = self._reads()
        results = self._call(
            self.client.search,
            self.collection,
            data=unit_rows(vectors).tolist(),
            limit=limit,
            filter=folder_prefix_filter(folder) if folder else "",
            output_fields=["path", *(HIT_FIELDS_V1 if self._schema() < 2 else [META])],
            search_params=self._search_params(limit),
            **reads,
        )
        return [[_hit(item) for item in result] for result in results]

    def _search_params(self, limit: int) -> dict[str, Any]:
        params: dict[str, Any] = {}  # no metric_type: the index's (IP, or COSINE on older files)
        if not self.is_server and not self._serving_index:
            return params  # Lite's exact FLAT index takes no parameters
        kind = self.index_type()
        if kind == "HNSW":
            params["params"] = {"ef": max(self.search_ef, limit)}
        elif kind.startswith("IVF"):  # Milvus Lite 2.5 ignores nprobe (recall@10 0.97 at 100k)
            params["params"] = {"nprobe": max(1, min(65536, self.search_ef // 2))}
        return params

    def index_for_serving(self) -> bool:
        """Milvus Lite: switch to an IVF_FLAT index while one long-lived process answers queries.

        Lite keeps an exact FLAT index on file because it rebuilds an IVF index on every open
        (+1.6 s for a cold search at 100k images); but inside ``pixfind serve`` IVF answers at
        100k in ~2.4 ms instead of ~28 ms, at recall@10 0.97. Small collections stay exact.
        Returns True when switched; call :meth:`restore_index` before closing. A crash leaves IVF
        on file (still correct, but slower to open): the next serve adopts it, the next index run
        restores FLAT.
        """
        rows = 0 if self.is_server else self.count()
        if rows < LITE_SERVING_MIN_ROWS:
            return False
        if self.index_type() == "IVF_FLAT":  # left by a server that was killed: use it
            self._serving_index = True
            return True
        if self.index_type() != "FLAT":
            return False
        nlist = max(64, min(4096, int(4 * rows**0.5)))
        self._replace_lite_index({"index_type": "IVF_FLAT", "metric_type": METRIC, "params": {"nlist": nlist}})
        self._serving_index = True
        return True

    def restore_index(self) -> None:
        """Back to the exact FLAT index of a Lite file (after :meth:`index_for_serving`), with
        :data:`METRIC` (files made by earlier versions have COSINE)."""
        if not self.is_server and self.exists() and (self.index_type(), self.index_metric()) != ("FLAT", METRIC):
            self._replace_lite_index(self._index_config())
        self._serving_index = False

    def _replace_lite_index(self, config: dict[str, Any]) -> None:
        self._call(self.client.release_collection, self.collection)
        with contextlib.suppress(StoreError):  # none left by an earlier, interrupted switch
            self._call(self.client.drop_index, self.collection, VECTOR)
        index = self.client.prepare_index_params()
        index.add_index(VECTOR, **config)
        self._call(self.client.create_index, self.collection, index)
        self._call(self.client.load_collection, self.collection)
        self._index_described = None

    def index_type(self) -> str:
        """The vector index's type (``HNSW``, ``IVF_FLAT``, ``FLAT``, ...), read once."""
        return self._describe_index()[0]

    def index_metric(self) -> str:
        """The vector index's metric (``IP``; ``COSINE`` in collections made by earlier versions)."""
        return self._describe_index()[1]

    def _describe_index(self) -> tuple[str, str]:
        if self._index_described is None:
            kind = metric = ""
            names = self._call(self.client.list_indexes, self.collection, field_name=VECTOR)
            if names:
                described = self._call(self.client.describe_index, self.collection, names[0])
                kind = str(described.get("index_type", ""))
                metric = str(described.get("metric_type", ""))
            self._index_described = (kind.upper(), metric.upper())
        return self._index_described

    def vectors_of(self, keys: Sequence[str]) -> dict[str, list[float]]:
        if self._pending is not None:
            return {}
        rows = self._call(
            self.client.query,
            self.collection,
            filter=keys_filter(list(keys)),
            output_fields=["path", VECTOR],
            **self._reads(),
        )
        return {row["path"]: row[VECTOR] for row in rows}

    # -- errors ---------------------------------------------------------------------------------

    def _call(self, func: Any, *args: Any, _retry: bool = True, **kwargs: Any) -> Any:
        if not self.is_server and getattr(func, "__self__", None) is self.client:
            kwargs.setdefault("timeout", LITE_CALL_TIMEOUT_S)  # bounds pymilvus's retries too
        if self.is_server and _retry:
            # pymilvus retries an unavailable server 75 times (3.5 minutes); a few seconds will do
            kwargs.setdefault("retry_times", SERVER_RETRIES)
        if self.is_server and getattr(func, "__self__", None) is self.client:
            bulk = getattr(func, "__name__", "") in SERVER_BULK_CALLS
            kwargs.setdefault("timeout", SERVER_BULK_TIMEOUT_S if bulk else SERVER_CALL_TIMEOUT_S)
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
            return StoreError(f"lost connection to Milvus at {self.uri}: is the server still running? ({text})")
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
    entity = flat_record(item.get("entity", item))
    return SearchHit(
        path=path_of(entity.get("path", item.get("id"))),
        score=float(item["distance"]),
        width=int(entity.get("width", 0)),
        height=int(entity.get("height", 0)),
        size=int(entity.get("size", 0)),
    )


class _LiteEngineStart:
    """Starts the Milvus Lite engine of ``db`` in a thread, so that its start-up overlaps the
    pymilvus import (~0.3 s of a cold search); ``MilvusClient(db)`` then finds the engine already
    running, as milvus_lite keeps one per path.

    milvus_lite's own start (``Server.start``) always waits 0.5 s to see whether the engine dies;
    the engine answers on its socket after 20-90 ms. :func:`_start_lite_engine` returns as soon as
    it answers (or when it dies), and registers it with milvus_lite's manager as its own start
    would; anything unexpected in milvus_lite falls back to its own start.

    With ``preload``, the thread then asks the engine for that collection's description and to
    load it (:class:`_EarlyRead`), while the caller is still importing pymilvus: Milvus Lite loads
    a collection only when first asked (1.2 s at 100k rows) and answers one request at a time."""

    def __init__(self, db: str, preload: str | None = None) -> None:
        self._db = db
        self._preload = preload
        self._started: bool | None = None  # None: could not tell (left to MilvusClient)
        self.early: _EarlyRead | None = None
        self._thread = threading.Thread(target=self._start, name="pixfind-lite-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        with contextlib.suppress(Exception), _sigint_kept_from_child(True):
            self._started = _start_lite_engine(self._db)
            if self._started and self._preload:
                self.early = _EarlyRead(_lite_socket(self._db), self._preload)

    def result(self) -> bool | None:
        """Wait for the start: True started, False refused (file held, engine failed), None unknown."""
        self._thread.join()
        return self._started


class _EarlyRead:
    """A collection's description, then its load, asked of a just-started Lite engine over its
    socket with grpc alone (imported in 0.06 s; pymilvus takes ~0.35 s, most of it pandas), so
    that the load starts ~0.3 s sooner. The description comes first because the engine answers
    one request at a time: asked after the load, it would wait for it, and so would the query
    encoder that needs the collection's model. Only the two requests are built here (each is one
    string field); the description is decoded with pymilvus' own classes (:meth:`description`)."""

    SERVICE = "/milvus.proto.milvus.MilvusService/"

    def __init__(self, socket_path: str, collection: str) -> None:
        import grpc

        self._channel = grpc.insecure_channel(f"unix:{socket_path}")
        request = _collection_request(collection)
        self._described: bytes | None = self._method("DescribeCollection")(request, timeout=LITE_CALL_TIMEOUT_S)
        self._loading = self._method("LoadCollection").future(request, timeout=LITE_CALL_TIMEOUT_S)

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


def _collection_request(collection: str) -> bytes:
    """The protobuf bytes of a Describe- or LoadCollectionRequest naming only ``collection``
    (field 3, ``collection_name``, in both; checked against pymilvus' messages in the tests)."""
    name = collection.encode()
    length = bytearray()
    n = len(name)
    while n >= 0x80:
        length.append((n & 0x7F) | 0x80)
        n >>= 7
    length.append(n)
    return b"\x1a" + bytes(length) + name


#: How long a starting Milvus Lite engine may take to answer on its socket.
LITE_START_TIMEOUT_S = 10.0
#: Engine starts in this process: with milvus_lite's manager (which pixfind imports only after
#: the start, as milvus_lite's import costs ~0.1 s) they keep one engine per file.
_LITE_START_LOCK = threading.Lock()


@dataclass(frozen=True)
class _LiteCommand:
    args: list[str]
    env: dict[str, str]
    socket_path: str
    lock_path: str
    cwd: str


def _lite_engine_command(key: str) -> _LiteCommand | None:
    """How milvus_lite 2.5's ``Server`` starts the engine for ``key`` (binary, arguments, library
    path, socket, lock file), found without importing milvus_lite; None if it is not installed
    as expected. ``tests/test_indexer.py`` checks it against ``Server``."""
    import importlib.util
    import tempfile

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
    home = _engine_home()
    if home is not None:
        env["HOME"] = home
    args = [str(bin_dir / "milvus"), key, f"unix:{socket_path}", level, lock_path]
    return _LiteCommand(args, env, socket_path, lock_path, str(db.parent))


_ENGINE_HOME: list[str] = []  # the folder made by _engine_home() in this process, if any
_ENGINE_HOME_LOCK = threading.Lock()


def _engine_home() -> str | None:
    """A HOME for the Milvus Lite engine where it can work, or None to keep the user's.

    The engine keeps its memory-mapped data under ``$HOME/.cache/milvus``; where that cannot be
    made (a service account, a locked-down container) every write fails with ``Assert
    "init_flag_ == true" => Mmap manager has not been init``. It then gets a folder of its own:
    ``milvus-lite`` in pixfind's cache folder, or else a private temporary folder, removed when
    the process ends. The engine empties ``.cache/milvus`` itself when it stops.
    """
    from .config import cache_dir

    home = os.environ.get("HOME")
    if home and _can_create(Path(home) / ".cache" / "milvus"):
        return None
    own = cache_dir() / "milvus-lite"
    with contextlib.suppress(OSError):
        (own / ".cache").mkdir(parents=True, exist_ok=True)
        if os.access(own / ".cache", os.W_OK):
            return str(own)
    with _ENGINE_HOME_LOCK:
        if not _ENGINE_HOME:
            import atexit
            import shutil
            import tempfile

            made = tempfile.mkdtemp(prefix="pixfind-milvus-")
            atexit.register(shutil.rmtree, made, True)
            _ENGINE_HOME.append(made)
    return _ENGINE_HOME[0]


def _can_create(path: Path) -> bool:
    """Could this process make ``path`` (or does it exist as a writable folder)?"""
    while not path.exists():
        if path.parent == path:
            return False
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def _start_lite_engine(db: str) -> bool:
    """Start (or find running) this process's Milvus Lite engine for ``db``; False if refused."""
    import subprocess

    key = str(Path(db).absolute().resolve())
    with _LITE_START_LOCK:
        if _lite_server(key) is not None:
            return True
        command = _lite_engine_command(key)
        if command is None:
            from milvus_lite import server_manager

            return server_manager.server_manager_instance.start_and_get_uri(db) is not None
        lock_file = open(command.lock_path, "a")  # noqa: SIM115 (held while the engine runs)
        try:
            fcntl.lockf(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            return False  # another program has the file open
        process = None
        try:
            process = subprocess.Popen(args=command.args, env=command.env, cwd=command.cwd)
            answers = _engine_answers(process, command.socket_path)
            if answers:
                _register_lite_engine(key, process, lock_file, command.socket_path)
                return True
        except BaseException:
            _stop_unregistered(process, lock_file, command.socket_path)
            raise
        _stop_unregistered(process, lock_file, command.socket_path)
        return False


def _lite_server(key: str) -> Any:
    """This process's registered engine for ``key``, or None. milvus_lite registers every engine
    it starts, so an engine can only be running if milvus_lite has been imported."""
    import sys

    module = sys.modules.get("milvus_lite.server_manager")
    manager = getattr(module, "server_manager_instance", None)
    if manager is None:
        return None
    with manager._lock:
        return manager._servers.get(key)


def _register_lite_engine(key: str, process: Any, lock_file: Any, socket_path: str) -> None:
    """Hand a started engine to milvus_lite's manager, as ``Server.start`` would leave it, so that
    ``MilvusClient`` uses it and ``release_server`` stops it and unlocks the file."""
    from milvus_lite.server import Server
    from milvus_lite.server_manager import server_manager_instance as manager

    server = Server(key)
    server._p, server._lock_fd, server._uds_path = process, lock_file, socket_path
    with manager._lock:
        manager._servers[key] = server


def _stop_unregistered(process: Any, lock_file: Any, socket_path: str) -> None:
    """Undo a start that failed: unlock the file, end the engine. Unlike milvus_lite's failed
    start, the lock file itself stays: another program may hold it."""
    with contextlib.suppress(OSError):
        fcntl.lockf(lock_file, fcntl.LOCK_UN)
    lock_file.close()
    if process is not None:
        with contextlib.suppress(Exception):
            process.wait(timeout=2)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=3)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)


def _lite_socket(db: str) -> str:
    server = _lite_server(str(Path(db).absolute().resolve()))
    if server is None:
        raise RuntimeError(f"no Milvus Lite engine registered for {db}")
    return str(server._uds_path)


def _engine_answers(process: Any, socket_path: str) -> bool:
    """Wait until the engine accepts a connection on its socket (True) or exits (False)."""
    deadline = time.monotonic() + LITE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if os.path.exists(socket_path):
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(socket_path)
                return True
        time.sleep(0.005)
    return False


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

    def tables(mode: str) -> set[str]:
        with contextlib.closing(sqlite3.connect(f"file:{quote(str(db))}?mode={mode}", uri=True, timeout=5)) as con:
            return {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    try:
        try:
            found = tables("ro")
        except sqlite3.OperationalError:
            # A hot journal, left by a crash in the middle of a write: a read-only connection
            # cannot roll it back ("attempt to write a readonly database"); a read-write one does
            # SQLite's standard recovery, as the engine itself would on opening the file.
            found = tables("rw")
    except sqlite3.Error:
        return False
    return "collection_meta" in found


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
