"""Filters on what a photo is (date taken, camera, type, orientation, size), applied by Milvus
inside the search, on Milvus Lite and on the 2.3 server alike.

The oracle is what the test itself wrote into the files: EXIF DateTimeOriginal, Make and Model
written with Pillow into JPEGs, mtimes set with ``os.utime`` on PNGs without EXIF, and the pixel
sizes drawn. Each filter must return exactly the files whose written values match, at the
boundaries too (the first and last second of a day).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_MODEL, draw_photo
from fastapi.testclient import TestClient
from PIL import Image

from pixfind.api import ImageIndex
from pixfind.cli import main
from pixfind.config import ModelSpec
from pixfind.filters import FilterError, Filters
from pixfind.pathkeys import key_of
from pixfind.store import CollectionInfo, Row, Store
from pixfind.web.app import create_app

HOSTILE_MAKE = '" or 1==1 or "'
HOSTILE_MODEL = "\x1b[31mEvil\x00Cam\u202e" + "x" * 300


@dataclass(frozen=True)
class Photo:
    """What the test writes into one file: the oracle of every filter."""

    name: str
    size: tuple[int, int]  # width, height as stored (no EXIF rotation here)
    taken: str | None = None  # EXIF DateTimeOriginal as written
    make: str = ""
    model: str = ""
    mtime: datetime | None = None  # local time set with os.utime

    @property
    def kind(self) -> str:
        return "png" if self.name.endswith(".png") else "jpeg"


PHOTOS = [
    Photo("a.jpg", (320, 240), "2024:05:01 00:00:00", "Canon", "Canon EOS 5D Mark II", datetime(2020, 1, 1, 12)),
    Photo("b.jpg", (240, 320), "2024:05:31 23:59:59", "NIKON CORPORATION", "NIKON D750"),
    Photo("c.jpg", (256, 256), "2024:06:01 00:00:00", "Google", "Pixel 7"),
    Photo("d.png", (320, 240), mtime=datetime(2023, 12, 31, 23, 59, 59)),
    Photo("e.png", (200, 300), mtime=datetime(2024, 5, 15, 12, 0, 0)),
    Photo("f.jpg", (320, 240), "2022:01:01 08:00:00", HOSTILE_MAKE, HOSTILE_MODEL),
    Photo("sub/g.jpg", (320, 240), "2024:05:10 09:30:00", "Canon", "Canon PowerShot G7 X"),
    Photo("h.jpg", (320, 240), "0000:00:00 00:00:00", "", "", datetime(2021, 3, 3, 3, 3, 3)),  # unset clock
]
ALL = {photo.name for photo in PHOTOS}


def write_photo(root: Path, photo: Photo, seed: int) -> Path:
    path = root / photo.name
    path.parent.mkdir(parents=True, exist_ok=True)
    image = draw_photo(seed, photo.size)
    if photo.kind == "png":
        image.save(path)
    else:
        exif = Image.Exif()
        if photo.make:
            exif[0x010F] = photo.make
        if photo.model:
            exif[0x0110] = photo.model
        if photo.taken:
            exif.get_ifd(0x8769)[0x9003] = photo.taken
        image.save(path, exif=exif, quality=90)
    if photo.mtime is not None:
        stamp = photo.mtime.timestamp()  # local time, as a camera-less file's date is read
        os.utime(path, (stamp, stamp))
    return path


def write_photos(root: Path, photos: list[Photo] = PHOTOS) -> None:
    for seed, photo in enumerate(photos):
        write_photo(root, photo, seed)


@dataclass
class Library:
    root: Path
    uri: str
    token: str | None
    collection: str

    def open(self, encoder: object, **kwargs: object) -> ImageIndex:
        return ImageIndex(
            uri=self.uri,
            token=self.token,
            collection=self.collection,
            model=ModelSpec(SMALL_MODEL, None),
            encoder=encoder,  # type: ignore[arg-type]
            **kwargs,  # type: ignore[arg-type]
        )


@pytest.fixture(scope="module", params=["lite", pytest.param("server", marks=pytest.mark.server)])
def library(request: pytest.FixtureRequest, small_encoder, tmp_path_factory) -> Iterator[Library]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("filters") / "photos"
    write_photos(root)
    if request.param == "lite":
        lib = Library(root, str(root.parent / "index.db"), None, "pixfind")
    else:
        server = request.getfixturevalue("milvus_server")
        lib = Library(root, server.uri, server.token, f"t_filters_{os.getpid()}")
    with lib.open(small_encoder) as idx:
        report = idx.add(root)
        assert report.failed == [] and report.new == len(PHOTOS)
    yield lib
    if request.param == "server":
        with contextlib.suppress(Exception), Store(lib.uri, lib.token, lib.collection) as store:
            store.drop()


def names(hits: list, root: Path) -> set[str]:  # type: ignore[type-arg]
    return {str(Path(hit.path).relative_to(root)) for hit in hits}


def found(idx: ImageIndex, root: Path, **filters: object) -> set[str]:
    return names(idx.search("a photo", limit=100, filters=Filters.of(**filters)), root)  # type: ignore[arg-type]


# -- what each filter returns --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"after": "2024-05-01"}, {"a.jpg", "b.jpg", "c.jpg", "e.png", "sub/g.jpg"}),  # a: 00:00:00 that day
        ({"before": "2024-05-31"}, ALL - {"c.jpg"}),  # b: 23:59:59 that day is in, c: 00:00:00 next day out
        ({"after": "2024-05-31", "before": "2024-05-31"}, {"b.jpg"}),
        ({"after": "2024-06-01"}, {"c.jpg"}),
        ({"before": "2023-12-31"}, {"d.png", "f.jpg", "h.jpg"}),  # d: mtime 23:59:59 on the day
        ({"after": "2024-01-01", "before": "2024-04-30"}, set()),
        ({"before": "2021-03-02"}, set()),  # h: a clock never set (0000:00:00) falls back to its mtime
        ({"after": "2021-03-03", "before": "2021-03-03"}, {"h.jpg"}),
        ({"after": "2020-01-01", "before": "2020-01-01"}, set()),  # a's mtime is not used: it has EXIF
        ({"camera": "canon"}, {"a.jpg", "sub/g.jpg"}),
        ({"camera": "CANON eos-5D"}, {"a.jpg"}),
        ({"camera": "eos 5d mark ii"}, {"a.jpg"}),
        ({"camera": "mark iii"}, set()),
        ({"camera": "nikon"}, {"b.jpg"}),
        ({"camera": "d75"}, {"b.jpg"}),  # the beginning of a word
        ({"camera": "750"}, set()),  # not the beginning of a word
        ({"camera": "pixel 7"}, {"c.jpg"}),
        ({"camera": "g7 x"}, {"sub/g.jpg"}),
        ({"types": "png"}, {"d.png", "e.png"}),
        ({"types": "jpg"}, ALL - {"d.png", "e.png"}),
        ({"types": ["png", "jpeg"]}, ALL),
        ({"types": "gif,webp"}, set()),
        ({"orientation": "portrait"}, {"b.jpg", "e.png"}),
        ({"orientation": "square"}, {"c.jpg"}),
        ({"orientation": "landscape"}, {"a.jpg", "d.png", "f.jpg", "sub/g.jpg", "h.jpg"}),
        ({"min_width": 300}, {"a.jpg", "d.png", "f.jpg", "sub/g.jpg", "h.jpg"}),
        ({"min_height": 300}, {"b.jpg", "e.png"}),
        ({"camera": "canon", "after": "2024-05-02"}, {"sub/g.jpg"}),
        ({"types": "png", "orientation": "landscape", "before": "2024-01-01"}, {"d.png"}),
    ],
)
def test_filters_return_exactly_the_photos_written_so(library: Library, small_encoder, filters, expected) -> None:  # type: ignore[no-untyped-def]
    with library.open(small_encoder, create=False) as idx:
        assert found(idx, library.root, **filters) == expected


def test_hostile_camera_text_neither_widens_the_filter_nor_breaks_it(library: Library, small_encoder) -> None:  # type: ignore[no-untyped-def]
    with library.open(small_encoder, create=False) as idx:
        # f.jpg's own make is this text: its words ("or", "1") find f.jpg and nothing else
        assert found(idx, library.root, camera=HOSTILE_MAKE) == {"f.jpg"}
        assert found(idx, library.root, camera='canon" or meta["type"] == "png') == set()
        assert found(idx, library.root, camera="canon') or (1==1") == set()
        assert found(idx, library.root, camera="cam") == {"f.jpg"}  # the words between the controls
        for text in ("%", "_", "\\", '"', "' '", "%%_%"):
            with pytest.raises(FilterError, match="--camera needs letters or digits"):
                Filters.of(camera=text)
        with pytest.raises(FilterError, match="too long"):
            Filters.of(camera="a" * 500)
        hit = next(h for h in idx.search("a photo", limit=100) if h.path.endswith("f.jpg"))
    assert hit.camera is not None and hit.camera.isprintable() and len(hit.camera) <= 130
    assert "\x1b" not in hit.camera and "\x00" not in hit.camera and HOSTILE_MAKE in hit.camera


def test_hits_say_when_where_from_and_what(library: Library, small_encoder) -> None:  # type: ignore[no-untyped-def]
    with library.open(small_encoder, create=False) as idx:
        hits = {Path(h.path).name: h.to_dict() for h in idx.search("a photo", limit=100)}
    assert {k: hits["a.jpg"][k] for k in ("taken", "taken_from", "camera", "type")} == {
        "taken": "2024-05-01T00:00:00",
        "taken_from": "exif",
        "camera": "Canon EOS 5D Mark II",
        "type": "jpeg",
    }
    assert hits["b.jpg"]["camera"] == "NIKON D750"  # the make is not said twice
    assert {k: hits["d.png"][k] for k in ("taken", "taken_from", "camera", "type")} == {
        "taken": "2023-12-31T23:59:59",
        "taken_from": "mtime",
        "camera": None,
        "type": "png",
    }
    assert (hits["h.jpg"]["taken"], hits["h.jpg"]["taken_from"]) == ("2021-03-03T03:03:03", "mtime")


def test_the_results_table_shows_the_day_taken_and_the_camera(library: Library, small_encoder) -> None:  # type: ignore[no-untyped-def]
    from io import StringIO

    from rich.console import Console

    from pixfind.render import hits_table

    with library.open(small_encoder, create=False) as idx:
        hits = idx.search("a photo", limit=100)
    shown = StringIO()
    Console(file=shown, width=200, color_system=None).print(hits_table(hits))
    lines = shown.getvalue().splitlines()
    assert lines[0].split() == ["#", "score", "size", "taken", "camera", "path"]
    rows = {str(Path(line.split()[-1]).relative_to(library.root)): line for line in lines[1:]}
    assert set(rows) == ALL and len(lines) == 1 + len(PHOTOS)  # one line a photo, hostile camera too
    assert re.search(r" 2024-05-01 +Canon EOS 5D Mark II +/", rows["a.jpg"])  # the camera's date, as is
    assert "(2023-12-31)" in rows["d.png"] and "(2021-03-03)" in rows["h.jpg"]  # the file's date
    assert "NIKON D750" in rows["b.jpg"]
    assert '" or 1==1 or " [31mEvil…' in rows["f.jpg"]  # stored cleaned, shown as text (not markup), cut
    assert "\x1b" not in shown.getvalue() and "\u202e" not in shown.getvalue()


def test_filters_apply_inside_the_search_with_under_k_min_score_and_terms(library: Library, small_encoder) -> None:  # type: ignore[no-untyped-def]
    root = library.root
    with library.open(small_encoder, create=False) as idx:
        canon = Filters.of(camera="canon")
        every = idx.search("a red car", limit=100)
        ranked = [Path(h.path).relative_to(root).as_posix() for h in every]
        best = [name for name in ranked if name in {"a.jpg", "sub/g.jpg"}]
        # k=1 is the best *matching* photo, whatever ranks above it unfiltered
        top = idx.search("a red car", limit=1, filters=canon)
        assert names(top, root) == {best[0]}
        assert names(idx.search("a red car", limit=10, under=str(root / "sub"), filters=canon), root) == {"sub/g.jpg"}
        scores = {Path(h.path).relative_to(root).as_posix(): h.score for h in every}
        cut = (scores["a.jpg"] + scores["sub/g.jpg"]) / 2
        expected = {name for name in ("a.jpg", "sub/g.jpg") if scores[name] >= cut}
        assert names(idx.search("a red car", limit=10, min_score=cut, filters=canon), root) == expected
        combined = idx.search("a red car - night", limit=10, filters=Filters.of(types="png"))
        assert names(combined, root) == {"d.png", "e.png"}
        like_a = idx.similar(str(root / "a.jpg"), limit=10, filters=canon)
        assert names(like_a, root) == {"sub/g.jpg"}  # a.jpg itself is never a hit
        by_image = idx.search_image(root / "c.jpg", limit=10, filters=Filters.of(orientation="square"))
        assert names(by_image, root) == {"c.jpg"}
        info = idx.info()
    assert info["images_with_facts"] == info["images"] == len(PHOTOS)


# -- the command line, the web API and a forwarded search ------------------------------------------


def test_bad_filters_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = str(tmp_path / "none.db")
    cases = [
        (["--after", "2024-13-01"], "--after '2024-13-01' is not a day: give one as YYYY-MM-DD"),
        (["--after", "2024-02-30"], "--after '2024-02-30' is not a day"),
        (["--before", "31/05/2024"], "--before '31/05/2024' is not a day: give one as YYYY-MM-DD"),
        (["--after", "2024-06-01", "--before", "2024-05-01"], "later than --before"),
        (["--type", "heic"], "--type 'heic' is not a type pixfind indexes"),
        (["--orientation", "wide"], "choose landscape, portrait or square"),
        (["--camera", "%"], "--camera needs letters or digits"),
        (["--min-width", "0"], "--min-width takes a number of pixels"),
        (["--after", "2024-05-01\x1b[31m"], "give one as YYYY-MM-DD"),
    ]
    for args, message in cases:
        assert main(["search", "a dog", "--uri", uri, *args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err and "\x1b" not in err, err
    assert not Path(uri).exists()  # refused before anything was opened


@pytest.mark.parametrize("library", ["lite"], indirect=True)  # forwarding exists for embedded indexes only
def test_cli_api_web_and_forwarded_searches_filter_alike(  # type: ignore[no-untyped-def]
    library: Library, small_encoder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_search_features import running_server

    root = library.root
    args = ["--camera", "canon", "--after", "2024-05-02", "-k", "5", "--json", "--uri", library.uri]
    assert main(["search", "a red car", *args]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert {Path(h["path"]).name for h in direct} == {"g.jpg"}
    assert direct[0]["camera"] == "Canon PowerShot G7 X" and direct[0]["taken"] == "2024-05-10T09:30:00"
    with library.open(small_encoder, create=False) as idx:
        client = TestClient(create_app(idx, tmp_path / "t"))
        with client:
            web = client.get("/api/search", params={"q": "a red car", "camera": "canon", "after": "2024-05-02"})
            typed = client.get("/api/search", params={"q": "a red car", "type": "png", "orientation": "portrait"})
            bad = client.get("/api/search", params={"q": "a red car", "after": "yesterday"})
            with (root / "c.jpg").open("rb") as upload:
                image = client.post(
                    "/api/search/image", params={"type": "jpeg"}, files={"file": ("c.jpg", upload, "image/jpeg")}
                )
            similar = client.get("/api/similar", params={"path": str(root / "a.jpg"), "camera": "canon"})
        with running_server(idx, library.uri, tmp_path / "thumbs"):
            assert main(["search", "a red car", *args]) == 0
            forwarded = json.loads(capsys.readouterr().out)
            assert (
                main(
                    [
                        "search",
                        "--image",
                        str(root / "b.jpg"),
                        "--orientation",
                        "portrait",
                        "--json",
                        "--uri",
                        library.uri,
                    ]
                )
                == 0
            )
            forwarded_image = json.loads(capsys.readouterr().out)
            assert main(["search", "a dog", "--after", "nope", "--uri", library.uri]) == 2
            assert "give one as YYYY-MM-DD" in capsys.readouterr().err
    assert web.status_code == 200 and web.json() == [
        {**h, "size": w["size"], "thumb": w["thumb"], "image": w["image"], "similar": w["similar"]}
        for h, w in zip(direct, web.json(), strict=True)
    ]
    assert {Path(h["path"]).name for h in typed.json()} == {"e.png"}
    assert bad.status_code == 400 and "give one as YYYY-MM-DD" in bad.json()["detail"]
    assert image.status_code == 200 and "d.png" not in {Path(h["path"]).name for h in image.json()}
    assert {Path(h["path"]).name for h in similar.json()} == {"g.jpg"}
    assert forwarded == direct
    assert {Path(h["path"]).name for h in forwarded_image} == {"b.jpg", "e.png"}


# -- old indexes ---------------------------------------------------------------------------------


class CountingEncoder:
    """The test model, counting its image batches: a backfill must embed nothing."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.image_batches = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        self.image_batches += 1
        return self.inner.encode_images(pixels)  # type: ignore[attr-defined]


