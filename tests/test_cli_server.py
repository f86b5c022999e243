"""The ``pixfind`` command against the real Milvus server: index, incremental re-index, search by
text and image, ``--under``, info and grid output with ``--uri``/``--token``; auth failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from milvus_server import MilvusServer
from PIL import Image

from pixfind.cli import main
from pixfind.store import Store

pytestmark = pytest.mark.server


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def on_server(milvus_server: MilvusServer):  # type: ignore[no-untyped-def]
    collection = f"cli_{uuid.uuid4().hex[:12]}"
    yield ["--uri", milvus_server.uri, "--token", str(milvus_server.token), "--collection", collection]
    with Store(milvus_server.uri, token=milvus_server.token, collection=collection) as store:
        store.drop()


def test_index_then_search_in_a_fresh_process(
    make_images, tmp_path: Path, capsys: pytest.CaptureFixture[str], on_server: list[str]
) -> None:
    photos = make_images(tmp_path / "photos" / "a_b", 4) + make_images(tmp_path / "photos" / "50%", 3, start=10)
    code, _, err = run(capsys, "index", str(tmp_path / "photos"), *on_server)
    assert code == 0, err
    assert "7 new" in err and "0 failed" in err

    # right after `index` returns, another process sees every image it reported
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    found = subprocess.run(
        [sys.executable, "-m", "pixfind", "search", "--image", str(photos[5]), "-k", "10", "--json", *on_server],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert hits[0]["path"] == str(photos[5]) and hits[0]["score"] > 0.99
    assert sorted(h["path"] for h in hits) == sorted(map(str, photos))

    code, _, err = run(capsys, "index", str(tmp_path / "photos"), *on_server)
    assert code == 0 and "0 new" in err and "7 unchanged" in err

    code, out, _ = run(capsys, "search", "a dog", "--under", str(tmp_path / "photos" / "a_b"), "--json", *on_server)
    assert code == 0 and sorted(h["path"] for h in json.loads(out)) == sorted(map(str, photos[:4]))
    grid = tmp_path / "grid.jpg"
    code, out, err = run(
        capsys, "search", "a dog", "--under", str(tmp_path / "photos" / "50%"), "--grid", str(grid), *on_server
    )
    assert code == 0, err
    with Image.open(grid) as sheet:
        assert sheet.size[1] == 150  # 3 hits: one row

    code, out, _ = run(capsys, "info", "--json", *on_server)
    data = json.loads(out)
    assert data["images"] == 7 and data["uri"] == on_server[1]


@pytest.mark.parametrize("token", ["root:wrong", ""])
def test_bad_token_is_one_line(
    milvus_server: MilvusServer, token: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PIXFIND_TOKEN", raising=False)
    args = ["search", "dog", "--uri", milvus_server.uri] + (["--token", token] if token else [])
    code, out, err = run(capsys, *args)
    assert code != 0
    assert err.count("\n") == 1  # one line: "pixfind: error: authentication failed for ..."
    assert err.strip().endswith(f"authentication failed for {milvus_server.uri}: check --token / PIXFIND_TOKEN")
    assert out == ""
