from __future__ import annotations

import os
import re

from hypothesis import given
from hypothesis import strategies as st

from pixfind.pathkeys import folder_prefix_filter, key_of, keys_filter, path_of

HOSTILE = [
    "/photos/it's here.jpg",
    '/photos/say "cheese".jpg',
    "/photos/back\\slash.jpg",
    "/photos/100% sure_thing.jpg",
    "/photos/new\nline.jpg",
    "/photos/emoji 🐶.jpg",
    "/photos/" + os.fsdecode(b"latin1-\xe9t\xe9.jpg"),
    "/photos/caret^5F.jpg",
    "/photos/ünïcödé/日本.png",
]


def test_round_trip_of_hostile_names() -> None:
    for path in HOSTILE:
        assert path_of(key_of(path)) == path


def test_ordinary_paths_are_stored_verbatim() -> None:
    assert key_of("/home/ann/Pictures/Holiday 2024/DSC 0001.JPG") == "/home/ann/Pictures/Holiday 2024/DSC 0001.JPG"
    assert key_of("/home/ann/Bilder/Grüße.png") == "/home/ann/Bilder/Grüße.png"


def test_keys_hold_no_expression_or_wildcard_characters() -> None:
    for path in HOSTILE:
        key = key_of(path)
        assert not set(key) & set("'\"\\%_\n")
        key.encode("utf-8")  # valid UTF-8 for a VARCHAR


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=60))
def test_round_trip_property(name: str) -> None:
    path = "/root/" + name
    assert path_of(key_of(path)) == path


@given(st.binary(max_size=40))
def test_round_trip_of_arbitrary_bytes(raw: bytes) -> None:
    path = os.fsdecode(b"/r/" + raw.replace(b"\x00", b""))
    assert path_of(key_of(path)) == path


def _literals(expr: str) -> list[str]:
    """The string literals of a filter expression (a literal cannot hold a quote: see below)."""
    return re.findall(r'"([^"]*)"', expr)


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00/"), min_size=1, max_size=30))
def test_folder_filter_is_one_literal_prefix_of_that_folder_only(name: str) -> None:
    """Whatever the folder's name: the expression is ``path like "<literal>"`` whose only
    wildcard is the final ``%``, and whose literal decodes to the folder followed by ``/``
    (that it matches the right rows in Milvus is checked in test_store_server.py)."""
    folder = "/photos/" + name
    expr = folder_prefix_filter(folder)
    (literal,) = _literals(expr)
    assert expr == f'path like "{literal}"'
    assert literal.endswith("%") and not set(literal[:-1]) & set("%_\"\\'")
    assert path_of(literal[:-1]) == folder.rstrip("/") + "/"


@given(st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20), max_size=5))
def test_keys_filter_names_exactly_those_keys(names: list[str]) -> None:
    paths = ["/x/" + name for name in names]
    expr = keys_filter([key_of(p) for p in paths])
    assert expr.startswith("path in [") and expr.endswith("]")
    assert [path_of(literal) for literal in _literals(expr)] == paths
