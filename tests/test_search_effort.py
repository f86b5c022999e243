"""The default search effort on a Milvus server reaches recall@10 >= 0.98 at a million rows.

The oracle is the measurement, not a constant of the code: ``benchmarks/results/million.txt``
(``benchmarks/million.py`` on 1M clustered CLIP-like vectors, recall against exact search)
says which ``ef`` (HNSW, what pixfind builds) and which ``nprobe`` (IVF) first reached 0.98;
the parameters pixfind sends with its default effort must be at least those.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pixfind.config import default_search_ef
from pixfind.store.policies import SERVER_INDEX, ann_search_params

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "million.txt"
TARGET_RECALL = 0.98
LINE = re.compile(
    r"^server n=1,000,000 (?P<kind>\w+) (?P<params>\{[^}]*\}) (?P<knob>ef|nprobe)=(?P<effort>\d+):.*"
    r"recall@10 (?P<recall>[\d.]+)"
)


def least_effort_measured(kind: str) -> int:
    """The smallest effort at which ``kind`` reached the target recall at 1M rows."""
    reached = []
    for line in RESULTS.read_text().splitlines():
        match = LINE.match(line)
        if match and match["kind"] == kind and float(match["recall"]) >= TARGET_RECALL:
            reached.append(int(match["effort"]))
    assert reached, f"{RESULTS.name} has no {kind} search at 1M rows with recall@10 >= {TARGET_RECALL}"
    return min(reached)


@pytest.fixture
def default_effort(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.delenv("PIXFIND_SEARCH_EF", raising=False)
    return default_search_ef()


def test_the_default_ef_reaches_the_target_on_the_index_pixfind_builds(default_effort: int) -> None:
    kind = SERVER_INDEX["index_type"]
    sent = ann_search_params(kind, default_effort, limit=10)
    assert sent["ef"] >= least_effort_measured(kind)


def test_the_default_effort_probes_enough_lists_on_an_ivf_index(default_effort: int) -> None:
    """A collection given IVF_FLAT elsewhere (the index docs/scale.md recommends where build
    time counts) is searched with enough probes too."""
    sent = ann_search_params("IVF_FLAT", default_effort, limit=10)
    assert sent["nprobe"] >= least_effort_measured("IVF_FLAT")


def test_an_explicit_effort_is_sent_as_given() -> None:
    assert ann_search_params("HNSW", 40, limit=10) == {"ef": 40}
    assert ann_search_params("HNSW", 5, limit=50) == {"ef": 50}  # HNSW needs ef >= limit
    assert ann_search_params("IVF_SQ8", 40, limit=10) == {"nprobe": 20}
    assert ann_search_params("FLAT", 40, limit=10) == {}
