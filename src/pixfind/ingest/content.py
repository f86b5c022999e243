"""A file's bytes, read once for embedding, and the digests that identify its content.

The fingerprint is cheap and finds candidates for a renamed, moved or copied file; the content
hash of the whole file confirms one, so that a stored vector is reused only for equal bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from typing import BinaryIO

from .scan import file_kind

FINGERPRINT_BLOCK = 64 * 1024
#: Files up to this size are read into memory once, hashed and decoded from those bytes; larger
#: ones (rare: a 180 MP 16-bit TIFF is ~1 GB) are hashed in a streaming pass and decoded from the
#: file, so that a huge file never sits in memory whole.
READ_WHOLE_MAX = 256 << 20
_HASH_CHUNK = 1 << 20
#: The content hash's name, stored with the digest: a row hashed otherwise is never matched.
CONTENT_HASH = "blake3"


class NotRegularFileError(OSError):
    """The path became a pipe, socket, device or folder after the scan."""


def open_regular(path: str) -> BinaryIO:
    """Open a file to read, refusing anything but a regular file without blocking: a file swapped
    for a named pipe after the scan would otherwise hang the run in ``open``."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(f"not a regular file ({file_kind(mode)})")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def fingerprint(path: str, size: int) -> str:
    """Cheap content identity: size plus BLAKE2 of the first and last 64 KiB.

    Only a *candidate* filter for renamed, moved or copied files (two images can share it: same
    size, same first and last 64 KiB, another middle); :func:`content_hash` confirms.
    """
    with open_regular(path) as fh:
        head = fh.read(FINGERPRINT_BLOCK)
        tail = b""
        if size > 2 * FINGERPRINT_BLOCK:
            fh.seek(-FINGERPRINT_BLOCK, os.SEEK_END)
            tail = fh.read(FINGERPRINT_BLOCK)
        elif size > FINGERPRINT_BLOCK:
            tail = fh.read()
    return _fingerprint(size, head, tail)


def fingerprint_of(data: bytes) -> str:
    """:func:`fingerprint` of a file whose bytes are in memory."""
    size = len(data)
    if size > 2 * FINGERPRINT_BLOCK:
        tail = data[-FINGERPRINT_BLOCK:]
    elif size > FINGERPRINT_BLOCK:
        tail = data[FINGERPRINT_BLOCK:]
    else:
        tail = b""
    return _fingerprint(size, data[:FINGERPRINT_BLOCK], tail)


def _fingerprint(size: int, head: bytes, tail: bytes) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(size.to_bytes(8, "little"))
    digest.update(head)
    digest.update(tail)
    return digest.hexdigest()


def content_hash(data: bytes | None = None, path: str | None = None) -> str:
    """BLAKE3 of a file's whole content (``data`` in memory, or ``path`` read in chunks), named:
    ``blake3:<hex>``. Equal hashes mean equal bytes, so a stored vector may be reused."""
    import blake3

    digest = blake3.blake3()
    if data is not None:
        digest.update(data)
    elif path is not None:
        with open_regular(path) as fh:
            while chunk := fh.read(_HASH_CHUNK):
                digest.update(chunk)
    return f"{CONTENT_HASH}:{digest.hexdigest()}"


@dataclass(slots=True)
class FileBytes:
    """A file as read once for embedding: its bytes (None when too large to hold: decode from the
    path), and its size and mtime as they were when it was opened (``fstat``)."""

    path: str
    data: bytes | None
    size: int
    mtime_ns: int

    def digests(self) -> tuple[str, str]:
        """(fingerprint, content hash) of exactly the bytes that are decoded."""
        if self.data is not None:
            return fingerprint_of(self.data), content_hash(self.data)
        return fingerprint(self.path, self.size), content_hash(path=self.path)


def read_file(path: str) -> FileBytes:
    """Open ``path`` once and read it whole (up to :data:`READ_WHOLE_MAX`). Raises OSError."""
    with open_regular(path) as fh:
        info = os.fstat(fh.fileno())
        data = fh.read() if info.st_size <= READ_WHOLE_MAX else None
    size = len(data) if data is not None else info.st_size
    return FileBytes(path, data, size, info.st_mtime_ns)
