"""How results are shown: a terminal table, JSON, or a contact-sheet image; and :func:`printable`,
through which every name reaches the terminal.

Importing this module is cheap (Pillow is imported by the grid functions), so the CLI can print
an error line through :func:`printable` without loading anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PixfindError

if TYPE_CHECKING:
    from PIL import Image, ImageFont

    from .duplicates import DuplicateGroup
    from .ingest.report import IndexReport
    from .search import Hit

TILE = 150
COLUMNS = 5
CAMERA_CELL = 24  # characters of a camera name in the results table (the JSON has it whole)
_LABEL_BAND = 22


#: What a terminal would act on instead of showing: C0 controls, DEL, C1 controls, the Unicode
#: bidirectional marks, embeddings, overrides and isolates ("Trojan Source"), line and paragraph
#: separators, and lone surrogates (the bytes of a name that are not UTF-8).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff]")
#: The same, less the C0 controls, which json escapes itself (and uses, as newlines, between values).
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """``text`` with everything a terminal would act on shown as a visible escape: ``\\n``,
    ``\\t``, ``\\r``, ``\\xNN`` for other ASCII controls and for bytes that are not UTF-8,
    ``\\uNNNN`` for C1 controls, bidirectional controls and separators.

    File names are untrusted: printed raw, a name can clear the screen, hide text, write the
    clipboard (OSC 52) or reorder a line. Every name pixfind prints goes through here (the
    table, the summary, error lines, the "wrote" line), as ``ls`` and git escape theirs.
    Backslashes are left alone, so ``a\\x1b`` may also be a name holding those four characters;
    ``--json`` gives the exact name.
    """
    return _UNSAFE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if code < 0x80:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode holds it
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def hits_json(hits: Sequence[Hit]) -> str:
    return json_text([hit.to_dict() for hit in hits])


def json_text(data: object) -> str:
    """JSON that can always be printed, and printed to a terminal: readable UTF-8, except that
    what a terminal would act on (see :func:`printable`; json itself escapes only C0 controls)
    becomes a ``\\uXXXX`` escape, lone surrogates (bytes of a file name that are not UTF-8)
    included. ``json.loads`` gives back the same string, and ``os.fsencode`` of it the original
    bytes."""
    text = json.dumps(data, ensure_ascii=False, indent=2)
    return _UNSAFE_IN_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def hits_table(hits: Sequence[Hit]) -> object:
    """A rich Table: rank, score, size, then each of copies, date taken and camera that some hit
    has, then the path. Text from files (camera, path) is shown through :func:`printable`, never
    as markup; a row stays one line however long its camera name."""
    from rich.table import Table
    from rich.text import Text

    copies = any(hit.copies > 1 for hit in hits)
    dated = any(hit.taken for hit in hits)
    cameras = any(hit.camera for hit in hits)
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("#", justify="right", style="dim")
    table.add_column("score", justify="right")
    table.add_column("size", justify="right", style="dim")
    if copies:
        table.add_column("copies", justify="right")
    if dated:
        table.add_column("taken", no_wrap=True)
    if cameras:
        table.add_column("camera", max_width=CAMERA_CELL, no_wrap=True, overflow="ellipsis")
    table.add_column("path", overflow="fold")
    for hit in hits:
        cells: list[str | Text] = [str(hit.rank), f"{hit.score:.4f}", f"{hit.width}x{hit.height}"]
        if copies:
            cells.append(f"{hit.copies}" if hit.copies > 1 else "")
        if dated:
            cells.append(taken_cell(hit))
        if cameras:
            cells.append(Text(printable(hit.camera or "")))
        table.add_row(*cells, Text(printable(hit.path)))
    return table


def taken_cell(hit: Hit) -> str:
    """The day a hit was taken; in parentheses when that is the file's date, not the camera's."""
    if not hit.taken:
        return ""
    day = hit.taken[:10]
    return day if hit.taken_from == "exif" else f"({day})"


def contact_sheet(hits: Sequence[Hit], tile: int = TILE, columns: int = COLUMNS) -> Image.Image:
    """The tutorial's grid, improved: square crops, rank and score on each tile, rows as needed."""
    from PIL import Image

    rows = max(1, -(-len(hits) // columns))
    sheet = Image.new("RGB", (columns * tile, rows * tile), (24, 24, 24))
    font = _font(13)
    for index, hit in enumerate(hits):
        x, y = (index % columns) * tile, (index // columns) * tile
        sheet.paste(_tile(hit.path, tile), (x, y))
        _label(sheet, x, y, tile, f"#{hit.rank}  {hit.score:.3f}", font)
    return sheet


def write_grid(hits: Sequence[Hit], destination: str | Path) -> Path:
    target = Path(destination)
    if not hits:
        raise PixfindError("no results to draw: the grid was not written")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(hits).save(target)
    except (OSError, ValueError) as exc:
        raise PixfindError(f"cannot write grid {target}: {exc}; use a .jpg or .png path you can write") from exc
    return target


def _tile(path: str, size: int) -> Image.Image:
    from PIL import Image, ImageDraw, ImageOps

    from .ingest.decode import ImageLoadError, load_image

    try:
        image = load_image(path, min_side=size).image
    except ImageLoadError:
        placeholder = Image.new("RGB", (size, size), (70, 70, 70))
        ImageDraw.Draw(placeholder).text((10, size // 2 - 8), "unreadable", fill=(220, 220, 220))
        return placeholder
    return ImageOps.fit(image, (size, size), Image.Resampling.BICUBIC)


def _label(sheet: Image.Image, x: int, y: int, tile: int, text: str, font: ImageFont.ImageFont) -> None:
    from PIL import Image, ImageDraw

    band = Image.new("RGBA", (tile, _LABEL_BAND), (0, 0, 0, 150))
    sheet.paste(band, (x, y + tile - _LABEL_BAND), band)
    ImageDraw.Draw(sheet).text((x + 6, y + tile - _LABEL_BAND + 3), text, fill=(255, 255, 255), font=font)


def _font(size: int) -> ImageFont.ImageFont:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 ships a scalable default font
    except (TypeError, OSError):
        return ImageFont.load_default()


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def summary_lines(report: IndexReport, show_failures: int = 20) -> list[str]:
    filled = f" ({report.backfilled:,} given dates and cameras)" if report.backfilled else ""
    head = (
        f"{report.new:,} new, {report.updated:,} updated, {report.unchanged:,} unchanged{filled}, "
        f"{report.moved:,} moved, {report.copied:,} copied, {report.removed:,} removed, "
        f"{len(report.failed):,} failed, {len(report.unreadable):,} unreadable "
        f"in {format_duration(report.elapsed_s)}"
    )
    if report.embedded:
        head += f" ({report.images_per_s:.1f} images/s)"
    lines = [("stopped early: " if report.interrupted else "indexed: ") + head]
    if report.precision:
        lines.append(f"images embedded in {report.precision} ({report.precision_reason})")
    if report.decoded_on and report.embedded:
        others = report.embedded - report.decoded_on_device
        why = " (the others on the CPU: not JPEG, CMYK, over the size limit, or refused by the GPU decoder)"
        lines.append(
            f"decoded on {report.decoded_on}: {report.decoded_on_device:,} of {report.embedded:,} images"
            + (why if others else "")
        )
    for path, reason in list(report.unreadable.items())[:show_failures]:
        kept = report.kept.get(path, 0)
        note = f" ({kept:,} indexed image{'s' * (kept != 1)} kept)" if kept else ""
        lines.append(printable(f"  unreadable {path}: {reason}{note}"))
    for path, reason in report.failed[:show_failures]:
        lines.append(printable(f"  skipped {path}: {reason}"))  # a reason may quote the name too
    hidden = max(0, len(report.failed) - show_failures) + max(0, len(report.unreadable) - show_failures)
    if hidden > 0:
        lines.append(f"  ... and {hidden:,} more (--report FILE writes them all as JSON)")
    for path, kept in report.empty.items():
        lines.append(
            f"  folder {printable(path)} is empty but the index has {kept:,} image{'s' * (kept != 1)} under it: "
            f"not removing them (a drive not mounted?); `pixfind remove {printable(path)}` drops them"
        )
    if report.interrupted:
        lines.append("run the same command again to finish: work done so far is kept")
    return lines


def duplicates_table(groups: Sequence[DuplicateGroup]) -> object:
    """A rich Table of duplicate groups: per group a heading row (files, lowest similarity,
    bytes freed by keeping the first), then each file's dimensions, bytes and path (through
    :func:`printable`, never as markup), noting a file whose content hash equals an earlier one's."""
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("group", justify="right", style="dim")
    table.add_column("pixels", justify="right")
    table.add_column("bytes", justify="right", style="dim")
    table.add_column("path", overflow="fold")
    for number, group in enumerate(groups, start=1):
        kind = "exact copies" if group.exact else f"similarity >= {group.similarity:.4f}"
        heading = f"{len(group.files)} images, {kind}, {human_bytes(group.reclaimable)} freed by keeping the first"
        table.add_row(f"#{number}", "", "", Text(heading, style="bold"))
        seen: set[str] = set()
        for file in group.files:
            name = Text(printable(file.path))
            if file.content in seen:
                name.append("  (same bytes as one above)", style="dim")
            if file.content:
                seen.add(file.content)
            table.add_row("", f"{file.width}x{file.height}", f"{file.size:,}", name)
    return table


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"
