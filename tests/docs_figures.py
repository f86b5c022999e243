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
    return number(find("README.md", r"[Aa]n unreachable URI fails in at most ([\d.]+) s")[0])


def not_milvus_s() -> float:
    """README: "a port that accepts connections but does not answer as Milvus, in at most 4 s"."""
    return number(find("README.md", r"does not answer as Milvus, in at most ([\d.]+) s")[0])


def stopped_server_s() -> float:
    """README: "a server that goes away mid-session, in about 4 s"."""
    return number(find("README.md", r"a server that goes away mid-session, in about ([\d.]+) s")[0])


def stalled_server_s() -> float:
    """README: "one that stops answering mid-call (connection up, no reply), in at most 10 s"."""
    return number(find("README.md", r"stops answering mid-call \(connection up, no reply\), in at most ([\d.]+) s")[0])


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


def readme_limits() -> dict[str, int]:
    """The figures of the README's "Limits" table (one set for the CLI, the API and the page)."""
    rows = {}
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    query = re.fullmatch(r"([\d,]+) characters", rows.get("query text", ""))
    results = re.fullmatch(r"1 to ([\d,]+)", rows.get("results per query (`-k`, `limit`, `k`)", ""))
    upload = re.fullmatch(
        r"(\d+) MiB file; (\d+) megapixels, JPEG (\d+) megapixels \(read from the header, before decoding\)",
        rows.get("uploaded image (web search by image)", ""),
    )
    assert query and results and upload, "the README's Limits table changed shape: update the tests with it"
    return {
        "query_chars": int(number(query.group(1))),
        "results": int(number(results.group(1))),
        "upload_bytes": int(upload.group(1)) << 20,
        "upload_pixels": int(upload.group(2)) * 1_000_000,
        "upload_jpeg_pixels": int(upload.group(3)) * 1_000_000,
    }


def upload_limit_mib() -> int:
    """README's Limits table "20 MiB file", repeated by docs/web.md "at most 20 MiB"."""
    mib = readme_limits()["upload_bytes"] >> 20
    web = int(find("docs/web.md", r"an uploaded image at most (\d+) MiB")[0])
    assert mib == web, f"README says {mib} MiB, docs/web.md {web} MiB"
    return mib


def max_query_chars() -> int:
    """README's Limits table, repeated by docs/web.md "query text at most 1,000 characters"."""
    chars = readme_limits()["query_chars"]
    web = int(number(find("docs/web.md", r"query text at most ([\d,]+) characters")[0]))
    assert chars == web, f"README says {chars}, docs/web.md {web} characters"
    return chars


def k_range() -> tuple[int, int]:
    """README's Limits table "1 to 1,000", repeated by docs/web.md "`k` 1 to 1,000"."""
    high = readme_limits()["results"]
    low, web = find("docs/web.md", r"`k` (\d+) to ([\d,]+)")
    assert (int(low), int(number(web))) == (1, high), f"README says 1 to {high}, docs/web.md {low} to {web}"
    return 1, high


def thumbnail_side() -> int:
    """docs/web.md: "JPEG thumbnail, longest side 256 px"."""
    return int(find("docs/web.md", r"JPEG thumbnail, longest side (\d+) px")[0])


def default_host() -> str:
    """README: "It binds 127.0.0.1 by default"."""
    return find("README.md", r"binds (\d+\.\d+\.\d+\.\d+) by default")[0]
