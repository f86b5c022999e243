"""Indexing into a real Milvus Lite file: incremental runs, bad files, moves, filters, models."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_MODEL, draw_photo
from oracle import check_index

from pixfind.config import ModelSpec
from pixfind.errors import ModelMismatchError, PixfindError
from pixfind.pathkeys import key_of, path_of


def stored_paths(idx) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(path_of(key) for page in idx.store.iter_keys() for key in page)


def image_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in {".jpg", ".png", ".gif"})


def test_index_then_search_by_text_and_by_image(index_factory, make_images, tmp_path: Path) -> None:
    photos = make_images(tmp_path / "photos", 6)
    idx = index_factory()
    report = idx.add(tmp_path / "photos")
    assert (report.new, report.failed) == (6, [])
    assert idx.info()["images"] == 6
    hits = idx.search("a white dog", limit=3)
    assert [h.rank for h in hits] == [1, 2, 3]
    assert all(-1 <= h.score <= 1 for h in hits)
    assert hits[0].score >= hits[1].score >= hits[2].score
    same = idx.search_image(photos[2], limit=2)
    assert same[0].path == str(photos[2]) and same[0].score > 0.99
    assert (same[0].width, same[0].height) == (320, 240)
    like = idx.similar(str(photos[4]), limit=5)
    assert len(like) == 5 and str(photos[4]) not in [h.path for h in like]  # never the file itself


def test_incremental_runs_track_the_folder_exactly(index_factory, make_images, tmp_path: Path) -> None:
    folder = tmp_path / "lib"
    make_images(folder, 5)
    make_images(folder / "sub", 3, start=100)
    idx = index_factory()
    assert idx.add(folder).new == 8
    assert stored_paths(idx) == image_files(folder)

    second = idx.add(folder)
    assert (second.new, second.updated, second.unchanged, second.embedded) == (0, 0, 8, 0)

    # add, modify, delete and rename between runs
    make_images(folder / "sub", 2, start=200)
    draw_photo(999).save(folder / "img_0001.jpg")  # new content, same name
    os.utime(folder / "img_0001.jpg", ns=(1, 1_000_000_000))
    (folder / "img_0002.jpg").unlink()
    (folder / "img_0003.jpg").rename(folder / "sub" / "renamed.jpg")
    third = idx.add(folder)
    assert third.new == 2 and third.updated == 1 and third.moved == 1 and third.removed == 1
    assert stored_paths(idx) == image_files(folder)
    check_index(idx.store.uri, image_files(folder), model=SMALL_MODEL, store=idx.store)  # right vectors
    assert idx.info()["images"] == len(image_files(folder))

    shutil.rmtree(folder / "sub")
    fourth = idx.add(folder)
    assert fourth.removed == 6
    assert stored_paths(idx) == image_files(folder)


def test_moved_file_keeps_its_vector_without_embedding(index_factory, make_images, tmp_path: Path) -> None:
    photos = make_images(tmp_path / "a", 2)
    idx = index_factory()
    idx.add(tmp_path / "a")
    before = idx.store.vectors_of([key_of(str(photos[0]))])[key_of(str(photos[0]))]
    target = tmp_path / "a" / "moved here.jpg"
    photos[0].rename(target)
    report = idx.add(tmp_path / "a")
    assert (report.moved, report.embedded, report.removed) == (1, 0, 0)
    assert idx.store.vectors_of([key_of(str(target))])[key_of(str(target))] == before
    assert [h.path for h in idx.similar(str(target), limit=2)] == [str(photos[1])]  # found by its new name
    assert stored_paths(idx) == image_files(tmp_path / "a")
    check_index(idx.store.uri, image_files(tmp_path / "a"), model=SMALL_MODEL, store=idx.store)


def test_bad_files_are_reported_and_everything_else_is_stored(index_factory, make_images, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    good = make_images(folder, 4)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "fake.png").write_text("I am a text file")
    (folder / "cut.jpg").write_bytes(good[0].read_bytes()[:300])
    (folder / "dir.jpg").mkdir()
    make_images(folder / "dir.jpg", 1, start=50)
    (folder / "notes.txt").write_text("ignored: not an image extension")
    idx = index_factory()
    report = idx.add(folder)
    reasons = {Path(p).name: r for p, r in report.failed}
    assert reasons == {"zero.jpg": "empty file", "fake.png": reasons["fake.png"], "cut.jpg": "truncated image"}
    assert "not an image" in reasons["fake.png"]
    assert report.new == 5
    assert len(stored_paths(idx)) == 5
    good_files = [*map(str, good), str(folder / "dir.jpg" / "img_0050.jpg")]
    check_index(idx.store.uri, good_files, model=SMALL_MODEL, store=idx.store)


def test_under_filter_is_exact_for_wildcard_and_quote_folders(index_factory, make_images, tmp_path: Path) -> None:
    names = ["a_b", "axb", "50%", "50x", "it's", 'say "hi"']
    for i, name in enumerate(names):
        make_images(tmp_path / "lib" / name, 2, start=10 * i)
    idx = index_factory()
    assert idx.add(tmp_path / "lib").new == 12
    for name in names:
        hits = idx.search("anything", limit=20, under=str(tmp_path / "lib" / name))
        assert len(hits) == 2, name
        assert all(Path(h.path).parent.name == name for h in hits), name


def test_another_model_is_refused(index_factory, make_images, tmp_path: Path) -> None:
    make_images(tmp_path / "p", 1)
    idx = index_factory()
    idx.add(tmp_path / "p")
    idx.close()
    with pytest.raises(ModelMismatchError, match="was built with ViT-S-32"):
        index_factory(model=ModelSpec("RN50", None), encoder=None).add(tmp_path / "p")


def test_search_uses_the_recorded_model(index_factory, make_images, tmp_path: Path, lite_uri: str) -> None:
    from pixfind.api import ImageIndex

    make_images(tmp_path / "p", 2)
    idx = index_factory()
    idx.add(tmp_path / "p")
    idx.close()
    with ImageIndex(uri=lite_uri) as reopened:  # no model flags at query time
        assert reopened.model_spec() == ModelSpec(SMALL_MODEL, None)
        assert len(reopened.search("a photo", limit=5)) == 2


def test_clear_errors(index_factory, tmp_path: Path) -> None:
    idx = index_factory()
    with pytest.raises(PixfindError, match="folder not found"):
        idx.add(tmp_path / "missing")
    with pytest.raises(PixfindError, match="is empty"):
        idx.search("dog")
    with pytest.raises(PixfindError, match="empty query"):
        idx.store  # noqa: B018 - keep the index open
        from pixfind.limits import check_query

        check_query("   ")


class _SlowEncoder:
    """Stands in for a model: records whether a decode ever ran while it was embedding."""

    device, image_size, image_precision, precision_reason, image_runtime = "cpu", 8, None, "", None

    def __init__(self, fills_cpu: bool) -> None:
        self.spec, self.dim, self.draft_side, self.fills_cpu = ModelSpec(SMALL_MODEL, None), 4, 336, fills_cpu
        self.busy = False
        self.decodes_during_inference = 0

    def preprocess(self, image: object) -> np.ndarray:
        return np.zeros((3, 8, 8), dtype=np.float32)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        self.busy = True
        time.sleep(0.03)
        self.busy = False
        return np.ones((len(pixels), 4), dtype=np.float32) / 2


@pytest.mark.parametrize("fills_cpu", [True, False])
def test_decoding_waits_for_a_model_that_fills_the_cpu(
    fills_cpu: bool, make_images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU the model uses every core: decoding beside it would stall its threads, so decode
    threads run between batches; beside a GPU (or spare cores) they overlap inference."""
    from pixfind.ingest import pipeline
    from pixfind.ingest.runner import Indexer
    from pixfind.store import Store

    folder = tmp_path / "photos"
    make_images(folder, 24)
    encoder = _SlowEncoder(fills_cpu)
    real_load = pipeline.load_image

    def load(path: str, min_side: int | None = None, data: bytes | None = None) -> object:
        if encoder.busy:
            encoder.decodes_during_inference += 1
        time.sleep(0.005)
        return real_load(path, min_side=min_side, data=data)

    monkeypatch.setattr(pipeline, "load_image", load)
    with Store(str(tmp_path / "i.db")) as store:
        report = Indexer(store, lambda: encoder, batch_size=4, workers=2).run([str(folder)])
        assert report.new == 24 and store.count() == 24
    if fills_cpu:
        assert encoder.decodes_during_inference == 0
    else:
        assert encoder.decodes_during_inference > 0


