"""Find image files under folders, streaming, with a documented rule for links and oddities.

Rules:
* files whose extension is one of :data:`pixfind.images.IMAGE_EXTENSIONS` (any case) are taken;
* hidden files and folders (name starting with ``.``) below a root are skipped (caches, macOS
  ``._`` sidecars); a root you name explicitly is always scanned;
* symbolic links are followed, to files and to folders, also outside the root; each real folder is
  entered once (by device and inode), so link loops end and nothing is found twice through two
  routes. A file is stored under the path through which it was found;
* folders that cannot be listed, broken links and pipes, sockets or devices with an image
  extension are reported as problems (each with its reason), and the scan goes on; a folder
  whose name has an image extension (``x.jpg/``) is a folder like any other;
* the scan streams: memory holds one folder's listing and the stack of folders still to visit,
  never the whole tree.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from .images import has_image_extension


@dataclass(slots=True)
class FileEntry:
    path: str
    size: int
    mtime_ns: int


@dataclass(slots=True)
class ScanProblem:
    path: str
    reason: str


def scan(root: str) -> Iterator[FileEntry | ScanProblem]:
    """Yield image files under ``root`` (a folder or a single file), depth first, sorted by name."""
    try:
        info = os.stat(root)
    except OSError as exc:
        yield ScanProblem(root, exc.strerror or "cannot stat")
        return
    if stat.S_ISREG(info.st_mode):
        if has_image_extension(os.path.basename(root)):
            yield FileEntry(root, info.st_size, info.st_mtime_ns)
        return
    seen: set[tuple[int, int]] = {(info.st_dev, info.st_ino)}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            yield ScanProblem(folder, f"cannot list folder: {exc.strerror}")
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            found = _classify(entry, seen)
            if isinstance(found, str):
                subfolders.append(found)
            elif found is not None:
                yield found
        stack.extend(reversed(subfolders))  # popped in name order


def _classify(entry: os.DirEntry[str], seen: set[tuple[int, int]]) -> FileEntry | ScanProblem | str | None:
    """A file entry, a problem, a folder path to descend into, or None to ignore."""
    try:
        info = entry.stat(follow_symlinks=True)
    except OSError as exc:
        if entry.is_symlink():
            return ScanProblem(entry.path, "broken symbolic link") if has_image_extension(entry.name) else None
        return ScanProblem(entry.path, exc.strerror or "cannot stat")
    if stat.S_ISDIR(info.st_mode):
        key = (info.st_dev, info.st_ino)
        if key in seen:
            return None
        seen.add(key)
        return entry.path
    if not has_image_extension(entry.name):
        return None
    if stat.S_ISREG(info.st_mode):
        return FileEntry(entry.path, info.st_size, info.st_mtime_ns)
    return ScanProblem(entry.path, f"not a regular file ({_kind(info.st_mode)})")


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "named pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def is_indexable(path: str) -> bool:
    """Would a scan still find ``path``? (A regular file with an image extension.)"""
    try:
        return stat.S_ISREG(os.stat(path).st_mode) and has_image_extension(os.path.basename(path))
    except (OSError, ValueError):
        return False


FINGERPRINT_BLOCK = 64 * 1024


def fingerprint(path: str, size: int) -> str:
    """Cheap content identity: size plus BLAKE2 of the first and last 64 KiB.

    Lets a renamed or moved file keep its stored vector instead of being embedded again.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(size.to_bytes(8, "little"))
    with open(path, "rb") as fh:
        digest.update(fh.read(FINGERPRINT_BLOCK))
        if size > 2 * FINGERPRINT_BLOCK:
            fh.seek(-FINGERPRINT_BLOCK, os.SEEK_END)
            digest.update(fh.read(FINGERPRINT_BLOCK))
        elif size > FINGERPRINT_BLOCK:
            digest.update(fh.read())
    return digest.hexdigest()
