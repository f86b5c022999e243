"""Filters on what a photo is: when it was taken, by which camera, its type, orientation and size.

They become one Milvus filter expression over the record's entries (:mod:`pixfind.store.records`,
written by :mod:`pixfind.ingest.facts`), applied by Milvus inside the search, so ``-k 10`` gives
the 10 best photos *that match*, not the matches among the 10 best. Every operator used here
works alike on Milvus Lite 2.5 and a 2.3 server: comparisons and ``in`` on JSON keys, and
``json_contains`` (2.3 matches ``like`` by prefix only, and Lite has no ``exists``).

Everything a user types is checked here, and nothing of it reaches an expression verbatim: dates
become integers, types and orientations must be among the known names, and a camera becomes its
words (letters and digits only), each matched as the beginning of a word of the stored camera
name: ``--camera "eos 5d"`` finds "Canon EOS 5D Mark II", ``--camera canon`` every Canon.

Days are inclusive at both ends: ``--after 2024-05-01 --before 2024-05-31`` is all of May, and
``--after D --before D`` the day D. Days are wall-clock calendar days (see :mod:`pixfind.ingest.facts`).
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from .errors import PixfindError

#: Type names accepted by ``--type``, and what they stand for.
TYPE_ALIASES = {
    "jpeg": "jpeg",
    "jpg": "jpeg",
    "png": "png",
    "webp": "webp",
    "gif": "gif",
    "bmp": "bmp",
    "tiff": "tiff",
    "tif": "tiff",
}
ORIENTATIONS = ("landscape", "portrait", "square")
#: Most characters and words of a ``--camera`` text.
MAX_CAMERA_CHARS = 200
MAX_CAMERA_QUERY_WORDS = 8
MAX_SIDE = 1_000_000
#: Below every date a row can hold: ``meta["taken"] >= LOWEST`` holds for every row that has one.
LOWEST = -(2**62)
_DAY = 86_400
_WORD = re.compile(r"[^\W_]+")


def words_of(text: str) -> list[str]:
    """The case-folded words (runs of letters and digits) of ``text``: what stored camera terms
    (:mod:`pixfind.ingest.facts`) and ``--camera`` queries are made of. They never hold a quote,
    backslash or wildcard, so an expression can quote them as they are."""
    return _WORD.findall(text.casefold())


class FilterError(PixfindError):
    """A filter the user gave cannot be used as it is (the message says which and how)."""

    exit_code = 2  # a usage error, as the command line's own


@dataclass(frozen=True)
class Filters:
    """What the hits must be. Build with :meth:`of` (checks and normalises what a user typed),
    e.g. ``Filters.of(after="2024-05-01", camera="pixel", types="jpeg,png")``."""

    after: date | None = None
    before: date | None = None
    camera: tuple[str, ...] = ()  # words, case-folded
    types: tuple[str, ...] = ()
    orientation: str | None = None
    min_width: int | None = None
    min_height: int | None = None

    @classmethod
    def of(
        cls,
        *,
        after: str | date | None = None,
        before: str | date | None = None,
        camera: str | None = None,
        types: str | Iterable[str] | None = None,
        orientation: str | None = None,
        min_width: int | None = None,
        min_height: int | None = None,
    ) -> Filters:
        """Checked filters; a bad value raises :class:`FilterError` naming it and the fix."""
        first, last = parse_day(after, "after"), parse_day(before, "before")
        if first is not None and last is not None and first > last:
            raise FilterError(f"--after {first} is later than --before {last}: nothing can match; swap them")
        return cls(
            after=first,
            before=last,
            camera=camera_words(camera),
            types=parse_types(types),
            orientation=parse_orientation(orientation),
            min_width=parse_side(min_width, "min-width"),
            min_height=parse_side(min_height, "min-height"),
        )

    def __bool__(self) -> bool:
        return self.needs_facts() or bool(self.min_width or self.min_height)

    def needs_facts(self) -> bool:
        """Whether rows written before the date and camera fields existed are left out."""
        return bool(self.after or self.before or self.camera or self.types or self.orientation)

    def expression(self) -> str:
        """The Milvus filter expression (schema 2's ``meta`` JSON field); "" when none."""
        parts: list[str] = []
        if self.after is not None:
            parts.append(f'meta["taken"] >= {day_start(self.after)}')
        if self.before is not None:
            parts.append(f'meta["taken"] < {day_start(self.before) + _DAY}')
        parts += [f'json_contains(meta["camera_terms"], "{word}")' for word in self.camera]
        if self.types:
            parts.append('meta["type"] in [' + ", ".join(f'"{name}"' for name in self.types) + "]")
        if self.orientation:
            parts.append(f'meta["orientation"] == "{self.orientation}"')
        if self.min_width:
            parts.append(f'meta["width"] >= {self.min_width}')
        if self.min_height:
            parts.append(f'meta["height"] >= {self.min_height}')
        return " and ".join(parts)

    def params(self) -> list[tuple[str, str]]:
        """The filters as the web API's query parameters (what ``pixfind search`` forwards)."""
        out: list[tuple[str, str]] = []
        if self.after:
            out.append(("after", self.after.isoformat()))
        if self.before:
            out.append(("before", self.before.isoformat()))
        if self.camera:
            out.append(("camera", " ".join(self.camera)))
        if self.types:
            out.append(("type", ",".join(self.types)))
        if self.orientation:
            out.append(("orientation", self.orientation))
        if self.min_width:
            out.append(("min_width", str(self.min_width)))
        if self.min_height:
            out.append(("min_height", str(self.min_height)))
        return out

    def describe(self) -> str:
        """The filters in a few words, for a "no matches" line."""
        return " ".join(f"--{name.replace('_', '-')} {value}" for name, value in self.params())


def parse_day(value: str | date | None, name: str) -> date | None:
    """A day given as ``YYYY-MM-DD`` (or a date, or a datetime: its day); None when not given."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    text = str(value).strip()
    if not text:
        return None
    try:
        day = date.fromisoformat(text) if len(text) == 10 else None
    except ValueError:
        day = None
    if day is None:
        shown = text[:40].encode("unicode_escape").decode("ascii")
        raise FilterError(f"--{name} {shown!r} is not a day: give one as YYYY-MM-DD, e.g. --{name} 2024-05-31")
    return day


def day_start(day: date) -> int:
    """The first second of ``day``, in the wall-clock seconds the records hold."""
    return calendar.timegm(day.timetuple())


def camera_words(text: str | None) -> tuple[str, ...]:
    if text is None or not text.strip():
        return ()
    if len(text) > MAX_CAMERA_CHARS:
        raise FilterError(f"--camera is too long (limit {MAX_CAMERA_CHARS} characters): give a make or model")
    words = tuple(dict.fromkeys(words_of(text)))
    if not words:
        raise FilterError("--camera needs letters or digits, e.g. --camera canon or --camera 'iphone 12'")
    if len(words) > MAX_CAMERA_QUERY_WORDS:
        raise FilterError(f"--camera has too many words (limit {MAX_CAMERA_QUERY_WORDS}): give a make or model")
    return words


def parse_types(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    names = value.split(",") if isinstance(value, str) else [part for item in value for part in str(item).split(",")]
    chosen: list[str] = []
    for name in names:
        key = name.strip().lower().lstrip(".")
        if not key:
            continue
        if key not in TYPE_ALIASES:
            known = ", ".join(sorted(set(TYPE_ALIASES.values())))
            shown = name.strip()[:20].encode("unicode_escape").decode("ascii")
            raise FilterError(f"--type {shown!r} is not a type pixfind indexes: choose from {known}")
        chosen.append(TYPE_ALIASES[key])
    return tuple(sorted(set(chosen)))


def parse_orientation(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    key = value.strip().lower()
    if key not in ORIENTATIONS:
        shown = value.strip()[:20].encode("unicode_escape").decode("ascii")
        raise FilterError(f"--orientation {shown!r}: choose landscape, portrait or square")
    return key


def parse_side(value: int | str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        side = int(value)
    except (TypeError, ValueError):
        side = -1
    if isinstance(value, bool) or not 1 <= side <= MAX_SIDE:
        raise FilterError(f"--{name} takes a number of pixels from 1 to {MAX_SIDE:,}")
    return side


def taken_text(seconds: object) -> str | None:
    """A stored ``taken`` as ISO date and time (wall clock, no zone), or None."""
    if not isinstance(seconds, int) or isinstance(seconds, bool):
        return None
    try:
        return (datetime(1970, 1, 1) + timedelta(seconds=seconds)).isoformat()
    except OverflowError:
        return None


def expression_for(filters: Filters | None, schema: int, collection: str) -> str:
    """``filters`` as an expression for a collection of ``schema``; schema 1 (collections made
    before pixfind 0.x's JSON record) has no place for them: one line says how to rebuild."""
    if not filters:
        return ""
    if schema < 2:
        raise FilterError(
            f"collection {collection!r} uses the first pixfind layout (schema 1), which cannot hold "
            "dates, cameras or types: index the folders again into a new collection "
            "(pixfind index --collection NEW FOLDER) and search that one to filter"
        )
    return filters.expression()
