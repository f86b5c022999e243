"""Which precision the CPU image model computes in: chosen from the CPU's flags (injected here, so
the tests do not depend on the machine that runs them), forced by PIXFIND_PRECISION, checked
against ONNX Runtime's f32 vectors once, with f32 when bf16 fails; and said by the index summary,
the run's JSON report and ``pixfind info``."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("open_clip")

from conftest import draw_photo

from pixfind.cli import main
from pixfind.config import ModelSpec, Settings
from pixfind.errors import PixfindError
from pixfind.models import load, onnx_runtime, openvino_runtime
from pixfind.models.export import export
from pixfind.models.onnx_runtime import OnnxClipEncoder
from pixfind.models.openvino_runtime import choose_precision
from pixfind.models.torch_clip import ClipEncoder

REAL_OPENVINO = openvino_runtime.OpenVinoVisual
SPEC = ModelSpec("ViT-S-32", None)
ZEN4 = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"})
SAPPHIRE_RAPIDS = frozenset({"avx512f", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"})
ICE_LAKE = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"})  # AVX-512, no bf16 arithmetic
ARM = frozenset()  # /proc/cpuinfo names no "flags" there


# -- the choice --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "flags", "expected"),
    [
        ("auto", ZEN4, "bf16"),
        ("auto", SAPPHIRE_RAPIDS, "bf16"),
        ("auto", ICE_LAKE, "f32"),
        ("auto", ARM, "f32"),
        ("f32", ZEN4, "f32"),
        ("bf16", ICE_LAKE, "bf16"),
        ("bf16", ZEN4, "bf16"),
    ],
)
def test_choice_from_the_setting_and_the_cpu(setting: str, flags: frozenset[str], expected: str) -> None:
    choice = choose_precision(setting, flags)
    assert choice.precision == expected
    if setting == "auto" and expected == "bf16":
        assert ("avx512_bf16" if "avx512_bf16" in flags else "amx_bf16") in choice.reason
    if setting != "auto":
        assert f"precision set to {setting}" in choice.reason
    if setting == "bf16" and flags == ICE_LAKE:
        assert "no bf16 arithmetic" in choice.reason


def test_cpu_flags_are_read_from_proc_cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_bf16\n"
    )
    real_open = open
    monkeypatch.setattr(
        "builtins.open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k)
    )
    assert {"avx512_bf16", "amx_bf16", "fpu"} <= openvino_runtime.cpu_flags()
    assert openvino_runtime.cpu_description() == "Some CPU (avx512_bf16+amx_bf16)"
    assert choose_precision("auto").precision == "bf16"


@pytest.mark.parametrize("value", ["auto", "F32", " bf16 "])
def test_setting_from_the_environment(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIXFIND_PRECISION", value)
    assert Settings.from_env().precision == value.strip().lower()
    assert Settings.from_env(precision="f32").precision == "f32"  # a flag beats the environment


def test_a_wrong_setting_is_one_clear_line(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PIXFIND_PRECISION", "fp8")
    with pytest.raises(PixfindError, match="PIXFIND_PRECISION must be one of auto, f32, bf16, not 'fp8'"):
        Settings.from_env()
    monkeypatch.delenv("PIXFIND_PRECISION")
    from pixfind import ImageIndex

    with pytest.raises(PixfindError, match="precision must be one of auto, f32, bf16, not 'half'"):
        ImageIndex(uri=str(tmp_path / "x.db"), precision="half")
    (tmp_path / "photos").mkdir()
    code = main(["index", str(tmp_path / "photos"), "--uri", str(tmp_path / "x.db"), "--precision", "half"])
    err = capsys.readouterr().err
    assert code != 0 and "--precision must be one of auto, f32, bf16, not 'half'" in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


# -- the encoder: asked, compiled, checked -----------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, small_encoder: ClipEncoder) -> Path:
    return export(small_encoder, tmp_path_factory.mktemp("export") / "ViT-S-32")


@pytest.fixture
def folder(exported: Path) -> Path:
    """The shared export, with no OpenVINO check recorded yet."""
    (exported / openvino_runtime.RECORD).unlink(missing_ok=True)
    return exported


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Injects the CPU's flags: ``cpu(ZEN4)``."""
    monkeypatch.delenv("PIXFIND_PRECISION", raising=False)
    monkeypatch.delenv("PIXFIND_OPENVINO", raising=False)
    return lambda flags: monkeypatch.setattr(openvino_runtime, "cpu_flags", lambda: flags)


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The precisions OpenVINO was asked to compile, in order."""
    calls: list[str] = []
    real = REAL_OPENVINO

    def recording(*args, precision: str = "f32", **kwargs):  # type: ignore[no-untyped-def]
        calls.append(precision)
        return real(*args, precision=precision, **kwargs)

    monkeypatch.setattr(openvino_runtime, "OpenVinoVisual", recording)
    return calls


def photos(encoder: OnnxClipEncoder, small_encoder: ClipEncoder, count: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """uint8 pixels for ``encoder`` and open_clip's own f32 vectors of the same photos (the oracle)."""
    images = [draw_photo(seed, (300 + 37 * seed, 240)) for seed in range(count)]
    pixels = np.stack([encoder.preprocess(img) for img in images])
    reference = small_encoder.encode_images(np.stack([small_encoder.preprocess(img) for img in images]))
    return pixels, reference


