from __future__ import annotations

import os

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


def test_filters_are_safe_expressions() -> None:
    expr = folder_prefix_filter('/a/b_c%"d')
    assert expr == 'path like "/a/b^5Fc^25^22d/%"'
    assert keys_filter([key_of("/x/'y'")]) == 'path in ["/x/^27y^27"]'
