"""Combined queries, the score cut-off, "more like this" without the file itself, and exact copies
shown once: in the Python API, the command line (direct and through a running server) and the
web API alike.

The oracle is the model's own vectors: the text tower's rows for the words, the image tower's
row for a picture decoded here with Pillow, and the vectors the index stored. A combined query
must rank as ``unit(sum of + rows - sum of - rows)`` against the stored vectors says, whatever
pixfind computes in between.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_MODEL, draw_photo
from fastapi.testclient import TestClient
from PIL import Image

from pixfind.api import ImageIndex
from pixfind.cli import main
from pixfind.config import ModelSpec
from pixfind.errors import PixfindError
from pixfind.pathkeys import key_of
from pixfind.query import Term, check_terms, parse_query, query_vector
from pixfind.web.app import create_app

README = Path(__file__).resolve().parent.parent / "README.md"
#: Files under many/ that hold exactly the content of lib/p5.jpg.
MANY = 40


@pytest.fixture(scope="module")
def library(small_encoder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """An index of lib/p0..p5 (distinct), lib/copies/{a,b}.jpg (exact copies of p0) and
    many/ (MANY exact copies of p5); returns its URI and the root folder."""
    root = tmp_path_factory.mktemp("search-features")
    lib = root / "lib"
    (lib / "copies").mkdir(parents=True)
    for seed in range(6):
        draw_photo(seed).save(lib / f"p{seed}.jpg", quality=90)
    for name in ("a", "b"):
        shutil.copyfile(lib / "p0.jpg", lib / "copies" / f"{name}.jpg")
    (root / "many").mkdir()
    for number in range(MANY):
        shutil.copyfile(lib / "p5.jpg", root / "many" / f"copy {number:02d}.jpg")
    uri = str(root / "index.db")
    with opened(uri, small_encoder, create=True) as idx:
        report = idx.add(root)
        assert report.failed == [] and report.new + report.copied == 8 + MANY
    yield uri, root


@contextlib.contextmanager
def opened(uri: str, encoder: object, create: bool = False) -> Iterator[ImageIndex]:
    idx = ImageIndex(uri=uri, model=ModelSpec(SMALL_MODEL, None), encoder=encoder, create=create)  # type: ignore[arg-type]
    try:
        yield idx
    finally:
        idx.close()


# -- the oracle ---------------------------------------------------------------------------------


def text_row(encoder, text: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(encoder.encode_texts([text])[0], dtype=np.float64)


def image_row(encoder, path: Path) -> np.ndarray:  # type: ignore[no-untyped-def]
    with Image.open(path) as image:
        pixels = encoder.preprocess(image.convert("RGB"))
    return np.asarray(encoder.encode_images(pixels[None])[0], dtype=np.float64)


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def stored_scores(idx: ImageIndex, root: Path, query: np.ndarray, folder: str = "lib") -> dict[str, float]:
    """Every indexed file under ``root/folder`` and its cosine with ``query``, from the stored vectors."""
    paths = [str(p) for p in sorted((root / folder).rglob("*.jpg"))]
    vectors = idx.store.vectors_of([key_of(p) for p in paths])
    return {path: float(np.asarray(vectors[key_of(path)], dtype=np.float64) @ query) for path in paths}


def assert_ranked_as(hits: list, expected: dict[str, float], tolerance: float = 2e-4) -> None:  # type: ignore[type-arg]
    """``hits`` are ``expected``'s files in its order (ties aside), with its scores."""
    assert [hit.rank for hit in hits] == list(range(1, len(hits) + 1))
    for hit in hits:
        assert math.isclose(hit.score, expected[hit.path], abs_tol=tolerance), (hit.path, hit.score, expected)
    ordered = sorted(expected.values(), reverse=True)[: len(hits)]
    assert [round(hit.score, 3) for hit in hits] == pytest.approx([round(s, 3) for s in ordered], abs=2e-3)


# -- parsing ------------------------------------------------------------------------------------