def test_without_bf16_arithmetic_auto_computes_f32(folder, small_encoder, cpu, asked) -> None:  # type: ignore[no-untyped-def]
    cpu(ICE_LAKE)
    encoder = OnnxClipEncoder(folder, threads=2)
    pixels, reference = photos(encoder, small_encoder)
    assert np.abs(encoder.encode_images(pixels) - reference).max() < 1e-4
    assert asked == ["f32"]
    assert (encoder.image_runtime, encoder.image_precision) == ("openvino", "f32")
    assert encoder.precision_reason == "auto: no bf16 arithmetic in this CPU"


def test_with_bf16_arithmetic_auto_asks_for_bf16(folder, small_encoder, cpu, asked) -> None:  # type: ignore[no-untyped-def]
    """What OpenVINO then computes is the machine's: bf16 (within the check's cosine of open_clip's
    f32 vectors) where OpenVINO says it can (its BF16 capability: native or emulated on AVX-512),
    else f32 with the reason."""
    import openvino

    cpu(ZEN4)
    encoder = OnnxClipEncoder(folder, threads=2)
    pixels, reference = photos(encoder, small_encoder)
    vectors = encoder.encode_images(pixels)
    assert asked[0] == "bf16" and vectors.shape == reference.shape and vectors.dtype == np.float32
    if "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert encoder.image_precision == "bf16"
        assert asked == ["bf16"] and encoder.precision_reason == "auto: the CPU has avx512_bf16"
        assert (vectors * reference).sum(axis=1).min() >= openvino_runtime.BF16_MIN_COSINE
        assert np.abs(vectors - reference).max() > 1e-5  # really computed in bf16, not f32
    else:
        assert asked == ["bf16", "f32"] and "computes f32 on this CPU" in encoder.precision_reason
        assert np.abs(vectors - reference).max() < 1e-4


