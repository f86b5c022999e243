"""Find image files under folders, streaming, with a documented rule for links and oddities.

Rules:
* files whose extension is one of :data:`pixfind.ingest.decode.IMAGE_EXTENSIONS` (any case) are taken;
* hidden files and folders (name starting with ``.``) below a root are skipped (caches, macOS
  ``._`` sidecars); a root you name explicitly is always scanned;
* symbolic links are followed, to files and to folders, also outside the root; each real folder is
  entered once (by device and inode), so link loops end and nothing is found twice through two
  routes. A file is stored under the path through which it was found;
* folders that cannot be listed or entered, broken links and pipes, sockets or devices with an
  image extension are reported as problems (each with its reason), and the scan goes on; a folder
  whose name has an image extension (``x.jpg/``) is a folder like any other;
* a root that is a file must be an image file: a named ``notes.txt`` is a problem, not silence;
* the scan streams: memory holds one folder's listing and the stack of folders still to visit,
  never the whole tree.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from .decode import IMAGE_EXTENSIONS, has_image_extension


@dataclass(slots=True)
class FileEntry:
    path: str
    size: int
    mtime_ns: int


@dataclass(slots=True)
class ScanProblem:
    path: str
    reason: str
    folder: bool = False  # a folder that could not be read: its stored rows must be kept


def _folder_problem(path: str, what: str, exc: OSError) -> ScanProblem:
    return ScanProblem(path, f"cannot {what} folder: {exc.strerror or type(exc).__name__}", folder=True)


def scan(root: str) -> Iterator[FileEntry | ScanProblem]:
    """Yield image files under ``root`` (a folder or a single file), depth first, sorted by name."""
    try:
        info = os.stat(root)
    except OSError as exc:
        yield _folder_problem(root, "read", exc)
        return
    if not stat.S_ISDIR(info.st_mode):
        yield _root_file(root, info)
        return
    seen: set[tuple[int, int]] = {(info.st_dev, info.st_ino)}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            yield _folder_problem(folder, "list", exc)
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            found = _classify(entry, seen)
            if isinstance(found, str):
                subfolders.append(found)
            elif isinstance(found, PermissionError):
                # listed but not searchable (mode r--): no entry of it can be looked at
                yield _folder_problem(folder, "enter", found)
                break
            elif found is not None:
                yield found
        stack.extend(reversed(subfolders))  # popped in name order


def _root_file(root: str, info: os.stat_result) -> FileEntry | ScanProblem:
    """A file named as a root: an image file, or a problem saying why it is not one."""
    name = os.path.basename(root)
    if not stat.S_ISREG(info.st_mode):
        return ScanProblem(root, f"not a regular file ({file_kind(info.st_mode)})")
    if not has_image_extension(name):
        suffix = os.path.splitext(name)[1]
        what = f"extension {suffix!r}" if suffix else "no extension"
        return ScanProblem(root, f"not an image file ({what}; pixfind takes {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return FileEntry(root, info.st_size, info.st_mtime_ns)


def _classify(
    entry: os.DirEntry[str], seen: set[tuple[int, int]]
) -> FileEntry | ScanProblem | str | PermissionError | None:
    """A file entry, a problem, a folder path to descend into, None to ignore, or the
    PermissionError of an entry that is no link: its folder cannot be entered."""
    try:
        info = entry.stat(follow_symlinks=True)
    except OSError as exc:
        if entry.is_symlink():
            return ScanProblem(entry.path, "broken symbolic link") if has_image_extension(entry.name) else None
        if isinstance(exc, PermissionError):
            return exc
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
    return ScanProblem(entry.path, f"not a regular file ({file_kind(info.st_mode)})")


def file_kind(mode: int) -> str:
    """A few words for a file that is not a regular file."""
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "named pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


class Presence(enum.Enum):
    """What a check of a stored file's path found."""

    PRESENT = "present"  # an image file a scan would take
    GONE = "gone"  # known to be gone: its row may be removed
    UNREADABLE = "unreadable"  # a folder on its path cannot be read: cannot tell, keep the row
    EMPTY_FOLDER = "empty folder"  # its folder is empty (a drive not mounted?): keep the row


@dataclass(frozen=True, slots=True)
class Verdict:
    presence: Presence
    folder: str = ""  # UNREADABLE: the folder that cannot be read; EMPTY_FOLDER: the empty folder
    reason: str = ""


