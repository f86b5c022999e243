"""File path <-> Milvus primary key.

The primary key of a row is the file's absolute path, so re-indexing is an upsert and a file can
never be stored twice. A few bytes cannot travel verbatim, though:

* Milvus Lite 2.5 builds SQL from keys without escaping: an upsert or delete of a key holding ``'``
  fails, and ``like`` has no working escape, so ``%`` and ``_`` in a folder name would widen an
  ``--under`` filter to other folders;
* ``"`` and ``\\`` end or escape string literals in filter expressions;
* VARCHAR must be valid UTF-8, while POSIX file names are arbitrary bytes.

Those bytes (plus control characters and the escape character ``^`` itself) are written as ``^XX``
(hex). Every other character, including spaces and non-ASCII letters, stays as it is, so keys of
ordinary paths read as the paths themselves. Decoding is exact: ``path_of(key_of(p)) == p``.
"""

from __future__ import annotations

import os
import re

ESCAPE = "^"
_SPECIAL = frozenset("'\"\\%_^`")
_HEX_ESCAPE = re.compile(r"\^([0-9A-F]{2})")

#: Longest key stored (bytes of the VARCHAR field). Longer paths are skipped with a reason.
MAX_KEY_BYTES = 8192


def key_of(path: str) -> str:
    """Primary key for an absolute path (``str`` as returned by ``os`` functions)."""
    out: list[str] = []
    for char in path:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"{ESCAPE}{code - 0xDC00:02X}")
        elif char in _SPECIAL or code < 0x20 or code == 0x7F:
            out.extend(f"{ESCAPE}{byte:02X}" for byte in char.encode("utf-8"))
        else:
            out.append(char)
    return "".join(out)


def path_of(key: str) -> str:
    """Inverse of :func:`key_of`."""
    raw = bytearray()
    pos = 0
    for match in _HEX_ESCAPE.finditer(key):
        raw += key[pos : match.start()].encode("utf-8")
        raw.append(int(match.group(1), 16))
        pos = match.end()
    raw += key[pos:].encode("utf-8")
    return os.fsdecode(bytes(raw))


def key_fits(key: str) -> bool:
    return len(key.encode("utf-8")) <= MAX_KEY_BYTES


def folder_prefix_filter(folder: str, field: str = "path") -> str:
    """Filter expression matching every key inside ``folder`` (an absolute path), and nothing else.

    The escaped key of a folder contains no quote, backslash, ``%`` or ``_``, so it can be placed
    in a ``like`` pattern verbatim: ``%`` at its end is the only wildcard.
    """
    prefix = key_of(folder.rstrip("/") + "/")
    return f'{field} like "{prefix}%"'


def keys_filter(keys: list[str], field: str = "path") -> str:
    """Filter expression matching exactly these keys (already escaped, so safe to quote)."""
    return f"{field} in [" + ", ".join(f'"{key}"' for key in keys) + "]"