def test_terms_are_split_on_spaced_operators_only(tmp_path: Path) -> None:
    image = tmp_path / "beach.jpg"
    draw_photo(1).save(image)
    terms = parse_query(f"sunset + {image} - people + spider-man - a-b")
    assert [(t.sign, t.text, t.image) for t in terms] == [
        (1, "sunset", None),
        (1, None, str(image)),
        (-1, "people", None),
        (1, "spider-man", None),
        (-1, "a-b", None),
    ]
    assert [(t.sign, t.text) for t in parse_query("2010 - 2020 + x", combine=False)] == [(1, "2010 - 2020 + x")]
    with pytest.raises(PixfindError, match="empty term"):
        parse_query("a +  + b")
    with pytest.raises(PixfindError, match=r"query image not found: \./nope\.jpg .*--no-combine"):
        parse_query("cat + ./nope.jpg")
    documented = re.search(r"\| terms in one combined query [^|]*\| (\d+) \|", README.read_text(encoding="utf-8"))
    assert documented, "the README's Limits table states the most terms in one query"
    most = int(documented.group(1))
    assert len(check_terms([Term(text="x")] * most)) == most
    with pytest.raises(PixfindError, match="too many terms"):
        check_terms([Term(text="x")] * (most + 1))
    with pytest.raises(PixfindError, match="query too long"):
        check_terms([Term(text="x" * 600), Term(text="y" * 600, sign=-1)])


# -- combined queries ---------------------------------------------------------------------------


def test_text_plus_image_minus_text_ranks_as_the_models_own_vectors_say(library, small_encoder) -> None:
    uri, root = library
    lib = root / "lib"
    expected_vector = unit(
        text_row(small_encoder, "a red car")
        + image_row(small_encoder, lib / "p3.jpg")
        - text_row(small_encoder, "night")
    )
    with opened(uri, small_encoder) as idx:
        expected = stored_scores(idx, root, expected_vector)
        hits = idx.search(f"a red car + {lib / 'p3.jpg'} - night", limit=8, under=str(lib), all_copies=True)
        plain_image = stored_scores(idx, root, unit(image_row(small_encoder, lib / "p3.jpg")))
        vector = query_vector(parse_query(f"a red car + {lib / 'p3.jpg'} - night"), lambda: small_encoder, idx.store)
    assert vector.dtype == np.float32 and np.allclose(vector, expected_vector, atol=2e-5)  # a unit vector again
    assert len(hits) == 8
    assert_ranked_as(hits, expected)
    assert max(abs(hit.score - plain_image[hit.path]) for hit in hits) > 0.01  # the words counted