#: A symbolic link whose target is missing is no proof either: it may lead to a drive that is
#: not mounted.
_DANGLING = "symbolic link to something missing (a drive not mounted?)"
_PRESENT = Verdict(Presence.PRESENT)
_GONE = Verdict(Presence.GONE)


class PresenceCheck:
    """Decides whether a stored file is *known* to be gone, the only case where its row may go.

    A failed ``stat`` is not proof: only "no such file" (ENOENT, ENOTDIR) below a folder that
    can be read and is not empty is. A path that exists but is no longer an image file (another
    kind of file, a folder) is gone too, as a scan would not take it. Anything else (permission
    denied on a folder of the path, an I/O error) is UNREADABLE and names the folder to blame;
    an empty folder is EMPTY_FOLDER, because an unmounted drive's mount point looks like that,
    and a symbolic link on the path whose target is missing is UNREADABLE for the same reason.

    ``top``: the folder checks never climb above (the indexed root), so that the folder named in
    a verdict is inside it. Verdicts on folders are cached: a missing or unreadable folder of
    10,000 files costs a few ``stat`` calls, not 10,000 walks.
    """

    def __init__(self, top: str | None = None) -> None:
        self._top = top.rstrip("/") or "/" if top else None
        self._folders: dict[str, Verdict] = {}

    def __call__(self, path: str) -> Verdict:
        try:
            info = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            if os.path.islink(path):
                return Verdict(Presence.UNREADABLE, path, _DANGLING)
            return self._missing_below(os.path.dirname(path))
        except ValueError:  # a NUL in a stored name: no file can have it
            return _GONE
        except OSError as exc:
            return self._blocked_at(os.path.dirname(path), exc)
        indexable = stat.S_ISREG(info.st_mode) and has_image_extension(os.path.basename(path))
        return _PRESENT if indexable else _GONE

    def _missing_below(self, folder: str) -> Verdict:
        """The verdict on a file missing from ``folder`` (which may be missing too)."""
        cached = self._folders.get(folder)
        if cached is not None:
            return cached
        try:
            info = os.stat(folder)
        except (FileNotFoundError, NotADirectoryError):
            parent = os.path.dirname(folder)
            if os.path.islink(folder):
                verdict = Verdict(Presence.UNREADABLE, folder, _DANGLING)
            else:
                verdict = self._missing_below(parent) if self._may_climb(folder, parent) else _GONE
        except OSError as exc:
            verdict = self._blocked_at(os.path.dirname(folder), exc)
        else:
            verdict = self._listed(folder) if stat.S_ISDIR(info.st_mode) else _GONE
        self._folders[folder] = verdict
        return verdict

    @staticmethod
    def _listed(folder: str) -> Verdict:
        """A missing file's nearest existing folder: gone if that folder can be read and holds
        something; else the file may still be there (unreadable, or an unmounted drive)."""
        try:
            with os.scandir(folder) as listing:
                empty = next(listing, None) is None
        except OSError as exc:
            return Verdict(Presence.UNREADABLE, folder, f"cannot list folder: {exc.strerror}")
        return Verdict(Presence.EMPTY_FOLDER, folder, "folder is empty") if empty else _GONE

    def _blocked_at(self, folder: str, exc: OSError) -> Verdict:
        """``folder``'s entry could not be looked at: blame the deepest folder that can."""
        cached = self._folders.get(folder)
        if cached is not None:
            return cached
        parent = os.path.dirname(folder)
        try:
            os.stat(folder)
        except OSError as above:
            if self._may_climb(folder, parent):
                verdict = self._blocked_at(parent, above)
            else:
                verdict = Verdict(Presence.UNREADABLE, folder, f"cannot read folder: {above.strerror}")
        else:
            what = "cannot enter folder" if isinstance(exc, PermissionError) else "cannot check its files"
            verdict = Verdict(Presence.UNREADABLE, folder, f"{what}: {exc.strerror}")
        self._folders[folder] = verdict
        return verdict

    def _may_climb(self, folder: str, parent: str) -> bool:
        if parent == folder:
            return False  # at "/"
        return self._top is None or (folder != self._top and folder.startswith(self._top.rstrip("/") + "/"))
