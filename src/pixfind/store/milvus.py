"""The pixfind collection in Milvus: what ingest, search, the API and the page call.

Everything that differs between a Milvus Lite file and a server is asked of the Store's policy
(:mod:`.policies`); this class is what is the same on both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from ..config import ModelSpec, default_search_ef, is_server_uri, search_ef_from
from ..errors import StoreError
from ..pathkeys import folder_prefix_filter, key_of, keys_filter
from ..vectors import unit_rows
from .policies import LitePolicy, ServerPolicy, ann_search_params, is_milvus_error
from .records import (
    SCHEMA_VERSION,
    VECTOR,
    CollectionInfo,
    Row,
    SearchHit,
    StoredFile,
    check_same_model,
    collection_schema,
    fingerprint_field,
    flat_record,
    hit_fields,
    read_description,
    record_fields,
    search_hit,
    stored_file,
)

#: Keys per ``path in [...]`` lookup or delete.
LOOKUP_BATCH = 500
#: Lite collections from this size get an IVF index while ``pixfind serve`` runs (below it, the
#: exact search is fast anyway).
LITE_SERVING_MIN_ROWS = 50_000
#: Keys per page when streaming stored keys (Milvus caps a query page at 16,384 rows).
ITER_BATCH = 5000


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
        self._policy: LitePolicy | ServerPolicy = (
            ServerPolicy(uri, token) if is_server_uri(uri) else LitePolicy(uri, wait)
        )
        self.uri = self._policy.uri
        self.token = token
        self.collection = collection
        self.is_server = self._policy.is_server
        self.search_ef = default_search_ef() if search_ef is None else search_ef_from(search_ef)
        self._info: CollectionInfo | None = None
        self._index_described: tuple[str, str] | None = None  # (type, metric)
        self._serving_index = False  # switched to IVF_FLAT by index_for_serving()
        self._pending = False  # a deferred Lite file, made by _open_pending()
        self.client: Any = None
        self._policy.check_location(create)
        if defer and self._policy.can_defer():
            self._pending = True
            return
        self._open(preload=not create)

    def _open(self, preload: bool) -> None:
        try:
            self.client = self._policy.connect(self.collection, preload)
        except BaseException:
            self.close()
            raise

    def _open_pending(self) -> None:
        """Make the deferred Lite file now: there is something to store."""
        if self._pending:
            self._open(preload=False)  # may fail (the lock is held): then still pending
            self._pending = False
            self._info = None  # another run may have made it meanwhile: read its record

    def close(self) -> None:
        if self.client is not None:
            if self._policy.unsynced:
                # other processes (a search right after `pixfind index`) must see every row
                with contextlib.suppress(Exception):
                    self.sync()
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None
        self._policy.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- collection ---------------------------------------------------------------------------

    def exists(self) -> bool:
        if self._pending:
            return False
        return bool(self._call(self.client.has_collection, self.collection))

    def info(self) -> CollectionInfo | None:
        """What the collection records, or None when it does not exist yet."""
        if self._info is None:
            early = self._policy.early
            description = early.description() if early is not None else None
            if description is None:
                if not self.exists():
                    return None
                description = self._call(self.client.describe_collection, self.collection)
            self._info = read_description(description, self.collection, self.uri)
        return self._info

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
        index = self.client.prepare_index_params()
        index.add_index(VECTOR, **self._policy.index_config())
        self._call(
            self.client.create_collection,
            self.collection,
            schema=collection_schema(info),
            index_params=index,
            consistency_level=self._policy.create_consistency,
        )

    def _reads(self) -> dict[str, Any]:
        """Keyword arguments for a read: it must see this process's writes."""
        self._policy.ready(self)
        return self._policy.read_options()

    def count(self, where: str = "") -> int:
        """Rows in the collection (matching the filter expression ``where``, when given)."""
        if not self.exists():
            return 0
        result = self._call(
            self.client.query, self.collection, filter=where, output_fields=["count(*)"], **self._reads()
        )
        return int(result[0]["count(*)"]) if result else 0

    def sync(self) -> None:
        """Wait until every write made so far is visible to searches from any process."""
        self._policy.sync(self)

    def flush(self) -> None:
        """After a bulk write: make every row durable, indexed and visible to every process.
        Call it once at the end, not per batch."""
        self._policy.flush(self)

    def drop(self) -> None:
        if self.exists():
            self._call(self.client.drop_collection, self.collection)
        self._policy.forget()
        self._info = None
        self._index_described = None

    # -- rows -----------------------------------------------------------------------------------

    def _schema(self) -> int:
        """The layout of the collection (new ones: :data:`SCHEMA_VERSION`)."""
        info = self.info()
        return info.schema if info is not None else SCHEMA_VERSION

    def _query_keys(self, keys: Sequence[str], fields: list[str], field: str = "path") -> Iterator[dict[str, Any]]:
        """The rows whose ``field`` is one of ``keys``, asked :data:`LOOKUP_BATCH` keys at a time."""
        for start in range(0, len(keys), LOOKUP_BATCH):
            chunk = list(keys[start : start + LOOKUP_BATCH])
            yield from self._call(
                self.client.query,
                self.collection,
                filter=keys_filter(chunk, field=field),
                output_fields=fields,
                **self._reads(),
            )

    def lookup(self, keys: Sequence[str]) -> dict[str, StoredFile]:
        """Stored size/mtime/fingerprint for those of ``keys`` that are in the index."""
        if self._pending:
            return {}
        rows = self._query_keys(keys, ["path", *record_fields(self._schema())])
        return {row["path"]: stored_file(row) for row in rows}

    def records_of(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The whole stored row (vector and record, the record's entries at the top level) of
        those of ``keys`` that are in the index: what a row rewritten in place starts from."""
        if self._pending:
            return {}
        fields = ["path", *record_fields(self._schema()), VECTOR]
        return {row["path"]: row for row in map(flat_record, self._query_keys(keys, fields))}

    def find_by_fingerprint(self, fingerprints: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """Rows (with vectors, the record's entries at the top level) whose fingerprint is one of
        ``fingerprints``: rename candidates."""
        out: dict[str, list[dict[str, Any]]] = {}
        if self._pending:
            return out
        schema = self._schema()
        fields = ["path", *record_fields(schema), VECTOR]
        for row in map(flat_record, self._query_keys(fingerprints, fields, field=fingerprint_field(schema))):
            out.setdefault(row["fingerprint"], []).append(row)
        return out

    def write(self, rows: Sequence[Row]) -> None:
        """Upsert rows: a path already stored is replaced, never duplicated.

        Rows are visible to this Store's reads at once; to other processes after :meth:`sync`,
        :meth:`flush` or :meth:`close` (each waits once, not per batch).
        """
        schema = self._schema()
        for batch in self._policy.write_batches(rows):
            self._call(self.client.upsert, self.collection, [row.to_entity(schema) for row in batch])
            self._policy.wrote()

    def delete(self, keys: Sequence[str]) -> int:
        """Remove these keys; returns how many were stored (Milvus's own count includes absent
        keys on a server and differs on Lite, so it is not used)."""
        deleted = 0
        keys = list(dict.fromkeys(keys))
        for start in range(0, len(keys), LOOKUP_BATCH):
            present = list(self.lookup(keys[start : start + LOOKUP_BATCH]))
            if present:
                self._call(self.client.delete, self.collection, filter=keys_filter(present))
                self._policy.wrote()
                deleted += len(present)
        if deleted:  # later reads must see the deletions (the chunks above are disjoint, so need not)
            self._policy.wrote(deleted=True)
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
                self._policy.wrote(deleted=True)
                deleted += count
        return deleted

    def iter_keys(self, folder: str | None = None, batch: int = ITER_BATCH) -> Iterator[list[str]]:
        """Stream the stored keys (under ``folder``), ``batch`` at a time, without holding all.

        A query iterator pages through the keys in order, so a million stored rows never sit in
        client memory at once.
        """
        if self._pending:
            return
        expr = folder_prefix_filter(folder) if folder else 'path != ""'
        if self._policy.unsynced:
            self.sync()  # the iterator reads at its own timestamp, not this process's session
        self._policy.ready(self)
        iterator = self._call(
            self.client.query_iterator, self.collection, batch_size=batch, filter=expr, output_fields=["path"]
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

    def search(
        self, vectors: Sequence[Sequence[float]], limit: int, folder: str | None = None, where: str = ""
    ) -> list[list[SearchHit]]:
        """The ``limit`` nearest rows to each vector, inside ``folder`` and matching the filter
        expression ``where`` (both applied by Milvus during the search, not after it)."""
        if self._pending:
            return [[] for _ in vectors]
        reads = self._reads()
        expressions = [f"({expr})" for expr in (folder_prefix_filter(folder) if folder else "", where) if expr]
        results = self._call(
            self.client.search,
            self.collection,
            data=unit_rows(vectors).tolist(),
            limit=limit,
            filter=" and ".join(expressions),
            output_fields=hit_fields(self._schema()),
            search_params=self._search_params(limit),
            **reads,
        )
        return [[search_hit(item) for item in result] for result in results]

    def vectors_of(self, keys: Sequence[str]) -> dict[str, list[float]]:
        if self._pending:
            return {}
        rows = self._call(
            self.client.query,
            self.collection,
            filter=keys_filter(list(keys)),
            output_fields=["path", VECTOR],
            **self._reads(),
        )
        return {row["path"]: row[VECTOR] for row in rows}

    # -- the vector index -----------------------------------------------------------------------

    def _search_params(self, limit: int) -> dict[str, Any]:
        params: dict[str, Any] = {}  # no metric_type: the index's (IP, or COSINE on older files)
        if self._policy.serving_index and not self._serving_index:
            return params  # Lite's exact FLAT index takes no parameters
        effort = ann_search_params(self.index_type(), self.search_ef, limit)
        if effort:
            params["params"] = effort
        return params

    def index_for_serving(self) -> bool:
        """Milvus Lite: switch to an IVF_FLAT index while one long-lived process answers queries.

        Lite keeps an exact FLAT index on file because it rebuilds an IVF index on every open,
        which a cold search would wait for; inside ``pixfind serve`` IVF answers far faster at a
        small loss of recall (README, docs/speed.md). Small collections stay exact. Returns True
        when switched; call :meth:`restore_index` before closing. A crash leaves IVF on file
        (still correct, but slower to open): the next serve adopts it, the next index run
        restores FLAT.
        """
        if not self._policy.serving_index:
            return False
        rows = self.count()
        if rows < LITE_SERVING_MIN_ROWS:
            return False
        if self.index_type() == "IVF_FLAT":  # left by a server that was killed: use it
            self._serving_index = True
            return True
        if self.index_type() != "FLAT":
            return False
        self._replace_index(self._policy.serving_index_config(rows))
        self._serving_index = True
        return True

    def restore_index(self) -> None:
        """Back to the index a Lite file keeps (after :meth:`index_for_serving`), with the current
        metric (files made by earlier versions have COSINE). A server's index is left as it is."""
        config = self._policy.index_config()
        wanted = (config["index_type"], config["metric_type"])
        if self._policy.serving_index and self.exists() and (self.index_type(), self.index_metric()) != wanted:
            self._replace_index(config)
        self._serving_index = False

    def _replace_index(self, config: dict[str, Any]) -> None:
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

    # -- calls ----------------------------------------------------------------------------------

    def _call(self, func: Any, *args: Any, _retry: bool = True, **kwargs: Any) -> Any:
        """Call pymilvus with the policy's time and retry limits; its failures become one line."""
        on_client = getattr(func, "__self__", None) is self.client
        for name, value in self._policy.call_options(getattr(func, "__name__", ""), on_client, _retry).items():
            kwargs.setdefault(name, value)
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            if is_milvus_error(exc):
                raise self._policy.operation_error(exc, self.collection) from exc
            raise
