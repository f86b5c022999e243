"""The figures README.md and docs/ promise, read from the documents themselves.

Tests assert these numbers, not the code's constants, so the documents and the code cannot drift
apart unnoticed: change a promise in the docs and the tests hold the code to the new one; remove
the sentence and the test that relied on it fails, naming the sentence it looked for.

Time bounds: a promise of "at most X s" is held to X plus :data:`SCHEDULING_SLACK_S` (a shared
2-core machine needs a moment to run the failing call's last steps); "about X s" to X times
:data:`ABOUT`.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCHEDULING_SLACK_S = 0.5
ABOUT = 1.25


@functools.cache
def _text(document: str) -> str:
    return " ".join((REPO / document).read_text().split())  # sentences may wrap anywhere


def find(document: str, pattern: str) -> tuple[str, ...]:
    """The groups of ``pattern`` in ``document`` (whitespace-normalised); fails if absent."""
    match = re.search(pattern, _text(document))
    if match is None:
        raise AssertionError(f"{document} no longer says /{pattern}/: update the tests with the promise")
    return match.groups()


def number(text: str) -> float:
    return float(text.replace(",", ""))


def at_most(seconds: float) -> float:
    return seconds + SCHEDULING_SLACK_S


def about(seconds: float) -> float:
    return seconds * ABOUT


# -- a Milvus server ------------------------------------------------------------------------------


def unreachable_uri_s() -> float:
    """README: "an unreachable URI fails in at most 3 s (TCP probe)"."""
    return number(find("README.md", r"an unreachable URI fails in at most ([\d.]+) s")[0])


def stopped_server_s() -> float:
    """README: "a server that stops answering in about 4 s"."""
    return number(find("README.md", r"a server that stops answering in about ([\d.]+) s")[0])


def server_write_limits() -> tuple[int, int]:
    """README: "Writes go in batches of at most 5,000 rows / 16 MiB": (rows, bytes)."""
    rows, mib = find("README.md", r"Writes go in batches of at most ([\d,]+) rows / (\d+) MiB")
    return int(number(rows)), int(mib) << 20


# -- images ---------------------------------------------------------------------------------------


def max_megapixels() -> int:
    """README: "images over 180 megapixels are refused"."""
    return int(find("README.md", r"images over (\d+) megapixels are refused")[0])


def animated_formats() -> list[str]:
    """docs/reliability.md: "animated GIF / WebP / TIFF (first frame; ...)"."""
    listed = find("docs/reliability.md", r"animated ((?:\w+ / )*\w+) \(first frame")[0]
    return [name.strip() for name in listed.split("/")]


# -- pixfind serve --------------------------------------------------------------------------------


def upload_limit_mb() -> int:
    """README "limits uploads (20 MB)", docs/web.md "(limit 20 MB)": the same figure."""
    readme = int(find("README.md", r"limits uploads \((\d+) MB\)")[0])
    web = int(find("docs/web.md", r"multipart field `file` \(limit (\d+) MB\)")[0])
    assert readme == web, f"README says {readme} MB, docs/web.md {web} MB"
    return readme


def max_query_chars() -> int:
    """docs/web.md: "Query text at most 500 characters"."""
    return int(find("docs/web.md", r"Query text at most (\d+) characters")[0])


def k_range() -> tuple[int, int]:
    """docs/web.md: "`k` out of 1–200"."""
    low, high = find("docs/web.md", r"`k` out of (\d+)[–-](\d+)")
    return int(low), int(high)


def thumbnail_side() -> int:
    """docs/web.md: "JPEG thumbnail, longest side 256 px"."""
    return int(find("docs/web.md", r"JPEG thumbnail, longest side (\d+) px")[0])


def default_host() -> str:
    """README: "It binds 127.0.0.1 by default"."""
    return find("README.md", r"binds (\d+\.\d+\.\d+\.\d+) by default")[0]