def test_forced_precisions(folder, small_encoder, cpu, asked, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cpu(ZEN4)
    monkeypatch.setenv("PIXFIND_PRECISION", "f32")
    encoder = OnnxClipEncoder(folder, threads=1, precision=Settings.from_env().precision)
    pixels, reference = photos(encoder, small_encoder, 2)
    assert np.abs(encoder.encode_images(pixels) - reference).max() < 1e-4
    assert (asked, encoder.image_precision, encoder.precision_reason) == (["f32"], "f32", "precision set to f32")
    cpu(ICE_LAKE)
    forced = OnnxClipEncoder(folder, threads=1, precision="bf16")  # forced where the CPU lacks bf16
    forced.encode_images(pixels)
    assert asked[1] == "bf16"


class DriftingBf16(REAL_OPENVINO):
    """A runtime whose bf16 model drifts (as a faulty CPU or OpenVINO release might): its vectors
    are turned away from the true ones to cosine ~0.99; f32 is left exact."""

    compiled: ClassVar[list[str]] = []

    def __init__(self, *args, precision: str = "f32", **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, precision="f32", **kwargs)
        self.compiled.append(precision)
        self.precision = precision

    def run(self, pixels: np.ndarray) -> np.ndarray:
        features = super().run(pixels)
        if self.precision != "bf16":
            return features
        twist = np.roll(features, 1, axis=1)
        return features + 0.15 * twist * np.linalg.norm(features, axis=1, keepdims=True) / np.linalg.norm(
            twist, axis=1, keepdims=True
        )


def test_bf16_that_fails_its_check_falls_back_to_f32(folder, small_encoder, cpu, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    cpu(ZEN4)
    DriftingBf16.compiled = []
    monkeypatch.setattr(openvino_runtime, "OpenVinoVisual", DriftingBf16)
    encoder = OnnxClipEncoder(folder, threads=2)
    pixels, reference = photos(encoder, small_encoder)
    with caplog.at_level(logging.WARNING):
        vectors = encoder.encode_images(pixels)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "bf16" in warnings[0] and warnings[0].endswith("using f32")
    assert re.search(r"min cosine to ONNX Runtime f32 0\.9[0-8]\d+ \(at least 0\.99", warnings[0])
    assert np.abs(vectors - reference).max() < 1e-4  # the f32 model's vectors
    assert (encoder.image_runtime, encoder.image_precision) == ("openvino", "f32")
    assert encoder.precision_reason.startswith("bf16 failed its check: min cosine")
    checks = json.loads((folder / openvino_runtime.RECORD).read_text())["checks"]
    assert (checks["bf16"]["ok"], checks["f32"]["ok"]) == (False, True)
    assert DriftingBf16.compiled == ["bf16", "f32"]

    # recorded: the next run compiles f32 only, checks nothing, and says why
    caplog.clear()
    again = OnnxClipEncoder(folder, threads=2)
    monkeypatch.setattr(again, "_make_session", lambda tower: pytest.fail(f"{tower} session built"))
    with caplog.at_level(logging.WARNING):
        assert np.abs(again.encode_images(pixels) - reference).max() < 1e-4
    assert DriftingBf16.compiled == ["bf16", "f32", "f32"] and not caplog.records
    assert again.image_precision == "f32" and again.precision_reason.startswith("bf16 failed its check")
    monkeypatch.delenv("PIXFIND_BACKEND", raising=False)
    monkeypatch.setattr(load, "export_dir", lambda spec: folder)
    precision, reason = load.planned_image_precision(SPEC, Settings.from_env())  # what `pixfind info` says
    assert precision == "f32" and reason == again.precision_reason

    # another CPU (or OpenVINO version) checks afresh; the f32 result is kept beside it
    record = json.loads((folder / openvino_runtime.RECORD).read_text())
    (folder / openvino_runtime.RECORD).write_text(json.dumps({**record, "cpu": "another CPU"}))
    monkeypatch.setattr(openvino_runtime, "OpenVinoVisual", REAL_OPENVINO)
    third = OnnxClipEncoder(folder, threads=2)
    third.encode_images(pixels)
    assert json.loads((folder / openvino_runtime.RECORD).read_text())["cpu"] == openvino_runtime.cpu_description()


def test_a_passed_check_is_recorded_per_precision(folder, small_encoder, cpu, asked) -> None:  # type: ignore[no-untyped-def]
    cpu(ICE_LAKE)
    encoder = OnnxClipEncoder(folder, threads=1)
    pixels, _ = photos(encoder, small_encoder, 1)
    encoder.encode_images(pixels)
    record = json.loads((folder / openvino_runtime.RECORD).read_text())
    assert list(record["checks"]) == ["f32"] and record["checks"]["f32"]["ok"] is True
    assert record["cpu"] == openvino_runtime.cpu_description() and record["runner"] == openvino_runtime.RUNNER
    OnnxClipEncoder(folder, threads=1, precision="bf16").encode_images(pixels)
    checks = json.loads((folder / openvino_runtime.RECORD).read_text())["checks"]
    assert set(checks) == {"f32", "bf16"} and checks["f32"]["ok"] is True  # the f32 result stays


def test_int8_and_torch_say_what_they_compute(folder, small_encoder) -> None:  # type: ignore[no-untyped-def]
    int8 = OnnxClipEncoder(folder, threads=1, int8=True)
    int8.encode_images(photos(int8, small_encoder, 1)[0])
    assert (int8.image_runtime, int8.image_precision) == ("onnxruntime", "int8")
    assert (small_encoder.image_precision, small_encoder.precision_reason) == ("f32", "torch on cpu")


# -- what the user is told ---------------------------------------------------------------------


def test_the_index_run_reports_its_precision(folder, small_encoder, cpu, make_images, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from pixfind import ImageIndex
    from pixfind.render import summary_lines

    cpu(ICE_LAKE)
    make_images(tmp_path / "photos", 3)
    encoder = OnnxClipEncoder(folder, threads=2)
    with ImageIndex(uri=str(tmp_path / "p.db"), model=SPEC, encoder=encoder) as idx:
        report = idx.add(tmp_path / "photos")
        assert (report.precision, report.precision_reason) == ("f32", "OpenVINO; auto: no bf16 arithmetic in this CPU")
        assert report.to_dict()["precision"] == "f32"
        assert "images embedded in f32 (OpenVINO; auto: no bf16 arithmetic in this CPU)" in summary_lines(report)
        again = idx.add(tmp_path / "photos")  # nothing to embed: no precision to speak of
        assert again.precision is None and not any("embedded in" in line for line in summary_lines(again))


def test_cli_summary_report_and_info_say_the_precision(make_images, tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """Through the command line with the default torch backend of the tests (f32 on the CPU)."""
    make_images(tmp_path / "photos", 2)
    uri, report = str(tmp_path / "c.db"), tmp_path / "report.json"
    monkeypatch.setattr(openvino_runtime, "cpu_flags", lambda: ZEN4)
    code = main(["index", str(tmp_path / "photos"), "--uri", uri, "--report", str(report), "--precision", "f32"])
    err = capsys.readouterr().err
    assert code == 0 and "images embedded in f32 (torch on cpu)" in err
    assert json.loads(report.read_text())["precision"] == "f32"

    main(["info", "--uri", uri, "--json"])
    assert json.loads(capsys.readouterr().out)["cpu_precision"] == {
        "precision": "f32",
        "reason": "PIXFIND_BACKEND=torch",
    }
    monkeypatch.delenv("PIXFIND_BACKEND")
    main(["info", "--uri", uri, "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["cpu_precision"] == {"precision": "bf16", "reason": "auto: the CPU has avx512_bf16"}
    monkeypatch.setenv("PIXFIND_OPENVINO", "0")
    main(["info", "--uri", uri, "--json"])
    assert json.loads(capsys.readouterr().out)["cpu_precision"]["precision"] == "f32"
    monkeypatch.delenv("PIXFIND_OPENVINO")
    monkeypatch.setenv("PIXFIND_PRECISION", "f32")
    main(["info", "--uri", uri])
    assert "cpu precision  f32 (precision set to f32)" in capsys.readouterr().out


def test_the_setting_reaches_both_encoders(folder, cpu, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """ImageIndex(precision=...) (what --precision sets) beats PIXFIND_PRECISION for the index
    run's encoder and for the query encoder (an image query embeds in the same precision)."""
    from pixfind import ImageIndex

    cpu(ZEN4)
    monkeypatch.setenv("PIXFIND_BACKEND", "onnx")
    monkeypatch.setenv("PIXFIND_PRECISION", "bf16")
    monkeypatch.setattr(onnx_runtime, "export_dir", lambda spec: folder)
    with ImageIndex(uri=str(tmp_path / "s.db"), model=SPEC, precision="F32") as idx:
        assert idx.settings.precision == "f32"
        assert idx.query_encoder().precision_setting == "f32"  # the torch-free query encoder, loaded first
        assert isinstance(idx.encoder, OnnxClipEncoder) and idx.encoder.precision_setting == "f32"
    with ImageIndex(uri=str(tmp_path / "s.db"), model=SPEC) as idx:
        assert idx.query_encoder().precision_setting == "bf16" and idx.encoder.precision_setting == "bf16"
