"""From a query vector to the hits a user sees: a score cut-off, the query's own files left out,
and exact copies shown once.

A library often holds the same file several times (a wallpaper package ships one picture at many
paths; a photo copied into two albums). Those copies have one vector, so they fill the top of
every result in a row. Here they collapse into one hit that says how many files it stands for.
"Exact" means equal whole-file content: the BLAKE3 hash recorded for each row at index time
(rows written before that hash existed, and schema-1 collections, have none and never collapse).
Resized or re-encoded copies are different files with different vectors, and stay apart.

Written over :class:`~pixfind.store.Store`'s public reads only: ``search`` for the candidates,
``lookup`` for the fingerprints of those whose score equals a neighbour's (copies share one
vector, hence one score), then ``find_by_fingerprint`` for the content hashes of the rows that
share a fingerprint (equal content implies an equal fingerprint): a result without copies costs
no extra query beyond a lookup of the few near-ties. A hit counts every copy in the index (in
the ``--under`` folder) once one of them is among the candidates with it; an approximate index
(HNSW on a server) may return only one of two identical vectors, and a copy whose twin falls
just beyond the candidates stands alone: those are not collapsed, nor counted.
Collapsing needs more candidates than hits: Milvus is asked for twice as many and then four
times more, up to :data:`MAX_CANDIDATES`, until ``limit`` distinct hits are found.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from .filters import Filters, expression_for
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
#: Scores this close may be one vector's: copies embedded separately from the same pixels
#: differ by rounding only (about 1e-6 in f32; bf16 batches somewhat more).
SAME_SCORE = 1e-3


def find(
    store: Store,
    vector: np.ndarray,
    limit: int,
    under: str | None = None,
    *,
    min_score: float | None = None,
    all_copies: bool = False,
    exclude: Sequence[str] = (),
    filters: Filters | None = None,
) -> list[Hit]:
    """The best ``limit`` hits for ``vector``: at or above ``min_score``, matching ``filters``
    (applied by Milvus inside the search), without the files named in ``exclude`` (any way they
    are named), one hit per content unless ``all_copies``."""
    limit, min_score = check_limit(limit), check_min_score(min_score)
    folder = resolve_under(under)
    info = store.info()
    where = expression_for(filters, info.schema if info is not None else 2, store.collection)
    excluded = {key_of(form) for path in exclude for form in candidate_paths(path)}
    wanted = limit + len(excluded) if all_copies else max(2 * limit, limit + FIRST_MARGIN)
    while True:
        asked = min(MAX_CANDIDATES, wanted)
        found = store.search([vector], limit=asked, folder=folder, where=where)[0]
        more_exist = len(found) == asked
        candidates = _kept(found, excluded, min_score)
        if len(candidates) < len(found) - _excluded_count(found, excluded):
            more_exist = False  # the cut-off was reached: every later candidate scores lower
        hits = candidates if all_copies else _collapsed(store, candidates, folder, excluded)
        # collapsed, the last hit may stand for copies beyond the candidates: one more is needed
        enough = len(hits) >= limit if all_copies else len(hits) > limit
        if enough or not more_exist or asked >= MAX_CANDIDATES:
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
            hits.append(Hit.of(hit))
    return hits


def _excluded_count(found: Iterable[SearchHit], excluded: set[str]) -> int:
    return sum(key_of(hit.path) in excluded for hit in found)


def _collapsed(store: Store, hits: list[Hit], folder: str | None, excluded: set[str]) -> list[Hit]:
    """``hits`` with each content shown once, by its best-ranked file, carrying its copies."""
    suspects = [key_of(hits[i].path) for i in _possible_copies(hits)]
    stored = store.lookup(suspects) if suspects else {}
    prints = Counter(stored[key].fingerprint for key in suspects if key in stored)
    fingerprints = sorted(fp for fp, count in prints.items() if count > 1)
    copies = _copies_by_content(store, fingerprints, folder, excluded)
    content_of = {key: content for content, paths in copies.items() for key in map(key_of, paths)}
    seen: set[str] = set()
    out: list[Hit] = []
    for hit in hits:
        content = content_of.get(key_of(hit.path))
        if content is None:
            out.append(hit)
            continue
        if content in seen:
            continue  # a copy of a better-ranked hit
        seen.add(content)
        others = tuple(path for path in copies[content] if path != hit.path)
        out.append(replace(hit, copies=1 + len(others), copy_paths=others))
    return out


def _possible_copies(hits: list[Hit]) -> list[int]:
    """Positions of the candidates that may be copies of another: files with equal content have
    one vector (reused, or computed from the same pixels), hence one score, so only a candidate
    within :data:`SAME_SCORE` of a neighbour can be one. In most results few are: the content
    check then costs a lookup of those few, and no query at all when none share a fingerprint."""
    near: set[int] = set()
    for i in range(1, len(hits)):
        if hits[i - 1].score - hits[i].score <= SAME_SCORE:
            near.update((i - 1, i))
    return sorted(near)


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
