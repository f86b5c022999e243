"""SIGKILL at known points of ``pixfind index`` on the default backend (ONNX Runtime / OpenVINO),
on Milvus Lite and on a Milvus server; then the library changes, the run is resumed, and every
stored vector is checked against open_clip's own reference (tests/oracle.py).

Each kill lands where the test says: while scanning, in a decode thread, between embedding a batch
and writing it, *inside* an upsert call (held there by tests/crashpoint.py after part of the call's
rows were acknowledged, so the test knows the call was half done and how many rows it wrote), and
inside the prune (after part of the vanished files' rows were deleted). Ctrl-C during the
embedding is checked the same way. A few small pictures each, so that CI stays quick."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
from conftest import SMALL_MODEL, Backend, cli_env, draw_photo
from oracle import check_index, image_files, stored_rows
from test_crash import run_at

BATCH = 2  # pictures per model call
WRITE_EVERY = 4  # rows per Store.write
ROWS_PER_CALL = 2  # rows (or keys) per Milvus request: each write or prune is several requests


def make_library(folder: Path) -> None:
    """Ten small pictures (JPEG and PNG) and an empty file that fails every run."""
    folder.mkdir(parents=True)
    for seed in range(10):
        ext = ".png" if seed % 4 == 3 else ".jpg"
        draw_photo(seed, (96, 72)).save(folder / f"photo {seed:02d}{ext}")
    (folder / "photo 04b empty.jpg").write_bytes(b"")


def good_files(folder: Path) -> list[str]:
    return [p for p in image_files(folder) if Path(p).stat().st_size > 0]


def change_library(folder: Path, stored: set[str]) -> None:
    """What happens to a library between two runs: a picture gets new content under its name,
    another is renamed, a third is deleted (stored ones where there are), one is added."""
    pictures = sorted(good_files(folder))
    order = sorted(pictures, key=lambda p: p not in stored)  # stored ones first
    changed, renamed, deleted = order[0], order[1], order[2]
    draw_photo(500, (96, 72)).save(changed)  # same name, new picture
    Path(renamed).rename(folder / f"renamed{Path(renamed).suffix}")
    Path(deleted).unlink()
    draw_photo(501, (80, 80)).save(folder / "new.jpg")


def target(backend: Backend) -> list[str]:
    return ["--collection", backend.collection] + (["--token", backend.token] if backend.token else [])


def killed_run(point: str, count: int, backend: Backend, folder: Path, env: dict[str, str]):  # type: ignore[no-untyped-def]
    action = "killall" if backend.name == "lite" else "kill"  # on Lite, its engine dies too
    result = run_at(
        point,
        count,
        action,
        folder,
        backend.uri,
        WRITE_EVERY,
        rows_per_call=ROWS_PER_CALL,
        batch_size=BATCH,
        target=target(backend),
        env=env,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    return result


def on_the_default_backend(run) -> None:  # type: ignore[no-untyped-def]
    """The run embedded with pixfind's default CPU backend: the exported towers, not torch."""
    assert re.search(r"crashpoint: images embedded on (openvino|onnxruntime)", run.stderr), run.stderr


def resume_and_check(backend: Backend, folder: Path, env: dict[str, str], embeds: bool = True) -> None:
    final = run_at("never", 0, "kill", folder, backend.uri, target=target(backend), env=env)
    assert final.returncode == 0, final.stderr
    assert "1 failed" in final.stderr and "empty file" in final.stderr, final.stderr
    if embeds:
        on_the_default_backend(final)
    check_index(backend.uri, good_files(folder), model=SMALL_MODEL, token=backend.token, collection=backend.collection)


def stored(backend: Backend) -> set[str]:
    """What a killed run left (on a server: every write it had sent, though never flushed)."""
    return set(stored_rows(backend.uri, token=backend.token, collection=backend.collection, strong=True))


