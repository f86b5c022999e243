"""``pixfind duplicates`` / ``ImageIndex.duplicates``: near-identical images form one group,
unrelated ones none, on pictures the tests draw and derive (resized, re-encoded, cropped, copied).

The tests run with random weights (ViT-S-32, see conftest), under which every drawn picture sits
in a narrow cone: measured on 40 drawn pictures, unrelated ones reach a cosine of 0.9962, while
a picture's half-size copy, quality-50 JPEG and 2%-a-side crop stay at or above 0.9984 (5
pictures). So these tests pass ``threshold=THRESHOLD`` (0.998), between the two; the default
threshold (0.95) is for trained weights and would group every drawn picture here. What the tests
check is the grouping (batched search, union-find, ``--under``, output), not that CLIP tells
duplicates apart, which random weights cannot show.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env, draw_photo
from docs_figures import find
from PIL import Image

THRESHOLD = 0.998


def derive_copies(original: Path, folder: Path, stem: str) -> list[Path]:
    """``original`` and its resized, re-encoded, slightly cropped and byte-for-byte copies."""
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(original) as img:
        picture = img.convert("RGB")
    width, height = picture.size
    made = [
        folder / f"{stem}_half.jpg",
        folder / f"{stem}_q50.jpg",
        folder / f"{stem}_crop.jpg",
        folder / f"{stem}_copy.jpg",
    ]
    picture.resize((width // 2, height // 2), Image.Resampling.LANCZOS).save(made[0], quality=90)
    picture.save(made[1], quality=50)
    dx, dy = width // 50, height // 50  # 2% off each side
    picture.crop((dx, dy, width - dx, height - dy)).save(made[2], quality=90)
    shutil.copyfile(original, made[3])
    return [original, *made]


def drawn(folder: Path, name: str, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    draw_photo(seed, (640, 480)).save(path, quality=90)
    return path


@pytest.fixture
def library(tmp_path: Path) -> dict[str, list[Path]]:
    """One picture with four derived copies, and three unrelated pictures."""
    pics = tmp_path / "pics"
    original = drawn(pics, "beach.jpg", seed=11)
    return {
        "copies": derive_copies(original, pics, "beach"),
        "unrelated": [drawn(pics, f"other_{seed}.jpg", seed) for seed in (1, 2, 3)],
    }


def paths_of(groups) -> list[set[str]]:  # type: ignore[no-untyped-def]
    return [{f.path for f in group.files} for group in groups]


def test_a_picture_and_its_copies_form_one_group(index_factory, library, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory()
    idx.add(tmp_path / "pics")
    groups = idx.duplicates(threshold=THRESHOLD)
    assert paths_of(groups) == [{str(p) for p in library["copies"]}]
    group = groups[0]
    assert not group.exact  # resized and re-encoded copies have other bytes
    assert group.similarity >= THRESHOLD
    first = group.files[0]  # the largest in pixels first: the original or its byte copy
    assert (first.width, first.height) == (640, 480)
    by_name = {Path(f.path).name: f for f in group.files}
    assert (by_name["beach_half.jpg"].width, by_name["beach_half.jpg"].height) == (320, 240)
    assert by_name["beach_copy.jpg"].size == library["copies"][0].stat().st_size
    assert group.reclaimable == sum(f.size for f in group.files) - first.size


def test_groups_are_joined_across_search_batches(index_factory, library, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Batches of two stored vectors, each asking for its 2 nearest (itself and one other): no
    single search sees the whole group of five, which is joined through the pairs of every batch."""
    import pixfind.duplicates as duplicates

    monkeypatch.setattr(duplicates, "SEARCH_BATCH", 2)
    monkeypatch.setattr(duplicates, "NEIGHBOURS", 2)
    idx = index_factory()
    idx.add(tmp_path / "pics")
    assert paths_of(idx.duplicates(threshold=THRESHOLD)) == [{str(p) for p in library["copies"]}]


