"""``pixfind export``: every stored vector and record, streamed to a Parquet file for dataset work.

Rows are read in batches (:mod:`pixfind.records`) and each batch becomes one row group of a
``pyarrow.parquet.ParquetWriter``, so memory stays that of one batch whatever the index holds.
The file is written under a temporary name beside the target and renamed only when complete: an
export that fails or is interrupted never leaves half a file, and never replaces a good one.

Columns: ``path`` (UTF-8; bytes of a name that are not UTF-8 become U+FFFD), ``path_bytes``
(the exact name, as bytes), ``vector`` (fixed-size list of float32, unit length, as stored),
``size``, ``mtime_ns``, ``width``, ``height``, ``fingerprint``, ``content`` (``blake3:<hex>``
of the whole file, null where not recorded), ``taken`` (when the photo was taken: a timestamp
without a zone, the camera's wall clock; see :mod:`pixfind.ingest.facts`), ``taken_from``
(``exif`` or ``mtime``), ``camera``, ``type``, ``orientation`` (null in rows indexed before they
were recorded). The file's metadata names the model, its weights and the vector dimension.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PixfindError
from .store import Store
from .stored_rows import READ_BATCH, StoredRecord, count_rows, iter_records

if TYPE_CHECKING:
    import pyarrow as pa

INSTALL_HINT = "pixfind export needs pyarrow: pip install 'pixfind[export]' (or pip install pyarrow)"


@dataclass(frozen=True)
class ExportReport:
    path: Path
    rows: int
    elapsed_s: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.elapsed_s if self.elapsed_s > 0 else 0.0


def check_target(target: Path, force: bool) -> None:
    """Refuse, before reading anything, an output that exists (without ``force``) or cannot be written."""
    if target.is_dir():
        raise PixfindError(f"export target {target} is a folder: give a file name, e.g. {target / 'vectors.parquet'}")
    if target.exists() and not force:
        raise PixfindError(f"{target} already exists: pass --force to replace it, or choose another name")
    folder = target.parent
    if not folder.is_dir():
        raise PixfindError(f"cannot export to {target}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PixfindError(f"cannot export to {target}: folder {folder} is not writable")


def export_parquet(
    store: Store,
    target: str | Path,
    folder: str | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ExportReport:
    """Write the rows (under ``folder``, an absolute path) to ``target``; ``progress(done, total)``
    after each batch."""
    pq = _pyarrow_parquet()
    target = Path(target).expanduser().absolute()
    check_target(target, force)
    info = store.info()
    total = count_rows(store, folder) if info is not None else 0
    if total == 0:
        where = f" under {folder}" if folder else ""
        raise PixfindError(f"nothing in the index at {store.uri}{where} to export: nothing was written")
    schema = _schema(info.dim, {"model": info.model.name, "weights": info.model.weights, "dim": info.dim})
    started = time.perf_counter()
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    written = 0
    if progress is not None:
        progress(0, total)  # the rate counts from here
    try:
        # no dictionary encoding: every value is unique, and trying it on the vectors tripled the write time
        with pq.ParquetWriter(temporary, schema, compression="zstd", use_dictionary=False) as writer:
            for batch in iter_records(store, folder, batch=READ_BATCH):
                if batch:
                    writer.write_table(_table(batch, schema))
                    written += len(batch)
                if progress is not None:
                    progress(written, total)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; a plain file would not be
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return ExportReport(target, written, time.perf_counter() - started)


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PixfindError(INSTALL_HINT) from None
    return pq


#: The record's text fields exported as columns of their own, in order, after ``taken``.
TEXT_FACTS = ("taken_from", "camera", "type", "orientation")


def _schema(dim: int, about: dict[str, Any]) -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("path", pa.string(), nullable=False),
            pa.field("path_bytes", pa.binary(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("size", pa.int64(), nullable=False),
            pa.field("mtime_ns", pa.int64(), nullable=False),
            pa.field("width", pa.int32(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("fingerprint", pa.string(), nullable=False),
            pa.field("content", pa.string()),
            pa.field("taken", pa.timestamp("s")),
            *(pa.field(name, pa.string()) for name in TEXT_FACTS),
        ],
        metadata={"pixfind": json.dumps(about)},
    )


def _table(batch: list[StoredRecord], schema: pa.Schema) -> pa.Table:
    import numpy as np
    import pyarrow as pa

    dim = schema.field("vector").type.list_size
    vectors = np.asarray([r.vector for r in batch], dtype=np.float32).reshape(-1)
    names = [os.fsencode(r.path) for r in batch]
    columns = [
        pa.array([name.decode("utf-8", "replace") for name in names], pa.string()),
        pa.array(names, pa.binary()),
        pa.FixedSizeListArray.from_arrays(pa.array(vectors, pa.float32()), dim),
        pa.array([r.size for r in batch], pa.int64()),
        pa.array([r.mtime_ns for r in batch], pa.int64()),
        pa.array([r.width for r in batch], pa.int32()),
        pa.array([r.height for r in batch], pa.int32()),
        pa.array([r.fingerprint for r in batch], pa.string()),
        pa.array([r.content for r in batch], pa.string()),
        pa.array([_fact(r, "taken", int) for r in batch], pa.timestamp("s")),
        *(pa.array([_fact(r, name, str) for r in batch], pa.string()) for name in TEXT_FACTS),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _fact(record: StoredRecord, name: str, kind: type) -> Any:
    """One of the record's filter fields, when recorded with the expected type; else null."""
    value = (record.facts or {}).get(name)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
