"""What a photo is, as searches filter on it: when it was taken, by which camera, its shape and
file type. Recorded in each row's record at index time (see :mod:`pixfind.store.records`).

* **taken**: the EXIF DateTimeOriginal (tag 0x9003 in the Exif IFD) when the file has a valid
  one, else the file's mtime. Cameras write the wall-clock time of their own clock without a
  time zone, so both are stored as *wall-clock seconds*: the local date and time written as if
  they were UTC (``calendar.timegm``). The mtime is converted to this machine's local time first.
  A day given to ``--after``/``--before`` is then a calendar day as the photographer (or this
  machine, for files without EXIF) saw it, whatever time zone the search runs in.
* **camera**: EXIF Make and Model, made printable and cut to a length (text from files is
  untrusted), plus ``camera_terms``: every prefix of every word of it, case-folded. A Milvus
  2.3 server matches ``like`` patterns by prefix only, and Milvus Lite has no working escape for
  ``like``; ``json_contains`` over these terms gives the same word-prefix match on both, and a
  term holds only letters and digits, so a filter built from one needs no escaping.
* **type**: the decoder's format name (``jpeg``, ``png``, ...); **orientation**: landscape,
  portrait or square, from the size as displayed (Milvus cannot compare two JSON keys).

New files get these from the image already opened and decoded (no second read); rows written
before they existed get them from the file's header alone (:func:`read_facts`: no pixel decoded;
a PNG whose eXIf chunk follows its pixels, rare, then counts as without EXIF).
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from PIL import Image

from ..filters import words_of

#: EXIF tags read here.
EXIF_IFD = 0x8769
DATE_TIME_ORIGINAL = 0x9003
MAKE = 0x010F
MODEL = 0x0110
#: Longest Make or Model kept, in characters (real ones are under 40).
MAX_CAMERA_PART = 64
#: Words of a camera name that get search terms, and the longest term.
MAX_CAMERA_WORDS = 12
MAX_TERM_CHARS = 24
#: Years accepted in a DateTimeOriginal; others (a camera whose clock was never set writes
#: 0000:00:00) fall back to the mtime.
YEARS = range(1826, 2200)
#: Pillow's format names mapped to the type pixfind records (MPO: multi-picture JPEGs).
TYPE_NAMES = {"jpeg": "jpeg", "mpo": "jpeg", "png": "png", "webp": "webp", "gif": "gif", "bmp": "bmp", "tiff": "tiff"}

_SPACES = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Header:
    """What the header of an opened image says (EXIF and format), before any pixel is decoded."""

    format: str | None
    taken: datetime | None
    make: str
    model: str


def header_of(img: Image.Image, loaded: bool = False) -> Header:
    """The EXIF date, make, model and the format of an opened image (``loaded``: its pixels
    are decoded already); a damaged EXIF block counts as none (the image itself may be fine)."""
    taken, make, model = None, "", ""
    if img.format == "PNG" and "exif" not in img.info and not loaded:
        # Pillow looks for an eXIf chunk after the pixels by decoding them all (0.4 s for 12 MP):
        # from a header alone, a PNG whose EXIF comes first is read, others count as without
        return Header(img.format, None, "", "")
    try:
        exif = img.getexif()
        make = _clean(exif.get(MAKE))
        model = _clean(exif.get(MODEL))
        taken = parse_exif_date(exif.get_ifd(EXIF_IFD).get(DATE_TIME_ORIGINAL))
    except Exception:
        pass
    return Header(img.format, taken, make, model)


def parse_exif_date(value: object) -> datetime | None:
    """``YYYY:MM:DD HH:MM:SS`` (EXIF; dashes accepted too) as a naive datetime, or None."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    text = value.strip("\x00 \t\r\n")[:19].replace("-", ":")
    try:
        parsed = datetime.strptime(text, "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    return parsed if parsed.year in YEARS else None


def _clean(value: object) -> str:
    """Untrusted EXIF text made printable, spaces collapsed, cut to :data:`MAX_CAMERA_PART`."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return ""
    value = value.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate cannot be stored
    printable = "".join(char if char.isprintable() else " " for char in value)
    return _SPACES.sub(" ", printable).strip()[:MAX_CAMERA_PART].strip()


def camera_name(make: str, model: str) -> str:
    """ "Make Model", without the make twice when the model already starts with it (Canon /
    Canon EOS 5D → Canon EOS 5D; NIKON CORPORATION / NIKON D750 → NIKON D750)."""
    if not make:
        return model
    if not model:
        return make
    first = make.split()[0].casefold()
    return model if model.casefold().startswith(first) else f"{make} {model}"


def camera_terms(name: str) -> list[str]:
    """Every prefix of every word of ``name`` (the first :data:`MAX_CAMERA_WORDS` words, each
    cut to :data:`MAX_TERM_CHARS`), sorted, once each."""
    terms: set[str] = set()
    for word in words_of(name)[:MAX_CAMERA_WORDS]:
        word = word[:MAX_TERM_CHARS]
        terms.update(word[:end] for end in range(1, len(word) + 1))
    return sorted(terms)


def wall_seconds(moment: datetime) -> int:
    """A naive local date and time as seconds, written as if it were UTC (see the module's docstring)."""
    return calendar.timegm(moment.timetuple())


def mtime_wall_seconds(mtime_ns: int) -> int:
    """A file's mtime as this machine's local wall-clock seconds."""
    return wall_seconds(datetime.fromtimestamp(mtime_ns / 1e9))


def orientation_of(width: int, height: int) -> str:
    if width > height:
        return "landscape"
    return "portrait" if height > width else "square"


def facts_of(header: Header, width: int, height: int, mtime_ns: int) -> dict[str, Any]:
    """The record entries for a file: see the module's docstring for each one."""
    if header.taken is not None:
        taken, source = wall_seconds(header.taken), "exif"
    else:
        taken, source = mtime_wall_seconds(mtime_ns), "mtime"
    camera = camera_name(header.make, header.model)
    facts: dict[str, Any] = {
        "taken": taken,
        "taken_from": source,
        "type": TYPE_NAMES.get((header.format or "").lower(), (header.format or "unknown").lower()[:16]),
        "orientation": orientation_of(width, height),
    }
    if camera:
        facts["camera"] = camera
        facts["camera_terms"] = camera_terms(camera)
    return facts


def read_facts(path: str, width: int, height: int, mtime_ns: int) -> dict[str, Any]:
    """The facts of a stored file from its header only (no pixel decoded): for rows written
    before they were recorded. ``width``/``height`` are the row's (as displayed). Raises OSError
    when the file cannot be read, and Pillow's errors when it is no longer an image."""
    from .content import open_regular

    with open_regular(path) as fh, Image.open(fh) as img:
        return facts_of(header_of(img), width, height, mtime_ns)
