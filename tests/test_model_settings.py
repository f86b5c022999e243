"""The model runtimes' contract and settings: every runtime is a whole ``Encoder``, the runtime
settings (``PIXFIND_BACKEND``, ``PIXFIND_OPENVINO``, ``PIXFIND_ORT_SPIN``, ``PIXFIND_THREADS``)
are read once, by ``Settings``, and reach the runtime; the query path never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SRC, cli_env, draw_photo

from pixfind.cli import main
from pixfind.config import ModelSpec, Settings
from pixfind.errors import PixfindError
from pixfind.models.base import Encoder

SPEC = ModelSpec("ViT-S-32", None)


def protocol_members() -> list[str]:
    """Every name the Encoder protocol declares: its attributes, properties and methods."""
    names = set(Encoder.__annotations__)
    names |= {name for name in vars(Encoder) if not name.startswith("_")}
    return sorted(names)


@pytest.fixture
def exported(onnx_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This session's ViT-S-32 export, as the cache every call below reads."""
    monkeypatch.setenv("PIXFIND_CACHE_DIR", str(onnx_cache))
    return onnx_cache


def test_every_runtime_implements_the_whole_encoder(small_encoder, exported: Path) -> None:  # type: ignore[no-untyped-def]
    from pixfind.models import load_encoder, load_query_encoder

    members = protocol_members()
    assert {"device", "fills_cpu", "image_precision", "precision_reason", "image_runtime", "draft_side"} <= set(members)
    onnx = load_encoder(SPEC, Settings.from_env(backend="onnx"))
    query = load_query_encoder(SPEC, Settings.from_env())
    for encoder in (small_encoder, onnx, query):
        missing = [name for name in members if not hasattr(encoder, name)]
        assert not missing, f"{type(encoder).__name__} lacks {missing}"
        assert isinstance(encoder.device, str) and isinstance(encoder.fills_cpu, bool)
    assert small_encoder.image_runtime is None  # torch says so explicitly
    pixels = onnx.preprocess(draw_photo(2, (90, 60)))[None]
    onnx.encode_images(pixels)
    assert onnx.image_runtime in ("openvino", "onnxruntime") and onnx.image_precision in ("f32", "bf16")


def test_runtime_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PIXFIND_BACKEND", "PIXFIND_OPENVINO", "PIXFIND_ORT_SPIN", "PIXFIND_THREADS"):
        monkeypatch.delenv(name, raising=False)
    plain = Settings.from_env()
    assert (plain.backend, plain.openvino, plain.ort_spin, plain.threads) == ("auto", True, False, None)
    monkeypatch.setenv("PIXFIND_BACKEND", " ONNX ")
    monkeypatch.setenv("PIXFIND_ORT_SPIN", "1")
    monkeypatch.setenv("PIXFIND_THREADS", "3")
    for off in ("0", "false", "No", "off"):
        monkeypatch.setenv("PIXFIND_OPENVINO", off)
        read = Settings.from_env()
        assert (read.backend, read.openvino, read.ort_spin, read.threads) == ("onnx", False, True, 3), off
    monkeypatch.setenv("PIXFIND_OPENVINO", "1")
    monkeypatch.setenv("PIXFIND_ORT_SPIN", "0")
    read = Settings.from_env()
    assert (read.openvino, read.ort_spin) == (True, False)
    monkeypatch.setenv("PIXFIND_THREADS", "0")
    assert Settings.from_env().threads is None  # 0: one per core, as before


def test_a_bad_thread_count_is_one_clear_line(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PIXFIND_THREADS", "two")
    with pytest.raises(PixfindError, match="PIXFIND_THREADS must be a whole number"):
        Settings.from_env()
    (tmp_path / "photos").mkdir()
    code = main(["index", str(tmp_path / "photos"), "--uri", str(tmp_path / "x.db")])
    err = capsys.readouterr().err
    assert code not in (0, 70) and "PIXFIND_THREADS must be a whole number" in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


def test_the_settings_reach_onnx_runtime_and_openvino(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read back from ONNX Runtime's own session options, not from pixfind's attributes."""
    from pixfind.models import load_encoder

    monkeypatch.setenv("PIXFIND_ORT_SPIN", "1")
    monkeypatch.setenv("PIXFIND_THREADS", "1")
    monkeypatch.setenv("PIXFIND_OPENVINO", "0")
    encoder = load_encoder(SPEC, Settings.from_env(backend="onnx"))
    options = encoder.session("text").get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    encoder.encode_images(encoder.preprocess(draw_photo(3, (80, 80)))[None])
    assert encoder.image_runtime == "onnxruntime"  # PIXFIND_OPENVINO=0 reached the image tower
    monkeypatch.delenv("PIXFIND_ORT_SPIN")
    quiet = load_encoder(SPEC, Settings.from_env(backend="onnx"))
    assert (
        quiet.session("text").get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    )


def test_an_unknown_backend_is_one_clear_line(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pixfind.errors import ModelLoadError
    from pixfind.models import load_encoder

    monkeypatch.setenv("PIXFIND_BACKEND", "tensorflow")
    with pytest.raises(ModelLoadError, match="unknown backend 'tensorflow': choose auto, onnx or torch"):
        load_encoder(SPEC, Settings.from_env())


def test_the_query_side_never_imports_torch(exported: Path) -> None:
    """A fresh process that loads every torch-free module and embeds a query and an image."""
    script = (
        "import sys\n"
        "import pixfind.models.load, pixfind.models.onnx_runtime, pixfind.models.openvino_runtime\n"
        "import pixfind.models.pixels, pixfind.models.tokenizer\n"
        "from PIL import Image\n"
        "from pixfind.config import ModelSpec, Settings\n"
        "from pixfind.models import load_query_encoder\n"
        "enc = load_query_encoder(ModelSpec('ViT-S-32', None), Settings.from_env())\n"
        "enc.encode_texts(['a dog'])\n"
        "enc.encode_images(enc.preprocess(Image.new('RGB', (50, 40), 'red'))[None])\n"
        "print(sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules))\n"
    )
    env = cli_env(exported)
    env["PYTHONPATH"] = SRC
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_exported_runtimes_take_only_uint8_pixels(exported: Path) -> None:
    from pixfind.models import load_encoder

    encoder = load_encoder(SPEC, Settings.from_env(backend="onnx"))
    with pytest.raises(ValueError, match="uint8"):
        encoder.encode_images(np.zeros((1, 3, encoder.image_size, encoder.image_size), dtype=np.float32))