def check_what_was_written(backend: Backend, folder: Path, expected_count: int | set[int]) -> set[str]:
    """After the kill: how many rows there are, and that each one is right."""
    rows = stored(backend)
    counts = {expected_count} if isinstance(expected_count, int) else expected_count
    assert len(rows) in counts, f"{len(rows)} rows after the kill, expected {sorted(counts)}"
    check_index(
        backend.uri,
        rows,
        model=SMALL_MODEL,
        token=backend.token,
        collection=backend.collection,
        strong=True,
    )
    assert rows <= set(good_files(folder))
    return rows


@pytest.mark.parametrize(
    ("point", "count", "written"),
    [
        ("scan", 5, 0),  # the scan comes before any write
        # decode threads run ahead of the writes: the kill may land before, inside (2 of its 4
        # rows acknowledged) or after the first write, never after the second
        ("decode", 7, {0, 2, 4}),
        ("embed", 3, 4),  # third batch embedded: two batches (one write) stored, this one not
    ],
)
def test_sigkill_at_a_point_then_resume(
    point: str, count: int, written: int | set[int], backend: Backend, onnx_cache: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "library"
    make_library(folder)
    env = cli_env(onnx_cache)
    killed_run(point, count, backend, folder, env)
    rows = check_what_was_written(backend, folder, written)
    change_library(folder, rows)
    resume_and_check(backend, folder, env)


def test_sigkill_inside_an_upsert_call_then_resume(backend: Backend, onnx_cache: Path, tmp_path: Path) -> None:
    """Held inside the second Store.write (rows 5-8) once its first request (2 rows) was
    acknowledged: exactly 4 + 2 rows are stored, the call's other 2 are not."""
    folder = tmp_path / "library"
    make_library(folder)
    env = cli_env(onnx_cache)
    result = killed_run("upsert", 2, backend, folder, env)
    assert "crashpoint: killed inside Store.write: 2 of 4 rows acknowledged" in result.stderr, result.stderr
    rows = check_what_was_written(backend, folder, WRITE_EVERY + ROWS_PER_CALL)
    change_library(folder, rows)
    resume_and_check(backend, folder, env)


def test_sigkill_inside_the_prune_then_resume(backend: Backend, onnx_cache: Path, tmp_path: Path) -> None:
    """Five pictures deleted from disk; the run is killed after the prune's first delete request
    (2 rows gone), with 3 rows of vanished files still stored; the next run removes them."""
    folder = tmp_path / "library"
    make_library(folder)
    env = cli_env(onnx_cache)
    first = run_at("never", 0, "kill", folder, backend.uri, target=target(backend), env=env)
    assert first.returncode == 0, first.stderr
    on_the_default_backend(first)
    everything = good_files(folder)
    vanished = everything[1::2]
    for path in vanished:
        Path(path).unlink()
    result = killed_run("prune", 1, backend, folder, env)
    said = re.search(r"crashpoint: killed inside the prune: (\d+) of (\d+) rows deleted", result.stderr)
    assert said and said.groups() == (str(ROWS_PER_CALL), str(len(vanished))), result.stderr
    rows = stored(backend)
    assert len(rows) == len(everything) - ROWS_PER_CALL
    assert set(good_files(folder)) <= rows  # only rows of vanished files were deleted
    resume_and_check(backend, folder, env, embeds=False)


def test_ctrl_c_while_embedding_saves_the_batch_then_resume(backend: Backend, onnx_cache: Path, tmp_path: Path) -> None:
    folder = tmp_path / "library"
    make_library(folder)
    env = cli_env(onnx_cache)
    stopped = run_at("embed", 3, "sigint", folder, backend.uri, 1000, batch_size=BATCH, target=target(backend), env=env)
    assert stopped.returncode == 130, stopped.stderr
    assert "stopped early: 6 new" in stopped.stderr and "Traceback" not in stopped.stderr, stopped.stderr
    rows = check_what_was_written(backend, folder, 3 * BATCH)  # the batch in hand was finished and saved
    change_library(folder, rows)
    resume_and_check(backend, folder, env)
