"""Groups of near-identical images (copies, resized, re-encoded, lightly cropped), from the
stored vectors alone: no image is decoded and no model is loaded.

The search runs in batches against Milvus: a page of stored keys, their vectors, one top-k
search for the page (each row's :data:`NEIGHBOURS` nearest), and every pair at or above the
threshold is merged into groups with a union-find. Only one page of vectors is held at a time,
and the union-find holds only the paths that have a pair, so memory follows the number of
duplicates, not the size of the library. Top-k rather than a range search because
:meth:`Store.search` is what both Milvus Lite and a server answer alike; a group larger than
``NEIGHBOURS + 1`` is still found whole, through the links between its members.

Scores are cosines between CLIP vectors. :data:`DEFAULT_THRESHOLD` is chosen for the default
model's trained weights (README, "Find duplicates"); with random weights (``--pretrained
none``) every picture sits in a narrow cone and unrelated images score as high as light crops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from .errors import PixfindError
from .pathkeys import key_of
from .store import SearchHit, Store
from .stored_rows import StoredRecord, count_rows, records_of

#: Cosine at or above which two images count as duplicates (see the module docstring).
DEFAULT_THRESHOLD = 0.95
#: Nearest neighbours asked per stored vector (the row itself included).
NEIGHBOURS = 8
#: Stored vectors per Milvus search.
SEARCH_BATCH = 500


@dataclass(frozen=True)
class DuplicateFile:
    path: str
    size: int
    width: int
    height: int
    content: str | None  # the whole file's hash: equal hashes are byte-for-byte copies

    def to_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "size": self.size,
            "width": self.width,
            "height": self.height,
            "content": self.content,
        }


@dataclass
class DuplicateGroup:
    """Images that look the same, largest (in pixels, then bytes) first: the one to keep.

    ``similarity``: the lowest cosine among the pairs that joined the group; ``exact``: every
    file has the same content hash (byte-for-byte copies)."""

    files: list[DuplicateFile]
    similarity: float

    @property
    def exact(self) -> bool:
        hashes = {f.content for f in self.files}
        return len(hashes) == 1 and None not in hashes

    @property
    def reclaimable(self) -> int:
        """Bytes freed by keeping only the first file."""
        return sum(f.size for f in self.files[1:])

    def to_dict(self) -> dict[str, object]:
        return {
            "similarity": round(self.similarity, 6),
            "exact_copies": self.exact,
            "reclaimable_bytes": self.reclaimable,
            "files": [f.to_dict() for f in self.files],
        }


@dataclass
class _UnionFind:
    parent: dict[str, str] = field(default_factory=dict)
    weakest: dict[str, float] = field(default_factory=dict)  # per root: lowest score that joined it
    merges: int = 0  # unions of two groups: every linked path less the merges is the number of groups

    @property
    def group_count(self) -> int:
        return len(self.parent) - self.merges

    def find(self, item: str) -> str:
        root = self.parent.setdefault(item, item)
        while root != self.parent[root]:
            root = self.parent[root]
        while item != root:  # path compression
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: str, b: str, score: float) -> None:
        root_a, root_b = self.find(a), self.find(b)
        weakest = min(score, self.weakest.get(root_a, 1.0), self.weakest.get(root_b, 1.0))
        if root_a != root_b:
            self.parent[root_b] = root_a
            self.weakest.pop(root_b, None)
            self.merges += 1
        self.weakest[root_a] = weakest

    def groups(self) -> Iterator[tuple[list[str], float]]:
        members: dict[str, list[str]] = {}
        for item in self.parent:
            members.setdefault(self.find(item), []).append(item)
        for root, items in members.items():
            yield items, self.weakest.get(root, 1.0)


def check_threshold(threshold: float) -> float:
    if not 0.0 < threshold <= 1.0:
        raise PixfindError(f"--threshold {threshold} is not a cosine in (0, 1]: try {DEFAULT_THRESHOLD}")
    return float(threshold)


def find_duplicates(
    store: Store,
    threshold: float = DEFAULT_THRESHOLD,
    folder: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    found: Callable[[int], None] | None = None,
    batch: int | None = None,
) -> list[DuplicateGroup]:
    """Groups of stored images (under ``folder``, an absolute path) whose vectors are at least
    ``threshold`` apart in cosine; ``progress(done, total)`` after each batch, and before it
    ``found(groups so far)`` (the web page shows both while a long run goes on); ``batch``:
    stored vectors per search (default :data:`SEARCH_BATCH`; the server takes fewer, so that a
    search waiting between two batches waits less)."""
    threshold = check_threshold(threshold)
    total = count_rows(store, folder)
    links = _UnionFind()
    done = 0
    if progress is not None:
        progress(0, total)  # the rate counts from here
    for keys in store.iter_keys(folder, batch=batch or SEARCH_BATCH):
        vectors = store.vectors_of(keys)
        present = [key for key in keys if key in vectors]
        if present:
            results = store.search([vectors[key] for key in present], limit=NEIGHBOURS, folder=folder)
            _link(links, present, results, threshold)
        done += len(keys)
        if found is not None:
            found(links.group_count)
        if progress is not None:
            progress(done, total)
    return _groups(store, links)


def _link(links: _UnionFind, keys: Sequence[str], results: Sequence[Sequence[SearchHit]], threshold: float) -> None:
    for key, hits in zip(keys, results, strict=True):
        for hit in hits:
            other = key_of(hit.path)
            if other != key and hit.score >= threshold:
                links.union(key, other, hit.score)


def _groups(store: Store, links: _UnionFind) -> list[DuplicateGroup]:
    """The groups with each file's stored record, read in batches."""
    found = list(links.groups())
    records: dict[str, StoredRecord] = {}
    keys = [key for items, _ in found for key in items]
    for start in range(0, len(keys), SEARCH_BATCH):
        records.update(records_of(store, keys[start : start + SEARCH_BATCH]))
    groups = []
    for items, weakest in found:
        files = [_file(records[key]) for key in items if key in records]  # gone since: left out
        if len(files) > 1:
            files.sort(key=lambda f: (-f.width * f.height, -f.size, f.path))
            groups.append(DuplicateGroup(files=files, similarity=weakest))
    groups.sort(key=lambda g: (-len(g.files), -g.reclaimable, g.files[0].path))
    return groups


def _file(record: StoredRecord) -> DuplicateFile:
    return DuplicateFile(record.path, record.size, record.width, record.height, record.content)
