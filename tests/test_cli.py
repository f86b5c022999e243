"""The ``pixfind`` command end to end: in-process for speed, plus real subprocesses for the entry
point, the default ViT-B-32 model and "no traceback, ever"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pixfind.cli import main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def indexed(make_images, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, list[Path]]:
    photos = make_images(tmp_path / "photos", 7)
    uri = str(tmp_path / "cli.db")
    code, _, err = run(capsys, "index", str(tmp_path / "photos"), "--uri", uri)
    assert code == 0, err
    assert "7 new" in err and "0 failed" in err
    return uri, photos


def test_index_search_table_json_grid(indexed, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri, photos = indexed
    code, out, _ = run(capsys, "search", "a white dog", "--uri", uri)
    assert code == 0
    assert "score" in out and str(photos[0].parent) in out

    grid = tmp_path / "out" / "results.jpg"
    code, out, err = run(capsys, "search", "a white dog", "-k", "7", "--json", "--grid", str(grid), "--uri", uri)
    assert code == 0, err
    hits = json.loads(out)
    assert [h["rank"] for h in hits] == list(range(1, 8))
    assert set(hits[0]) == {
        *("rank", "score", "path", "width", "height", "copies", "copy_paths"),
        *("taken", "taken_from", "camera", "type"),
    }
    with Image.open(grid) as sheet:
        assert sheet.size == (5 * 150, 2 * 150)  # 5 per row, rows as needed


def test_search_by_image_and_similar(indexed, capsys: pytest.CaptureFixture[str]) -> None:
    uri, photos = indexed
    code, out, _ = run(capsys, "search", "--image", str(photos[3]), "--json", "-k", "1", "--uri", uri)
    top = json.loads(out)[0]
    assert code == 0 and top["path"] == str(photos[3]) and top["score"] > 0.99
    code, out, _ = run(capsys, "search", "--similar", str(photos[5]), "--json", "-k", "3", "--uri", uri)
    found = [hit["path"] for hit in json.loads(out)]
    assert code == 0 and len(found) == 3 and str(photos[5]) not in found  # never the file itself


def test_rerun_is_incremental_and_info_reports(indexed, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri, _ = indexed
    code, _, err = run(capsys, "index", str(tmp_path / "photos"), "--uri", uri)
    assert code == 0 and "0 new" in err and "7 unchanged" in err
    code, out, _ = run(capsys, "info", "--uri", uri, "--json")
    data = json.loads(out)
    assert data["images"] == 7 and data["model"] == "ViT-S-32" and data["weights"] == "none"
    assert data["size_bytes"] > 0
    code, out, _ = run(capsys, "info", "--uri", uri)
    assert "ViT-S-32" in out and "images" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["search", "dog", "--uri", "{tmp}/none.db"], "no index at"),
        (["index", "{tmp}/missing", "--uri", "{tmp}/x.db"], "folder not found"),
        (["search", "--uri", "{tmp}/x.db"], "give exactly one of"),
        (["index", "{tmp}", "--uri", "{tmp}/m.db", "--model", "ViT-Nope"], "unknown model"),
        (["index", "{tmp}", "--uri", "{tmp}/m.db", "--checkpoint", "{tmp}"], "is a folder"),  # checked first
        (["search", "dog", "--uri", "http://127.0.0.1:9"], "cannot reach Milvus at http://127.0.0.1:9"),
    ],
)
def test_errors_are_one_line(args: list[str], expected: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code != 0
    assert expected in err
    assert "Traceback" not in err + out
    assert err.strip().count("\n") == 0


def test_model_mismatch_on_the_command_line(indexed, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    uri, _ = indexed
    code, _, err = run(capsys, "index", str(tmp_path / "photos"), "--uri", uri, "--model", "RN50")
    assert code != 0 and "was built with ViT-S-32 (none)" in err


def _pixfind(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pixfind", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_default_vit_b_32_end_to_end_in_a_fresh_process(make_images, tmp_path: Path) -> None:
    """The tutorial's model through the real entry point and the default (CPU) backend: the first
    index run exports the towers to ONNX; a later search embeds its query without importing torch."""
    make_images(tmp_path / "photos", 3)
    env = {**os.environ, "PIXFIND_PRETRAINED": "none", "PIXFIND_BACKEND": "auto"}
    env.pop("PIXFIND_MODEL", None)  # default: ViT-B-32
    indexed = _pixfind("index", str(tmp_path / "photos"), env=env)
    assert indexed.returncode == 0, indexed.stderr
    assert "3 new" in indexed.stderr
    exports = list((Path(env["PIXFIND_CACHE_DIR"]) / "onnx").glob("ViT-B-32-*/meta.json"))
    assert len(exports) == 1, indexed.stderr
    from oracle import check_index, image_files, reported_precision

    db = str(Path(env["PIXFIND_DATA_DIR"]) / "pixfind.db")
    precision = reported_precision(indexed.stderr)  # bf16 on a CPU that computes it, else f32
    check_index(db, image_files(tmp_path / "photos"), model="ViT-B-32", precision=precision)  # open_clip's own

    probe = (
        "import sys, json; from pixfind.cli import main; code = main(sys.argv[1:]); "
        "heavy = [m for m in ('torch', 'open_clip') if m in sys.modules]; "
        "print('HEAVY=' + json.dumps(heavy), file=sys.stderr); sys.exit(code)"
    )
    grid = tmp_path / "g.png"
    found = subprocess.run(
        [sys.executable, "-c", probe, "search", "a white dog", "--json", "--grid", str(grid)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert found.returncode == 0, found.stderr
    assert len(json.loads(found.stdout)) == 3
    assert "HEAVY=[]" in found.stderr  # the cold query path never imported torch or open_clip
    assert grid.stat().st_size > 0
    make_images(tmp_path / "photos", 2, start=3)  # and once exported, indexing needs no torch either
    again = subprocess.run(
        [sys.executable, "-c", probe, "index", str(tmp_path / "photos")], env=env, capture_output=True, text=True
    )
    assert again.returncode == 0 and "2 new" in again.stderr, again.stderr
    assert "HEAVY=[]" in again.stderr
    shown = _pixfind("info", "--json", env=env)
    info = json.loads(shown.stdout)
    assert (info["model"], info["dim"]) == ("ViT-B-32", 512)
    assert info["uri"] == str(Path(env["PIXFIND_DATA_DIR"]) / "pixfind.db")


def test_offline_without_weights_says_how_to_go_on(tmp_path: Path, make_images) -> None:
    make_images(tmp_path / "photos", 1)
    env = {k: v for k, v in os.environ.items() if k not in ("PIXFIND_PRETRAINED", "PIXFIND_MODEL")}
    env["HF_HUB_OFFLINE"] = "1"
    result = _pixfind("index", str(tmp_path / "photos"), env=env, timeout=120)
    assert result.returncode == 1
    assert "PIXFIND_PRETRAINED=none" in result.stderr and "Traceback" not in result.stderr


def serve_output_until_listening(server: subprocess.Popen[str], deadline: float) -> str:
    """What a started ``pixfind serve`` printed, up to the line with its URL (or the deadline)."""
    import re
    import time

    assert server.stdout is not None
    said = ""
    for line in server.stdout:
        said += line
        if re.search(r"http://127\.0\.0\.1:\d+/", line) or time.monotonic() > deadline:
            break
    return said


def test_search_is_answered_by_a_running_serve_on_the_same_index(indexed, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """While `pixfind serve` holds the embedded index, a command-line search or info asks it instead
    of failing on the lock (and needs neither the model nor Milvus)."""
    import time

    uri, photos = indexed
    server = subprocess.Popen(
        [sys.executable, "-m", "pixfind", "serve", "--uri", uri, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        serve_output_until_listening(server, deadline)
        announce = Path(uri + ".serve.json")
        while not announce.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        code, out, err = run(capsys, "search", "a white dog", "--uri", uri, "--json", "-k", "3")
        assert code == 0, err
        assert len(json.loads(out)) == 3
        assert err.count("random weights") == 1, err  # the index was built with PIXFIND_PRETRAINED=none
        code, out, err = run(capsys, "search", "--similar", str(photos[1]), "--uri", uri, "--json", "-k", "2")
        assert code == 0, err
        found = [hit["path"] for hit in json.loads(out)]
        assert len(found) == 2 and str(photos[1]) not in found  # never the file itself
        code, out, err = run(capsys, "search", "--image", str(photos[1]), "--uri", uri, "--json", "-k", "1")
        assert code == 0, err  # the image is decoded here and sent to the server
        assert json.loads(out)[0]["path"] == str(photos[1])
        code, out, err = run(capsys, "info", "--uri", uri, "--json")
        assert code == 0, err
        assert json.loads(out)["images"] == len(photos)
    finally:
        server.terminate()
        server.wait(30)
    assert not Path(uri + ".serve.json").exists()


#: ``pixfind serve`` in a child process that treats any collection as large (the IVF switch is
#: for 50,000+ images): the threshold must be lowered where the server runs, not in the test.
SERVE_WITH_LOW_THRESHOLD = (
    "import sys; import pixfind.store.milvus as store; store.LITE_SERVING_MIN_ROWS = 1; "
    "from pixfind.cli import main; sys.exit(main(sys.argv[1:]))"
)


def serve_says(uri: str, *flags: str) -> str:
    """What a `pixfind serve` on ``uri`` says until it listens; once it answers, it is stopped
    (SIGTERM, as a service manager stops it)."""
    import re
    import time

    import httpx

    server = subprocess.Popen(
        [sys.executable, "-c", SERVE_WITH_LOW_THRESHOLD, "serve", "--uri", uri, "--port", "0", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        said = serve_output_until_listening(server, time.monotonic() + 120)
        url = re.search(r"http://127\.0\.0\.1:\d+/", said)
        assert url, said
        assert httpx.get(url.group(0) + "api/info", timeout=60).status_code == 200  # up and serving
        return said
    finally:
        server.terminate()
        server.wait(30)


def test_serve_exact_puts_back_the_exact_index_a_killed_serve_left(  # type: ignore[no-untyped-def]
    indexed, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pixfind.store import Store
    from pixfind.store import milvus as store_module

    uri, _ = indexed
    monkeypatch.setattr(store_module, "LITE_SERVING_MIN_ROWS", 1)
    with Store(uri) as store:
        assert store.index_for_serving()  # ... and the server is killed before it restores FLAT
    said = serve_says(uri, "--exact")
    assert "serving 7 images" in said and "approximate" not in said
    with Store(uri) as store:
        assert store.index_type() == "FLAT"
    # the same server without --exact switches (so the check above can fail), and restores on exit
    said = serve_says(uri)
    assert "approximate (IVF) search while serving" in said
    with Store(uri) as store:
        assert store.index_type() == "FLAT"


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    code, out, err = run(capsys, "--version")
    assert code == 0, err
    assert out == f"pixfind {version('pixfind')}\n"


def test_cuda_asked_for_without_cuda_is_the_same_error_everywhere(indexed, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """An explicit --device cuda on a machine where torch sees no CUDA: index (with or without
    new files) and every kind of search refuse it with the same line; auto runs on the CPU."""
    import torch

    uri, photos = indexed
    attempts = [
        ["index", str(tmp_path / "photos"), "--uri", str(tmp_path / "fresh.db")],  # needs the model
        ["index", str(tmp_path / "photos"), "--uri", uri],  # nothing new to embed
        ["search", "a white dog", "--uri", uri],  # the torch-free text path
        ["search", "--image", str(photos[0]), "--uri", uri],
    ]
    said = set()
    for args in attempts:
        code, out, err = run(capsys, *args, "--device", "cuda")
        if torch.cuda.is_available():  # on a GPU machine the same commands simply work
            assert code == 0, err
            continue
        assert code == 1 and err.count("\n") == 1 and "CUDA" in err and "--device" in err, (args, err)
        said.add(err)
    assert len(said) <= 1, said
    code, out, err = run(capsys, "search", "a white dog", "--uri", uri, "--device", "auto", "--json")
    assert code == 0 and len(json.loads(out)) == 7, err
    code, out, err = run(capsys, "search", "a white dog", "--uri", uri, "--device", "gpu")
    assert code == 1 and "unknown device 'gpu'" in err and err.count("\n") == 1


def test_no_matches_under_a_folder_says_why(indexed, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    uri, photos = indexed
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "notes.txt").write_text("not a picture")
    cases = [
        (tmp_path / "nowhere", "does not exist"),
        (photos[0], "is a file (pictures like it: --similar"),
        (tmp_path / "notes.txt", "is a file"),
        (tmp_path / "elsewhere", "nothing in the index is under"),
    ]
    for under, expected in cases:
        for extra in ([], ["--json"]):
            code, out, err = run(capsys, "search", "a white dog", "--uri", uri, "--under", str(under), *extra)
            assert code == 0 and expected in err and str(under) in err and err.count("\n") == 1, err
            assert out.strip() == ("[]" if extra else "")  # stdout holds results only
            assert ("--similar" in err) == (under == photos[0]), err  # only an image is worth one
    code, out, err = run(capsys, "search", "a white dog", "--uri", uri, "--under", str(photos[0].parent), "--json")
    assert code == 0 and len(json.loads(out)) == 7 and "no matches" not in err


def test_query_image_that_is_a_folder_says_so(indexed, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    uri, photos = indexed
    code, _, err = run(capsys, "search", "--image", str(photos[0].parent), "--uri", uri)
    assert code == 1 and "is a folder" in err and "not found" not in err and err.count("\n") == 1
    code, _, err = run(capsys, "search", "--image", str(tmp_path / "gone.jpg"), "--uri", uri)
    assert code == 1 and "query image not found" in err


def test_random_weights_are_pointed_out_once_on_stderr(
    indexed, small_encoder, tmp_path: Path, capsys, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import torch

    uri, photos = indexed  # built with PIXFIND_PRETRAINED=none
    for extra in ([], ["--json"], ["--image", str(photos[0])]):
        query = [] if "--image" in extra else ["a white dog"]
        code, out, err = run(capsys, "search", *query, "--uri", uri, *extra)
        assert code == 0 and err.count("random weights") == 1 and err.count("\n") == 1, err
        assert "random weights" not in out
        if "--json" in extra:
            assert len(json.loads(out)) == 7

    checkpoint = tmp_path / "weights.pt"  # real (if untrained) weights from a file: no reminder
    torch.save(small_encoder.model.state_dict(), checkpoint)
    other = str(tmp_path / "ckpt.db")
    code, _, err = run(capsys, "index", str(photos[0].parent), "--uri", other, "--checkpoint", str(checkpoint))
    assert code == 0 and "random weights" not in err, err
    monkeypatch.delenv("PIXFIND_PRETRAINED")  # search as recorded, asking for no model
    monkeypatch.delenv("PIXFIND_MODEL")
    code, out, err = run(capsys, "search", "a white dog", "--uri", other)
    assert code == 0 and err == "", err


def test_report_that_cannot_be_written_is_refused_before_the_run(make_images, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    make_images(tmp_path / "photos", 1)
    uri = str(tmp_path / "r.db")
    for report, expected in ((tmp_path / "missing" / "run.json", "does not exist"), (tmp_path, "is a folder")):
        code, _, err = run(capsys, "index", str(tmp_path / "photos"), "--uri", uri, "--report", str(report))
        assert code == 1 and expected in err and err.count("\n") == 1 and "internal error" not in err, err
        assert not Path(uri).exists()  # refused before any work