def test_under_restricts_both_sides_of_a_pair(index_factory, library, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A picture whose only copy is outside --under is in no group; a group inside it is kept."""
    elsewhere = tmp_path / "elsewhere"
    lonely = drawn(elsewhere, "lonely.jpg", seed=21)
    shutil.copyfile(lonely, tmp_path / "pics" / "lonely_copy.jpg")
    lake = derive_copies(drawn(elsewhere, "lake.jpg", seed=31), elsewhere, "lake")
    idx = index_factory()
    idx.add(tmp_path / "pics", elsewhere)
    everything = paths_of(idx.duplicates(threshold=THRESHOLD))
    assert {str(lonely), str(tmp_path / "pics" / "lonely_copy.jpg")} in everything
    inside = paths_of(idx.duplicates(threshold=THRESHOLD, under=str(tmp_path / "pics")))
    assert inside == [{str(p) for p in library["copies"]}]
    assert paths_of(idx.duplicates(threshold=THRESHOLD, under=str(elsewhere))) == [{str(p) for p in lake}]


def test_cli_prints_hostile_names_escaped_and_json_exactly(index_factory, tmp_path: Path, lite_uri: str) -> None:  # type: ignore[no-untyped-def]
    pics = tmp_path / "pics"
    original = drawn(pics, "plain.jpg", seed=41)
    hostile = pics / "evil\x1b]52;c;aGk=\x07\nname\u202e.jpg"
    shutil.copyfile(original, hostile)
    drawn(pics, "other.jpg", seed=42)
    with index_factory() as idx:  # closed before the CLI opens the Lite file
        idx.add(pics)
    table = _cli("duplicates", "--threshold", str(THRESHOLD), "--uri", lite_uri)
    assert table.returncode == 0, table.stderr
    assert "\x1b" not in table.stdout and "\u202e" not in table.stdout and "\x07" not in table.stdout
    assert "evil\\x1b]52;c;aGk=\\x07\\nname\\u202e.jpg" in table.stdout
    assert "plain.jpg" in table.stdout and "other.jpg" not in table.stdout
    assert table.stdout.count("(same bytes as one above)") == 1  # one of the two, whichever is listed second
    assert "1 group of duplicates (2 images;" in table.stderr
    listed = _cli("duplicates", "--threshold", str(THRESHOLD), "--uri", lite_uri, "--json")
    data = json.loads(listed.stdout)
    assert data["threshold"] == THRESHOLD
    assert [sorted(f["path"] for f in g["files"]) for g in data["groups"]] == [sorted([str(hostile), str(original)])]
    assert data["groups"][0]["exact_copies"] is True


def test_the_default_threshold_is_the_documented_one(index_factory, library, tmp_path: Path, lite_uri: str) -> None:  # type: ignore[no-untyped-def]
    """README: "The default threshold, **0.95**"; with random weights every drawn picture is then
    one group (which is why the other tests pass their own)."""
    (documented,) = find("README.md", r"The default threshold, \*\*([0-9.]+)\*\*")
    with index_factory() as idx:
        idx.add(tmp_path / "pics")
    run = _cli("duplicates", "--uri", lite_uri, "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["threshold"] == float(documented)
    assert f"at threshold {float(documented):g}" in run.stderr


def test_a_bad_threshold_is_one_line(index_factory, library, tmp_path: Path, lite_uri: str) -> None:  # type: ignore[no-untyped-def]
    with index_factory() as idx:
        idx.add(tmp_path / "pics")
    run = _cli("duplicates", "--threshold", "1.5", "--uri", lite_uri)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == ["pixfind: error: --threshold 1.5 is not a cosine in (0, 1]: try 0.95"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pixfind", *args], env=cli_env(), capture_output=True, text=True, timeout=300
    )


def test_duplicates_on_each_backend(backend, small_encoder, library, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The same groups from Milvus Lite and from a Milvus server (HNSW search, paged key iterator)."""
    from pixfind.api import ImageIndex
    from pixfind.config import ModelSpec

    with ImageIndex(
        uri=backend.uri,
        token=backend.token,
        collection=backend.collection,
        model=ModelSpec("ViT-S-32", None),
        encoder=small_encoder,
    ) as idx:
        idx.add(tmp_path / "pics")
        assert paths_of(idx.duplicates(threshold=THRESHOLD)) == [{str(p) for p in library["copies"]}]


def test_an_under_that_is_not_a_folder_is_named(index_factory, library, tmp_path: Path, lite_uri: str) -> None:  # type: ignore[no-untyped-def]
    with index_factory() as idx:
        idx.add(tmp_path / "pics")
    run = _cli("duplicates", "--uri", lite_uri, "--under", str(tmp_path / "pics" / "beach.jpg"))
    assert run.returncode == 0, run.stderr
    assert run.stdout == ""
    assert f"--under {tmp_path / 'pics' / 'beach.jpg'} is not a folder here: check the path" in run.stderr