def strip_facts(store: Store, keys: list[str]) -> None:
    """Rewrite rows as pixfind wrote them before the filters: the same record without the facts."""
    rows = store.records_of(keys)
    store.write(
        [
            Row(k, r["vector"], r["size"], r["mtime_ns"], r["width"], r["height"], r["fingerprint"], r.get("content"))
            for k, r in rows.items()
        ]
    )
    store.flush()


def test_an_old_index_gets_the_fields_on_the_next_run_without_re_embedding(  # type: ignore[no-untyped-def]
    backend, small_encoder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "photos"
    write_photos(root)
    lib = Library(root, backend.uri, backend.token, backend.collection)
    keys = [key_of(str(root / photo.name)) for photo in PHOTOS]
    with lib.open(small_encoder) as idx:
        assert idx.add(root).new == len(PHOTOS)
        strip_facts(idx.store, keys)
        before = {k: np.asarray(v, dtype=np.float32).tobytes() for k, v in idx.store.vectors_of(keys).items()}
        assert idx.rows_with_facts() == 0
        assert found(idx, root, after="2000-01-01") == set()  # rows without a date never match a date
        assert found(idx, root, min_width=1) == ALL  # the size was always recorded
    counting = CountingEncoder(small_encoder)
    with lib.open(counting) as idx:
        report = idx.add(root)
        assert (report.backfilled, report.unchanged, report.new, report.embedded) == (len(PHOTOS), len(PHOTOS), 0, 0)
        assert counting.image_batches == 0
        after = {k: np.asarray(v, dtype=np.float32).tobytes() for k, v in idx.store.vectors_of(keys).items()}
        assert after == before  # bit for bit
        assert idx.rows_with_facts() == len(PHOTOS)
        assert found(idx, root, camera="canon") == {"a.jpg", "sub/g.jpg"}
        assert found(idx, root, before="2023-12-31") == {"d.png", "f.jpg", "h.jpg"}
        assert idx.add(root).backfilled == 0  # done once
    assert counting.image_batches == 0


def test_the_summary_line_and_info_say_what_was_backfilled(  # type: ignore[no-untyped-def]
    small_encoder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "photos"
    write_photos(root, PHOTOS[:3])
    uri = str(tmp_path / "index.db")
    lib = Library(root, uri, None, "pixfind")
    with lib.open(small_encoder) as idx:
        idx.add(root)
        strip_facts(idx.store, [key_of(str(root / p.name)) for p in PHOTOS[:2]])
    assert main(["info", "--uri", uri]) == 0
    assert "1 images (2 without: pixfind index adds them)" in capsys.readouterr().out
    assert main(["search", "a dog", "--camera", "nikon", "--uri", uri]) == 0
    err = capsys.readouterr().err
    assert "no matches for --camera nikon" in err and "2 indexed images have no date, camera or type yet" in err
    assert main(["index", str(root), "--uri", uri]) == 0
    assert "3 unchanged (2 given dates and cameras)" in capsys.readouterr().err
    assert main(["info", "--uri", uri]) == 0
    assert "3 images" in capsys.readouterr().out


def test_a_schema_1_collection_refuses_filters_in_one_line(small_encoder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "photos"
    write_photos(root, PHOTOS[:3])
    uri = str(tmp_path / "old.db")
    with Store(uri) as store:
        store._create(CollectionInfo(small_encoder.spec, small_encoder.dim, schema=1))
    lib = Library(root, uri, None, "pixfind")
    with lib.open(small_encoder) as idx:
        assert idx.add(root).new == 3
        again = idx.add(root)
        assert (again.unchanged, again.backfilled) == (3, 0)  # no place for the fields: nothing to add
        assert len(idx.search("a photo", limit=10)) == 3  # unfiltered searches keep working
        with pytest.raises(FilterError, match=r"schema 1.*pixfind index --collection NEW") as refused:
            idx.search("a photo", filters=Filters.of(camera="canon"))
    assert "\n" not in str(refused.value)


def test_a_new_file_is_read_once_for_its_facts(small_encoder, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """New files take their facts from the bytes read for hashing and decoding: no second open."""
    from pixfind.ingest import content

    root = tmp_path / "photos"
    write_photos(root, PHOTOS[:3])
    opened: list[str] = []
    real = content.open_regular

    def counted(path: str):  # type: ignore[no-untyped-def]
        opened.append(path)
        return real(path)

    monkeypatch.setattr(content, "open_regular", counted)
    lib = Library(root, str(tmp_path / "index.db"), None, "pixfind")
    with lib.open(small_encoder) as idx:
        assert idx.add(root).new == 3
        assert found(idx, root, camera="pixel") == {"c.jpg"}
    assert sorted(opened) == sorted(str(root / p.name) for p in PHOTOS[:3])


def test_copied_photos_keep_their_own_date(small_encoder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A copy reuses the stored vector; its date is its own (a PNG's mtime), not the original's."""
    root = tmp_path / "photos"
    write_photos(root, [PHOTOS[3]])
    lib = Library(root, str(tmp_path / "index.db"), None, "pixfind")
    with lib.open(small_encoder) as idx:
        idx.add(root)
        shutil.copyfile(root / "d.png", root / "copy.png")
        stamp = datetime(2019, 7, 7, 7, 7, 7).timestamp()
        os.utime(root / "copy.png", (stamp, stamp))
        report = idx.add(root)
        assert (report.copied, report.embedded) == (1, 0)
        assert found(idx, root, before="2019-12-31") == {"copy.png"}


def test_a_backfill_reads_headers_only_png_included(small_encoder, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Pillow finds a PNG's EXIF by decoding every pixel unless told not to look: a backfill of
    an old index must decode nothing (PNGs, whose dates come from their mtimes, included)."""
    from PIL import JpegImagePlugin, PngImagePlugin

    root = tmp_path / "photos"
    write_photos(root, [PHOTOS[0], PHOTOS[3], PHOTOS[4]])
    lib = Library(root, str(tmp_path / "index.db"), None, "pixfind")
    keys = [key_of(str(root / p.name)) for p in (PHOTOS[0], PHOTOS[3], PHOTOS[4])]
    with lib.open(small_encoder) as idx:
        idx.add(root)
        strip_facts(idx.store, keys)
        decoded: list[str] = []
        for plugin in (PngImagePlugin.PngImageFile, JpegImagePlugin.JpegImageFile):
            real = plugin.load

            def counted(self, real=real):  # type: ignore[no-untyped-def]
                decoded.append(self.format)
                return real(self)

            monkeypatch.setattr(plugin, "load", counted)
        assert idx.add(root).backfilled == 3
        assert decoded == []
        assert found(idx, root, before="2023-12-31") == {"d.png"}
        assert found(idx, root, types="png", orientation="portrait") == {"e.png"}


def test_an_export_carries_the_date_camera_and_type(library: Library, small_encoder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import pyarrow.parquet as pq

    with library.open(small_encoder, create=False) as idx:
        report = idx.export(tmp_path / "out.parquet")
    assert report.rows == len(PHOTOS)
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    rows = {str(Path(row["path"]).relative_to(library.root)): row for row in table}
    for photo in PHOTOS:
        row = rows[photo.name]
        exif = photo.taken and not photo.taken.startswith("0000")
        expected = datetime.strptime(photo.taken, "%Y:%m:%d %H:%M:%S") if exif else photo.mtime
        if expected is not None:
            assert row["taken"] == expected, photo.name
        assert (row["taken_from"], row["type"]) == ("exif" if exif else "mtime", photo.kind)
        assert (
            row["orientation"]
            == {1: "landscape", 0: "square", -1: "portrait"}[
                (photo.size[0] > photo.size[1]) - (photo.size[0] < photo.size[1])
            ]
        )
    assert rows["a.jpg"]["camera"] == "Canon EOS 5D Mark II" and rows["d.png"]["camera"] is None


def test_the_ray_stages_carry_the_facts_from_decode_to_the_row(tmp_path: Path) -> None:
    """The columns the Ray stages pass along (tests/test_ray_index.py runs them on a cluster)."""
    from pixfind.ingest.ray_stages import decode_rows, outcome_of
    from pixfind.pathkeys import path_of

    root = tmp_path / "photos"
    write_photos(root, [PHOTOS[0], PHOTOS[3]])
    paths = [root / "a.jpg", root / "d.png"]
    batch = {
        "path": np.array([str(p) for p in paths], dtype=object),
        "key": np.array([key_of(str(p)) for p in paths], dtype=object),
        "size": np.array([p.stat().st_size for p in paths]),
        "mtime_ns": np.array([p.stat().st_mtime_ns for p in paths]),
        "is_update": np.array([False, False]),
    }
    decoded = decode_rows(batch, 32, None)
    decoded.pop("pixels")
    decoded["vector"] = np.full((2, 4), 0.5, dtype=np.float32)  # what the embed actor adds
    facts = {Path(path_of(row.key)).name: row.facts or {} for row in outcome_of(decoded).rows}
    assert (facts["a.jpg"]["camera"], facts["a.jpg"]["taken_from"], facts["a.jpg"]["type"]) == (
        "Canon EOS 5D Mark II",
        "exif",
        "jpeg",
    )
    assert (facts["d.png"]["taken_from"], facts["d.png"]["type"], facts["d.png"]["orientation"]) == (
        "mtime",
        "png",
        "landscape",
    )


def test_camera_text_is_cleaned_before_it_is_stored() -> None:
    from pixfind.ingest.facts import _clean, camera_name, camera_terms, header_of

    image = draw_photo(1, (64, 48))
    exif = Image.Exif()
    exif[0x010F] = b"Can\xffon\x80\x1b[2J"  # Pillow reads EXIF text as Latin-1: C1 and ESC controls
    exif[0x0110] = "Mod\udcffel " + "9" * 500
    exif.get_ifd(0x8769)[0x9003] = "2024:02:30 10:00:00"  # no such day
    data = io.BytesIO()
    image.save(data, "JPEG", exif=exif)
    with Image.open(io.BytesIO(data.getvalue())) as opened:
        header = header_of(opened)
    assert header.taken is None
    name = camera_name(header.make, header.model)
    assert name.isprintable() and len(name) <= 129 and "\udcff" not in name and "\x1b" not in name
    name.encode("utf-8")  # storable
    assert all(term.isalnum() and len(term) <= 24 for term in camera_terms(name))
    # text that reaches the cleaning with a lone surrogate (an EXIF reader other than Pillow's)
    assert camera_name(_clean("Mod\udcffel"), "") == "Mod?el"


def test_a_backfill_killed_inside_its_write_loses_nothing_and_the_next_run_ends_it(
    small_encoder, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL (pixfind and its Milvus Lite engine) once Milvus acknowledged the first request of
    the backfill's write: every row is still there with its vector, bit for bit; the next run
    adds the fields to the rest, embedding nothing."""
    import re
    import signal

    from test_crash import run_at

    root = tmp_path / "photos"
    write_photos(root)
    lib = Library(root, str(tmp_path / "index.db"), None, "pixfind")
    keys = [key_of(str(root / photo.name)) for photo in PHOTOS]
    with lib.open(small_encoder) as idx:
        idx.add(root)
        strip_facts(idx.store, keys)
        before = {k: np.asarray(v, dtype=np.float32).tobytes() for k, v in idx.store.vectors_of(keys).items()}
    killed = run_at("upsert", 1, "killall", root, lib.uri, write_every=4, rows_per_call=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done = re.search(r"killed inside Store\.write: (\d+) of (\d+) rows acknowledged", killed.stderr)
    assert done is not None and int(done.group(2)) == len(PHOTOS), killed.stderr
    acknowledged = int(done.group(1))
    counting = CountingEncoder(small_encoder)
    with lib.open(counting) as idx:
        kept = {k: np.asarray(v, dtype=np.float32).tobytes() for k, v in idx.store.vectors_of(keys).items()}
        assert kept == before  # nothing lost, nothing changed
        assert idx.rows_with_facts() == acknowledged
        report = idx.add(root)
        assert (report.backfilled, report.embedded, counting.image_batches) == (len(PHOTOS) - acknowledged, 0, 0)
        after = {k: np.asarray(v, dtype=np.float32).tobytes() for k, v in idx.store.vectors_of(keys).items()}
        assert after == before and idx.rows_with_facts() == len(PHOTOS)
