"""From a query vector to the hits a user sees: a score cut-off, the query's own files left out,
and exact copies shown once.

A library often holds the same file several times (a wallpaper package ships one picture at many
paths; a photo copied into two albums). Those copies have one vector, so they fill the top of
every result in a row. Here they collapse into one hit that says how many files it stands for.
"Exact" means equal whole-file content: the BLAKE3 hash recorded for each row at index time
(rows written before that hash existed, and schema-1 collections, have none and never collapse).
Resized or re-encoded copies are different files with different vectors, and stay apart.

Written over :class:`~pixfind.store.Store`'s public reads only: ``search`` for the candidates,
``lookup`` for their fingerprints (no vectors), then ``find_by_fingerprint`` for the content
hashes of the rows that share a fingerprint (equal content implies an equal fingerprint).
Collapsing needs more candidates than hits: Milvus is asked for twice as many and then four
times more, up to :data:`MAX_CANDIDATES`, until ``limit`` distinct hits are found.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from .limits import check_limit, check_min_score
from .pathkeys import key_of, path_of
from .search import Hit, candidate_paths, resolve_under
from .store import CONTENT, SearchHit, Store

if TYPE_CHECKING:
    import numpy as np

#: Most candidates asked of Milvus for one query (Milvus's own top-k cap is 16,384).
MAX_CANDIDATES = 16_384
#: Candidates asked for first, beyond ``limit``, when copies may collapse or files are left out.
FIRST_MARGIN = 16


def find(
    store: Store,
    vector: np.ndarray,
    limit: int,
    under: str | None = None,
    *,
    min_score: float | None = None,
    all_copies: bool = False,
    exclude: Sequence[str] = (),
) -> list[Hit]:
    """The best ``limit`` hits for ``vector``: at or above ``min_score``, without the files named
    in ``exclude`` (any way they are named), one hit per content unless ``all_copies``."""
    limit, min_score = check_limit(limit), check_min_score(min_score)
    folder = resolve_under(under)
    excluded = {key_of(form) for path in exclude for form in candidate_paths(path)}
    wanted = limit + len(excluded) if all_copies else max(2 * limit, limit + FIRST_MARGIN)
    while True:
        asked = min(MAX_CANDIDATES, wanted)
        found = store.search([vector], limit=asked, folder=folder)[0]
        more_exist = len(found) == asked
        candidates = _kept(found, excluded, min_score)
        if len(candidates) < len(found) - _excluded_count(found, excluded):
            more_exist = False  # the cut-off was reached: every later candidate scores lower
        hits = candidates if all_copies else _collapsed(store, candidates, folder, excluded, limit)
        if len(hits) >= limit or not more_exist or asked >= MAX_CANDIDATES:
            return [replace(hit, rank=rank) for rank, hit in enumerate(hits[:limit], start=1)]
        wanted = asked * 4


def _kept(found: Sequence[SearchHit], excluded: set[str], min_score: float | None) -> list[Hit]:
    """Candidates in score order (ties by path, so every caller sees one order), the excluded
    files left out, cut at ``min_score``."""
    ordered = sorted(found, key=lambda hit: (-hit.score, hit.path))
    hits = []
    for hit in ordered:
        if min_score is not None and hit.score < min_score:
            break
        if key_of(hit.path) not in excluded:
            hits.append(Hit(rank=0, score=hit.score, path=hit.path, width=hit.width, height=hit.height, size=hit.size))
    return hits


def _excluded_count(found: Iterable[SearchHit], excluded: set[str]) -> int:
    return sum(key_of(hit.path) in excluded for hit in found)


def _collapsed(store: Store, hits: list[Hit], folder: str | None, excluded: set[str], limit: int) -> list[Hit]:
    """``hits`` with each content shown once, by its best-ranked file, carrying its copies."""
    keys = [key_of(hit.path) for hit in hits]
    stored = store.lookup(keys)
    fingerprints: list[str] = []
    for key in keys:  # the first ``limit`` distinct fingerprints are all the kept hits can have
        record = stored.get(key)
        if record is not None and record.fingerprint not in fingerprints:
            fingerprints.append(record.fingerprint)
            if len(fingerprints) == limit:
                break
    # every kept fingerprint is checked, not only those seen twice among the candidates: an
    # approximate index (HNSW on a server) can miss one of two identical vectors
    copies = _copies_by_content(store, fingerprints, folder, excluded)
    content_of = {key: content for content, paths in copies.items() for key in map(key_of, paths)}
    seen: set[str] = set()
    out: list[Hit] = []
    for hit, key in zip(hits, keys, strict=True):
        content = content_of.get(key)
        if content is None:
            out.append(hit)
            continue
        if content in seen:
            continue  # a copy of a better-ranked hit
        seen.add(content)
        others = tuple(path for path in copies[content] if path != hit.path)
        out.append(replace(hit, copies=1 + len(others), copy_paths=others))
    return out


def _copies_by_content(
    store: Store, fingerprints: list[str], folder: str | None, excluded: set[str]
) -> dict[str, list[str]]:
    """content hash -> sorted paths of the files (inside ``folder``, not excluded) that hold it,
    for contents held by two files or more."""
    if not fingerprints:
        return {}
    by_content: dict[str, list[str]] = {}
    for rows in store.find_by_fingerprint(fingerprints).values():
        for row in rows:
            content = row.get(CONTENT)
            if not content or row["path"] in excluded:
                continue
            path = path_of(row["path"])
            if folder is None or path.startswith(folder.rstrip("/") + "/"):
                by_content.setdefault(content, []).append(path)
    return {content: sorted(paths) for content, paths in by_content.items() if len(paths) > 1}
