"""What a pixfind collection holds: its record of itself, and the two row layouts.

Schema 2, explicit, no dynamic fields:

    path         VARCHAR  primary key: the file's absolute path (see pathkeys for the few escapes)
    vector       FLOAT_VECTOR(dim), unit length (inner product = cosine)
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
        taken        when the photo was taken: EXIF DateTimeOriginal, else the mtime, as
                     wall-clock seconds (see ingest.facts); taken_from: "exif" or "mtime"
        camera       EXIF Make and Model, printable; camera_terms: its word prefixes, for
                     --camera (absent when the file names no camera)
        type         jpeg, png, webp, gif, bmp, tiff
        orientation  landscape, portrait or square
        (the last four are the searches' filters, see pixfind.filters; rows written before
        they existed lack them until the next index run adds them without re-embedding)

Schema 1 (collections made before) keeps the five as typed fields of their own. One JSON field
is faster for Milvus Lite to load (docs/speed.md), so new collections get it; a collection keeps
the layout it was made with, because it is never rewritten in place (see the store package's
docstring). Schema 1 has no place for the content hash, so its rows never lend their vector to
another path.

The collection's description holds JSON recording the app, schema version, model, weights and
dimension, so a collection is never filled or searched with vectors from another model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import ModelSpec
from ..errors import ModelMismatchError, StoreError
from ..pathkeys import MAX_KEY_BYTES, path_of
from ..vectors import unit_rows

SCHEMA_VERSION = 2
APP = "pixfind"
VECTOR = "vector"
META = "meta"
#: The file's record: one JSON field ``meta`` from schema 2, fields of their own in schema 1.
FILE_FIELDS = ("size", "mtime_ns", "width", "height", "fingerprint")
#: The record's content hash (schema 2's JSON field only).
CONTENT = "content"
#: The record's entries that searches filter on (schema 2 only); ``taken`` marks a row that has them.
FACT_FIELDS = ("taken", "taken_from", "camera", "camera_terms", "type", "orientation")
TAKEN = "taken"
#: What a search returns besides the path, per layout.
HIT_FIELDS_V1 = ["width", "height", "size"]


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
    has_facts: bool = True  # False: a schema-2 row written before the filters' fields existed


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
    facts: dict[str, Any] | None = None  # date taken, camera, type, orientation (ingest.facts); schema 2 only

    def to_entity(self, schema: int = SCHEMA_VERSION) -> dict[str, Any]:
        record: dict[str, Any] = {name: getattr(self, name) for name in FILE_FIELDS}
        if schema >= 2:
            if self.content:
                record[CONTENT] = self.content
            if self.facts:
                record.update((name, self.facts[name]) for name in FACT_FIELDS if name in self.facts)
            return {"path": self.key, VECTOR: unit_rows(self.vector)[0].tolist(), META: record}
        return {"path": self.key, VECTOR: unit_rows(self.vector)[0].tolist(), **record}


@dataclass
class SearchHit:
    path: str
    score: float
    width: int
    height: int
    size: int
    facts: dict[str, Any] | None = None  # the record's FACT_FIELDS it has (schema 2)


def record_fields(schema: int) -> list[str]:
    """The output fields that hold a file's record in a collection of ``schema``."""
    return [META] if schema >= 2 else list(FILE_FIELDS)


def hit_fields(schema: int) -> list[str]:
    """The output fields a search asks for in a collection of ``schema``."""
    return ["path", *(HIT_FIELDS_V1 if schema < 2 else [META])]


def fingerprint_field(schema: int) -> str:
    """The filter expression naming the fingerprint in a collection of ``schema``."""
    return f'{META}["fingerprint"]' if schema >= 2 else "fingerprint"


def flat_record(row: dict[str, Any]) -> dict[str, Any]:
    """A row read from either layout, with the record's entries at its top level."""
    record = row.get(META)
    return {**row, **record} if isinstance(record, dict) else row


def stored_file(row: dict[str, Any]) -> StoredFile:
    """The change-detection part of a row read from either layout."""
    flat = flat_record(row)
    has_facts = TAKEN in flat or META not in row  # schema 1 has no place for them: nothing to add
    return StoredFile(flat["size"], flat["mtime_ns"], flat["fingerprint"], has_facts)


def search_hit(item: dict[str, Any]) -> SearchHit:
    """One search result from either layout."""
    entity = flat_record(item.get("entity", item))
    return SearchHit(
        path=path_of(entity.get("path", item.get("id"))),
        score=float(item["distance"]),
        width=int(entity.get("width", 0)),
        height=int(entity.get("height", 0)),
        size=int(entity.get("size", 0)),
        facts={name: entity[name] for name in FACT_FIELDS if name in entity and name != "camera_terms"} or None,
    )


def collection_schema(info: CollectionInfo) -> Any:
    """The pymilvus schema of a new collection recording ``info`` (its layout: ``info.schema``)."""
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False, description=info.to_description())
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
    return schema


def read_description(description: dict[str, Any], name: str, uri: str) -> CollectionInfo:
    """The record of collection ``name`` from what ``describe_collection`` returned, checked
    against the fields it really has; a foreign, damaged or newer collection is refused."""
    info = CollectionInfo.from_description(description.get("description", ""))
    if info is None:
        raise StoreError(
            f"collection {name!r} at {uri} was not created by pixfind: "
            "choose another with --collection / PIXFIND_COLLECTION"
        )
    if info.schema > SCHEMA_VERSION:
        raise StoreError(
            f"collection {name!r} has schema v{info.schema}, newer than this "
            f"pixfind (v{SCHEMA_VERSION}): upgrade pixfind"
        )
    _check_fields(description, info.schema, name)
    _check_vector_dim(description, info, name)
    return info


def _check_fields(description: dict[str, Any], schema: int, name: str) -> None:
    names = {f["name"] for f in description.get("fields", [])}
    missing = {"path", VECTOR, *record_fields(schema)} - names
    if missing:
        raise StoreError(
            f"collection {name!r} lacks fields {sorted(missing)}: it is damaged or foreign; "
            "choose another with --collection"
        )


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


def check_same_model(info: CollectionInfo, model: ModelSpec, dim: int | None, name: str) -> None:
    if info.model != model or (dim is not None and info.dim != dim):
        raise ModelMismatchError(
            f"collection {name!r} was built with {info.model.describe()}, not {model.describe()}: "
            "drop the model flags to use the recorded one, or use another --collection"
        )