def test_minus_terms_and_relative_image_paths(library, small_encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    uri, root = library
    lib = root / "lib"
    monkeypatch.chdir(lib)
    expected_vector = unit(image_row(small_encoder, lib / "p2.jpg") - image_row(small_encoder, lib / "p4.jpg"))
    with opened(uri, small_encoder) as idx:
        expected = stored_scores(idx, root, expected_vector)
        hits = idx.search("./p2.jpg - ../lib/p4.jpg", limit=8, under=str(lib), all_copies=True)
        subtracted = idx.search_image(lib / "p2.jpg", limit=8, under=str(lib), all_copies=True, subtract=["./p4.jpg"])
    assert_ranked_as(hits, expected)
    assert [(h.path, round(h.score, 5)) for h in subtracted] == [(h.path, round(h.score, 5)) for h in hits]
    assert hits[0].path == str(lib / "p2.jpg") and hits[-1].path == str(lib / "p4.jpg")


def test_a_literal_minus_is_searched_as_written(library, small_encoder, capsys: pytest.CaptureFixture[str]) -> None:
    uri, root = library
    literal = unit(text_row(small_encoder, "spider - man"))
    combined = unit(text_row(small_encoder, "spider") - text_row(small_encoder, "man"))
    with opened(uri, small_encoder) as idx:
        as_written = idx.search("spider - man", limit=8, under=str(root / "lib"), all_copies=True, combine=False)
        as_terms = idx.search("spider - man", limit=8, under=str(root / "lib"), all_copies=True)
        assert_ranked_as(as_written, stored_scores(idx, root, literal))
        assert_ranked_as(as_terms, stored_scores(idx, root, combined))
    where = ["--under", str(root / "lib"), "--json", "--uri", uri]
    code = main(["search", "spider - man", "--no-combine", "--all", "-k", "8", *where])
    out = capsys.readouterr().out
    assert code == 0
    assert [(h["path"], h["score"]) for h in json.loads(out)] == [(h.path, round(h.score, 6)) for h in as_written]


# -- the score cut-off --------------------------------------------------------------------------


def test_min_score_cuts_at_the_cosine_and_combines_with_k(library, small_encoder) -> None:
    uri, root = library
    query = unit(text_row(small_encoder, "a quiet lake"))
    with opened(uri, small_encoder) as idx:
        scores = sorted(stored_scores(idx, root, query).values(), reverse=True)
        cut = (scores[3] + scores[4]) / 2  # between the 4th and the 5th file of lib/ (copies included)
        above = idx.search("a quiet lake", limit=20, under=str(root / "lib"), all_copies=True, min_score=cut)
        assert [round(h.score, 4) for h in above] == [round(s, 4) for s in scores[:4]]
        assert all(h.score >= cut for h in above)
        two = idx.search("a quiet lake", limit=2, under=str(root / "lib"), all_copies=True, min_score=cut)
        assert [h.path for h in two] == [h.path for h in above[:2]]
        assert idx.search("a quiet lake", limit=5, min_score=1.0) == []
        for bad in (1.5, -1.01, float("nan")):
            with pytest.raises(PixfindError, match="between -1 and 1"):
                idx.search("a quiet lake", min_score=bad)


def test_min_score_on_the_command_line(library, capsys: pytest.CaptureFixture[str]) -> None:
    uri, root = library
    code = main(["search", "a quiet lake", "--min-score", "1.5", "--uri", uri])
    err = capsys.readouterr().err
    assert code != 0 and err.strip().splitlines() == [
        "pixfind: error: minimum score must be a cosine between -1 and 1, got 1.5"
    ]
    code = main(["search", "a quiet lake", "--min-score", "0.9999", "--uri", uri, "--under", str(root / "lib")])
    captured = capsys.readouterr()
    assert code == 0 and captured.out == ""
    assert "no matches scoring 0.9999 or more (a lower --min-score shows more)" in captured.err


# -- more like this, and exact copies -----------------------------------------------------------


def test_similar_never_returns_the_file_itself(library, small_encoder) -> None:
    uri, root = library
    lib = root / "lib"
    with opened(uri, small_encoder) as idx:
        hits = idx.similar(str(lib / "p1.jpg"), limit=20, under=str(lib), all_copies=True)
        assert sorted(h.path for h in hits) == sorted(str(p) for p in lib.rglob("*.jpg") if p.name != "p1.jpg")
        own = np.asarray(idx.store.vectors_of([key_of(str(lib / "p1.jpg"))])[key_of(str(lib / "p1.jpg"))])
        others = stored_scores(idx, root, own / np.linalg.norm(own))
        del others[str(lib / "p1.jpg")]
        assert_ranked_as(hits, others)
        # its exact copies elsewhere are not "itself": p0's two copies come first, as one hit
        like_p0 = idx.similar(str(lib / "p0.jpg"), limit=3, under=str(lib))
        assert like_p0[0].score > 0.9999 and like_p0[0].copies == 2
        assert {like_p0[0].path, *like_p0[0].copy_paths} == {
            str(lib / "copies" / "a.jpg"),
            str(lib / "copies" / "b.jpg"),
        }
        assert str(lib / "p0.jpg") not in [h.path for h in like_p0]
        # named another way (relative, through a link), it is still left out
        link = root / "link-to-lib"
        link.symlink_to(lib)
        hits = idx.similar(str(link / "p1.jpg"), limit=20, under=str(lib), all_copies=True)
        assert str(lib / "p1.jpg") not in [h.path for h in hits]


def test_exact_copies_are_one_hit_unless_all(library, small_encoder) -> None:
    uri, root = library
    lib = root / "lib"
    copies_of_p0 = sorted([str(lib / "p0.jpg"), str(lib / "copies" / "a.jpg"), str(lib / "copies" / "b.jpg")])
    with opened(uri, small_encoder) as idx:
        every = idx.search("a white dog", limit=20, under=str(lib), all_copies=True)
        collapsed = idx.search("a white dog", limit=20, under=str(lib))
        scores = stored_scores(idx, root, unit(text_row(small_encoder, "a white dog")))
    assert len(every) == 8 and len(collapsed) == 6
    assert all(h.copies == 1 and h.copy_paths == () for h in every)
    (group,) = [h for h in collapsed if h.copies > 1]
    assert group.copies == 3 and sorted([group.path, *group.copy_paths]) == copies_of_p0
    assert group.path == min(copies_of_p0, key=lambda path: (-scores[path], path))  # the best (ties: by path)
    assert sum(h.copies for h in collapsed) == len(every)
    assert [h.rank for h in collapsed] == list(range(1, 7))
    shown = [h.path for h in every if h.path not in copies_of_p0 or h.path == group.path]
    assert [h.path for h in collapsed] == shown  # the same order, each content once


def test_k_is_filled_after_collapsing_many_copies(library, small_encoder) -> None:
    uri, root = library
    with opened(uri, small_encoder) as idx:
        hits = idx.search_image(root / "lib" / "p5.jpg", limit=3)
        every = idx.search_image(root / "lib" / "p5.jpg", limit=3, all_copies=True)
    assert len(hits) == 3 and len({h.path for h in hits}) == 3
    assert hits[0].copies == MANY + 1 and hits[0].score > 0.9999  # lib/p5.jpg and its 40 copies in many/
    assert not any(h.path.startswith(str(root / "many")) or h.path == str(root / "lib" / "p5.jpg") for h in hits[1:])
    assert [h.score for h in every] == pytest.approx([hits[0].score] * 3, abs=1e-5)  # --all: copies fill k


# -- one answer everywhere ------------------------------------------------------------------------


@contextlib.contextmanager
def running_server(idx: ImageIndex, uri: str, thumbs: Path) -> Iterator[str]:
    """The web app over ``idx`` on a free loopback port, announced beside ``uri`` as ``pixfind
    serve`` announces itself, so ``pixfind search`` forwards to it."""
    import uvicorn

    from pixfind.remote import announced
    from pixfind.web.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    server = uvicorn.Server(uvicorn.Config(create_app(idx, thumbs), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        with announced(uri, url, "pixfind"):
            yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def test_cli_api_web_and_a_forwarded_search_agree(
    library, small_encoder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri, root = library
    lib = root / "lib"
    query = f"a red car + {lib / 'p3.jpg'} - night"
    options = ["-k", "5", "--min-score", "0.2", "--json", "--uri", uri]

    assert main(["search", query, *options]) == 0
    direct = json.loads(capsys.readouterr().out)
    with opened(uri, small_encoder) as idx:
        api = [h.to_dict() for h in idx.search(query, limit=5, min_score=0.2)]
        client = TestClient(create_app(idx, tmp_path / "t"))
        with client, (lib / "p3.jpg").open("rb") as upload:
            terms = [{"sign": 1, "text": "a red car"}, {"sign": 1, "image": 0}, {"sign": -1, "text": "night"}]
            response = client.post(
                "/api/search/terms",
                params={"k": 5, "min_score": 0.2},
                data={"terms": json.dumps(terms)},
                files=[("file", ("p3.jpg", upload, "image/jpeg"))],
            )
            assert response.status_code == 200, response.text
            web = response.json()
            words = client.get("/api/search", params={"q": "a red car - night", "k": 5, "all": "true"}).json()
            not_field = client.get("/api/search", params={"q": "a red car", "not": "night", "k": 5, "all": "true"})
            api_words = [h.to_dict() for h in idx.search("a red car", limit=5, all_copies=True, subtract=["night"])]
            minus_image = f"a red car - {lib / 'p4.jpg'}"
            api_minus = [h.to_dict() for h in idx.search(minus_image, limit=4, under=str(lib), all_copies=True)]
            refused = client.get("/api/search", params={"q": f"a red car + {lib / 'p3.jpg'}"})
            bad = client.get("/api/search", params={"q": "a red car", "min_score": "2"})
        with running_server(idx, uri, tmp_path / "thumbs"):
            assert main(["search", query, *options]) == 0
            forwarded = json.loads(capsys.readouterr().out)
            assert main(["search", "--similar", str(lib / "p0.jpg"), "-k", "3", "--json", "--uri", uri]) == 0
            similar = json.loads(capsys.readouterr().out)
            assert main(["search", "a red car - night", "--all", "-k", "5", "--json", "--uri", uri]) == 0
            forwarded_words = json.loads(capsys.readouterr().out)
            assert main(["search", minus_image, "--all", "-k", "4", "--under", str(lib), "--json", "--uri", uri]) == 0
            forwarded_minus = json.loads(capsys.readouterr().out)

    def shown(hits: list[dict]) -> list[tuple]:  # type: ignore[type-arg]
        return [(h["path"], round(h["score"], 4), h["copies"], list(h["copy_paths"])) for h in hits]

    assert len(direct) >= 2 and all(h["score"] >= 0.2 for h in direct)
    assert shown(direct) == shown(api) == shown(web) == shown(forwarded)
    assert shown(words) == shown(forwarded_words) == shown(not_field.json()) == shown(api_words)
    assert shown(forwarded_minus) == shown(api_minus)
    assert refused.status_code == 400 and "upload the image" in refused.json()["detail"]
    assert bad.status_code == 400 and "between -1 and 1" in bad.json()["detail"]
    assert str(lib / "p0.jpg") not in [h["path"] for h in similar]
    assert {similar[0]["path"], *similar[0]["copy_paths"]} == {str(lib / "copies" / n) for n in ("a.jpg", "b.jpg")}
