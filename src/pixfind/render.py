"""How results are shown: a terminal table, JSON, or a contact-sheet image."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from .errors import PixfindError
from .images import ImageLoadError, load_image
from .indexer import IndexReport
from .search import Hit

TILE = 150
COLUMNS = 5
_LABEL_BAND = 22


def hits_json(hits: Sequence[Hit]) -> str:
    return json_text([hit.to_dict() for hit in hits])


def json_text(data: object) -> str:
    """JSON that can always be printed: readable UTF-8, except that bytes of a file name that are
    not UTF-8 (held as lone surrogates) become ``\\udcXX`` escapes instead of an encoding error.
    ``json.loads`` gives back the same string, and ``os.fsencode`` of it the original bytes."""
    text = json.dumps(data, ensure_ascii=False, indent=2)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def hits_table(hits: Sequence[Hit]) -> object:
    """A rich Table: rank, score, size, path."""
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("#", justify="right", style="dim")
    table.add_column("score", justify="right")
    table.add_column("size", justify="right", style="dim")
    table.add_column("path", overflow="fold")
    for hit in hits:
        table.add_row(str(hit.rank), f"{hit.score:.4f}", f"{hit.width}x{hit.height}", _printable(hit.path))
    return table


def _printable(path: str) -> str:
    """Paths with newlines or undecodable bytes, shown on one line without breaking the terminal."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8").replace("\n", "\\n")


def contact_sheet(hits: Sequence[Hit], tile: int = TILE, columns: int = COLUMNS) -> Image.Image:
    """The tutorial's grid, improved: square crops, rank and score on each tile, rows as needed."""
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
    try:
        image = load_image(path, min_side=size).image
    except ImageLoadError:
        placeholder = Image.new("RGB", (size, size), (70, 70, 70))
        ImageDraw.Draw(placeholder).text((10, size // 2 - 8), "unreadable", fill=(220, 220, 220))
        return placeholder
    return ImageOps.fit(image, (size, size), Image.Resampling.BICUBIC)


def _label(sheet: Image.Image, x: int, y: int, tile: int, text: str, font: ImageFont.ImageFont) -> None:
    band = Image.new("RGBA", (tile, _LABEL_BAND), (0, 0, 0, 150))
    sheet.paste(band, (x, y + tile - _LABEL_BAND), band)
    ImageDraw.Draw(sheet).text((x + 6, y + tile - _LABEL_BAND + 3), text, fill=(255, 255, 255), font=font)


def _font(size: int) -> ImageFont.ImageFont:
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
    head = (
        f"{report.new:,} new, {report.updated:,} updated, {report.unchanged:,} unchanged, "
        f"{report.moved:,} moved, {report.removed:,} removed, {len(report.failed):,} failed "
        f"in {format_duration(report.elapsed_s)}"
    )
    if report.embedded:
        head += f" ({report.images_per_s:.1f} images/s)"
    lines = [("stopped early: " if report.interrupted else "indexed: ") + head]
    if report.precision:
        lines.append(f"images embedded in {report.precision} ({report.precision_reason})")
    for path, reason in report.failed[:show_failures]:
        lines.append(f"  skipped {_printable(path)}: {reason}")
    hidden = len(report.failed) - show_failures
    if hidden > 0:
        lines.append(f"  ... and {hidden:,} more (--report FILE writes them all as JSON)")
    if report.interrupted:
        lines.append("run the same command again to finish: work done so far is kept")
    return lines
