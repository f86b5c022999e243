"""Where vectors are written and searched: one Milvus collection, embedded (Lite) or on a server.

- :mod:`.records`: what a collection holds (its record, the row layouts of schema 1 and 2);
- :mod:`.milvus`: :class:`Store`, the operations ingest, search, the API and the page use;
- :mod:`.policies`: what differs between a Lite file and a server, and the error messages;
- :mod:`.lite_engine`: the Milvus Lite engine process pixfind starts for a file;
- :mod:`.lite_files`, :mod:`.lock`: checks on a Lite file's location, and pixfind's lock on it.

A collection keeps the row layout it was made with; schema 1 collections are read and written
as such rather than migrated to schema 2, because a migration rewrites every row (vectors
included), a server collection may be used by several pixfind installs at once (an older one
cannot read schema 2), and a crash-safe rewrite needs a second full copy of the collection.
"""

from __future__ import annotations

from .milvus import Store
from .records import (
    CONTENT,
    SCHEMA_VERSION,
    CollectionInfo,
    Row,
    SearchHit,
    StoredFile,
    check_same_model,
    flat_record,
    record_fields,
)

__all__ = [
    "CONTENT",
    "SCHEMA_VERSION",
    "CollectionInfo",
    "Row",
    "SearchHit",
    "Store",
    "StoredFile",
    "check_same_model",
    "flat_record",
    "record_fields",
]