class _BatchRecorder(_SlowEncoder):
    """A model "on" ``device`` that records the size of every batch it is given."""

    def __init__(self, device: str) -> None:
        super().__init__(fills_cpu=False)
        self.device = device
        self.batches: list[int] = []

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        self.batches.append(len(pixels))
        return np.ones((len(pixels), 4), dtype=np.float32) / 2


@pytest.mark.parametrize(("device", "expected"), [("cuda:0", 256), ("cpu", 16)])
def test_default_batch_follows_the_models_device(device: str, expected: int, make_images, tmp_path: Path) -> None:
    """The settings say device "auto" (the default): the batch size is chosen once the model is
    loaded, from where it runs (a GPU once got CPU-sized batches of 16 here)."""
    from pixfind import ImageIndex

    make_images(tmp_path / "photos", 300)
    encoder = _BatchRecorder(device)
    with ImageIndex(uri=str(tmp_path / "i.db"), encoder=encoder, model=encoder.spec) as index:
        assert index.settings.device == "auto"
        report = index.add(tmp_path / "photos")
    assert report.new == 300
    assert max(encoder.batches) == expected and sum(encoder.batches) == 300


def test_an_index_made_with_schema_1_keeps_working(make_images, tmp_path: Path) -> None:
    """A collection made before schema 2: indexed into, re-indexed, searches return sizes; it
    keeps its five typed fields. It has no place for a content hash, so a renamed file is
    embedded again rather than trusted on its fingerprint."""
    from pixfind import ImageIndex
    from pixfind.store import CollectionInfo, Store

    uri = str(tmp_path / "old.db")
    encoder = _BatchRecorder("cpu")
    with Store(uri) as store:
        store._create(CollectionInfo(encoder.spec, encoder.dim, schema=1))
    folder = tmp_path / "photos"
    make_images(folder, 6)
    with ImageIndex(uri=uri, encoder=encoder, model=encoder.spec) as index:
        assert index.add(folder).new == 6
        assert index.add(folder).unchanged == 6
        first = sorted(folder.iterdir())[0]
        first.rename(folder / "renamed.jpg")
        report = index.add(folder)
        assert (report.moved, report.copied, report.new, report.removed) == (0, 0, 1, 1)
        assert index.store.count() == 6  # the old path is gone
        hits = index.store.search([np.ones(4, dtype=np.float32).tolist()], 10)[0]
        assert len(hits) == 6 and all(h.width > 0 and h.size > 0 for h in hits)
        info = index.store.info()
        assert info is not None and info.schema == 1


def test_decode_threads_follow_where_the_model_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from pixfind.ingest import runner

    monkeypatch.setattr(runner, "cpu_cores", lambda: 8)
    assert runner.default_workers(SimpleNamespace(device="cuda:0", fills_cpu=False)) == 8  # GPU: CPU decodes
    assert runner.default_workers(SimpleNamespace(device="cpu", fills_cpu=True)) == 8  # turns: all cores
    assert runner.default_workers(SimpleNamespace(device="cpu", fills_cpu=False)) == 4  # beside a CPU model
    assert runner.default_batch(SimpleNamespace(device="cuda:1")) == 256
    assert runner.default_batch(SimpleNamespace(device="cpu")) == 16  # every Encoder says its device
