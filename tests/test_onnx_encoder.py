"""ONNX backend: parity with torch, the torch-free tokenizer, trimming, the export cache."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")

from pixfind.config import ModelSpec, Settings  # noqa: E402
from pixfind.errors import ModelLoadError  # noqa: E402
from pixfind.models import export as model_export  # noqa: E402
from pixfind.models import openvino_runtime  # noqa: E402
from pixfind.models.load import load_encoder, load_query_encoder  # noqa: E402
from pixfind.models.onnx_runtime import OnnxClipEncoder, export_dir  # noqa: E402
from pixfind.models.tokenizer import ClipTokenizer, trim_padding  # noqa: E402
from pixfind.models.torch_clip import ClipEncoder  # noqa: E402

SPEC = ModelSpec("ViT-S-32", None)
SRC = str(Path(__file__).resolve().parent.parent / "src")

TEXTS = [
    "a photo of a dog",
    "",
    "   lots   of\twhitespace\n\r ",
    "Ünïcödé café naïve — “curly quotes” ﬁ ligature",
    "日本語のテキスト 🐱🐶 emoji",
    "&amp;lt;b&amp;gt; html &amp; entities",
    "Mojibake: cafÃ©",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
    "control\x00chars\x1b[31m and escapes",
    "it's we're they'll I'd 123 4567 3.14",
    "word " * 100,
    "x" * 400,
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pixfind-cache")
    old = os.environ.get("PIXFIND_CACHE_DIR")
    os.environ["PIXFIND_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("PIXFIND_CACHE_DIR", None)
    else:
        os.environ["PIXFIND_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _use_module_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest gives every test a fresh cache folder; these share one export."""
    monkeypatch.setenv("PIXFIND_CACHE_DIR", str(cache))


def _f32_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests check f32 parity: a CPU without bf16 arithmetic, whatever runs them (bf16 is
    tested in test_precision.py)."""
    monkeypatch.delenv("PIXFIND_PRECISION", raising=False)
    monkeypatch.delenv("PIXFIND_OPENVINO", raising=False)
    monkeypatch.setattr(openvino_runtime, "cpu_flags", lambda: frozenset({"avx2", "fma"}))


@pytest.fixture(autouse=True)
def _f32_cpu_for_every_test(monkeypatch: pytest.MonkeyPatch) -> None:
    _f32_cpu(monkeypatch)


@pytest.fixture(scope="module")
def torch_encoder(cache: Path, request: pytest.FixtureRequest) -> ClipEncoder:
    try:  # the suite's shared ViT-S-32, when conftest provides it
        return request.getfixturevalue("small_encoder")
    except pytest.FixtureLookupError:
        return ClipEncoder(SPEC, "cpu")


@pytest.fixture(scope="module")
def onnx(torch_encoder: ClipEncoder) -> OnnxClipEncoder:
    folder = model_export.export(torch_encoder)  # what load_encoder does on a cache miss
    assert folder == export_dir(SPEC)
    encoder = load_encoder(SPEC, _settings(backend="onnx"))  # a hit now: no model is built
    assert isinstance(encoder, OnnxClipEncoder)
    return encoder


def _settings(**overrides: object) -> Settings:
    """The settings a command would read from this environment, one thread for the model."""
    return Settings.from_env(threads=1, **overrides)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    sizes = [(224, 224), (300, 301), (640, 480), (97, 1000), (1001, 33), (225, 224)]
    out = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    smooth = np.linspace(0, 255, 480 * 800 * 3).reshape(480, 800, 3).astype(np.uint8)
    out.append(Image.fromarray(smooth))
    return out


def _pixels(torch_encoder: ClipEncoder) -> np.ndarray:
    """open_clip's transform of :func:`_images`: what the torch encoder takes on the CPU (float32)."""
    return np.stack([torch_encoder.preprocess(img) for img in _images()])


def _uint8(onnx: OnnxClipEncoder) -> np.ndarray:
    """:func:`_images` as the exported runtimes take them (uint8)."""
    return np.stack([onnx.preprocess(img) for img in _images()])


def test_interface(onnx: OnnxClipEncoder, torch_encoder: ClipEncoder, tmp_path: Path) -> None:
    assert onnx.spec == SPEC
    assert onnx.dim == torch_encoder.dim == 384
    assert onnx.image_size == torch_encoder.image_size == 224
    assert onnx.draft_side == torch_encoder.draft_side
    # not the export's own recorded parity: open_clip's reference embedding of the same pictures
    from oracle import EXACT_MIN_COSINE, reference

    for i, image in enumerate(_images()):
        path = tmp_path / f"{i}.png"
        image.save(path)
        ours = onnx.encode_images(onnx.preprocess(image)[None])[0]
        assert float(ours @ reference(SPEC.name).embed(path)) >= EXACT_MIN_COSINE, image.size


def test_preprocess_equals_open_clip(onnx: OnnxClipEncoder, torch_encoder: ClipEncoder) -> None:
    """uint8 pixels that, normalised, are open_clip's own preprocessing output."""
    for img in _images():
        ours = onnx.preprocess(img)
        theirs = torch_encoder.preprocess(img)
        assert ours.dtype == np.uint8 and ours.shape == theirs.shape == (3, 224, 224)
        assert np.abs(onnx.normalisation.apply(ours) - theirs).max() < 1e-6


@pytest.mark.parametrize("openvino", [False, True], ids=["onnxruntime", "default"])
def test_image_parity(onnx: OnnxClipEncoder, torch_encoder: ClipEncoder, openvino: bool) -> None:
    """uint8 pixels from preprocess, on both runtimes, give torch's vectors of open_clip's transform."""
    encoder = OnnxClipEncoder(onnx.folder, threads=2, openvino=openvino)
    ours = np.stack([encoder.preprocess(img) for img in _images()])
    theirs = _pixels(torch_encoder)
    for size in (1, 3, len(ours)):
        a = torch_encoder.encode_images(theirs[:size])
        b = encoder.encode_images(ours[:size])
        assert b.dtype == np.float32 and b.shape == (size, 384)
        assert np.abs(a - b).max() < 1e-4
        assert np.allclose(np.linalg.norm(b, axis=1), 1, atol=1e-5)
    assert encoder.encode_images(ours[:0]).shape == (0, 384)  # an empty batch: no vectors, no error
    with pytest.raises(ValueError, match="uint8"):  # the one pixel contract: no float32 input
        encoder.encode_images(theirs[:1])


def test_text_parity_with_full_length_torch(onnx: OnnxClipEncoder, torch_encoder: ClipEncoder) -> None:
    with torch.inference_mode():
        full = torch_encoder.model.encode_text(torch_encoder.tokenize(TEXTS)).numpy()
    full /= np.linalg.norm(full, axis=1, keepdims=True)
    assert np.abs(onnx.encode_texts(TEXTS) - full).max() < 1e-4
    for i in (0, 1, 3):  # alone: trimmed to a few tokens
        assert np.abs(onnx.encode_texts([TEXTS[i]])[0] - full[i]).max() < 1e-4


def test_trimming_gives_the_same_embedding(onnx: OnnxClipEncoder, torch_encoder: ClipEncoder) -> None:
    short = ["a dog", "a photo of a red car at night", ""]
    tokens = torch_encoder.tokenize(short)
    assert trim_padding(tokens.numpy()).shape[1] < 77
    with torch.inference_mode():
        full = torch_encoder.model.encode_text(tokens).numpy()
    full /= np.linalg.norm(full, axis=1, keepdims=True)
    trimmed = torch_encoder.encode_texts(short)  # torch, trimmed
    assert (full * trimmed).sum(1).min() >= 0.9999998
    # ONNX: the same graph at full length and trimmed
    session = onnx.session("text")
    (at77,) = session.run(None, {"tokens": tokens.numpy()})
    (cut,) = session.run(None, {"tokens": trim_padding(tokens.numpy())})
    at77 /= np.linalg.norm(at77, axis=1, keepdims=True)
    cut /= np.linalg.norm(cut, axis=1, keepdims=True)
    assert (at77 * cut).sum(1).min() >= 0.9999998


def test_tokenizer_equals_open_clip(onnx: OnnxClipEncoder) -> None:
    theirs = open_clip.get_tokenizer("ViT-B-32")
    ours = onnx.tokenizer
    rng = random.Random(0)
    texts = list(TEXTS)
    texts += ["".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(60))) for _ in range(300)]
    pool = [(32, 127), (160, 0x2FFF), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F)]
    for _ in range(300):
        texts.append("".join(chr(rng.randrange(*rng.choice(pool))) for _ in range(rng.randrange(40))))
    expected = theirs(texts).numpy()
    got = ours(texts)
    assert got.dtype == np.int64 and got.shape == expected.shape == (len(texts), 77)
    assert (got == expected).all()
    long = ours(["word " * 100])[0]  # truncated to 77 with end-of-text last
    assert long[0] == ours.sot_token_id and long[-1] == ours.eot_token_id


def test_tokenizer_reads_open_clip_gz(onnx: OnnxClipEncoder) -> None:
    from open_clip.tokenizer import default_bpe

    a = ClipTokenizer(default_bpe())(TEXTS)
    assert (a == onnx.tokenizer(TEXTS)).all()


def test_cache_reused_without_export_or_torch(onnx: OnnxClipEncoder, monkeypatch) -> None:
    def no_export(*args, **kwargs):
        raise AssertionError("export called although the cache has it")

    monkeypatch.setattr(model_export, "export", no_export)
    again = load_encoder(SPEC, _settings(backend="auto"))
    assert isinstance(again, OnnxClipEncoder)
    assert again.folder == onnx.folder
    # a fresh process: query path imports neither torch nor open_clip
    script = (
        "import sys\n"
        "from pixfind.config import ModelSpec, Settings\n"
        "from pixfind.models import load_query_encoder\n"
        "enc = load_query_encoder(ModelSpec('ViT-S-32', None), Settings.from_env())\n"
        "v = enc.encode_texts(['a dog'])\n"
        "print(v.shape, 'torch' in sys.modules, 'open_clip' in sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=SRC)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(1,", "384)", "False", "False"]
    encoder = load_query_encoder(SPEC, _settings())
    expected = onnx.encode_texts(["a dog"])
    assert np.abs(encoder.encode_texts(["a dog"]) - expected).max() < 1e-6
    # a query image: the same vector, on one OpenVINO stream with every thread (latency, not throughput)
    image = encoder.preprocess(_images()[2])[None]
    assert np.abs(encoder.encode_images(image) - onnx.encode_images(image)).max() < 1e-4
    assert encoder.image_streams == 1
    if encoder.image_runtime == "openvino":
        assert encoder._run_visual.__self__.streams == 1


def test_no_export_means_no_text_encoder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PIXFIND_CACHE_DIR", str(tmp_path))
    assert load_query_encoder(SPEC, _settings()) is None
    assert OnnxClipEncoder.open(SPEC) is None


def test_export_failure_falls_back_to_torch(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("PIXFIND_CACHE_DIR", str(tmp_path))

    def broken(*args, **kwargs):
        raise RuntimeError("simulated exporter bug")

    monkeypatch.setattr(model_export, "_export", broken)
    said: list[str] = []
    with caplog.at_level("WARNING"):
        encoder = load_encoder(SPEC, _settings(backend="auto"), status=said.append)
    assert isinstance(encoder, ClipEncoder)
    assert said and said[-1].startswith("preparing ViT-S-32 for this CPU, once")  # what a first run waits for
    assert "simulated exporter bug" in caplog.text
    assert not (export_dir(SPEC) / "meta.json").exists()
    assert not list(export_dir(SPEC).parent.glob(".*.tmp"))  # no half-written folder left
    with pytest.raises(Exception, match="simulated exporter bug"):
        load_encoder(SPEC, _settings(backend="onnx"))  # recorded: not retried, reason given


@pytest.mark.parametrize("message", ["", "  \n "])
def test_export_failure_without_a_message_falls_back_to_torch(tmp_path: Path, monkeypatch, message: str) -> None:
    """A blank exception message is reported as its type, not turned into an IndexError."""
    monkeypatch.setenv("PIXFIND_CACHE_DIR", str(tmp_path))

    def broken(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(model_export, "_export", broken)
    assert isinstance(load_encoder(SPEC, _settings(backend="auto")), ClipEncoder)
    with pytest.raises(ModelLoadError, match=r"failed: RuntimeError$"):
        load_encoder(SPEC, _settings(backend="onnx"))


def test_int8_is_opt_in_and_close(onnx: OnnxClipEncoder, torch_encoder: ClipEncoder) -> None:
    int8 = OnnxClipEncoder(onnx.folder, threads=1, int8=True)
    pixels = _uint8(onnx)
    cos = (int8.encode_images(pixels) * onnx.encode_images(pixels)).sum(1)
    assert cos.min() > 0.95
    assert not onnx.int8 and (onnx.folder / "visual.int8.onnx").is_file()


# -- OpenVINO for the image tower --------------------------------------------------------------


@pytest.fixture
def fresh_record(onnx: OnnxClipEncoder) -> Path:
    """Each test starts with no OpenVINO check recorded for the shared export."""
    record = onnx.folder / openvino_runtime.RECORD
    record.unlink(missing_ok=True)
    yield record
    record.unlink(missing_ok=True)


def test_openvino_embeds_images_like_onnxruntime(onnx, torch_encoder, fresh_record, monkeypatch) -> None:
    """Two streams (two threads): batches split evenly or not, and a single image, in the order given."""
    pytest.importorskip("openvino")
    monkeypatch.delenv("PIXFIND_OPENVINO", raising=False)
    images = _images() * 3  # 21: splits 1, 2+1, 4+3 (two streams), 7+7+7 (over CHUNK)
    pixels = np.stack([onnx.preprocess(img) for img in images])
    floats = np.stack([torch_encoder.preprocess(img) for img in images])
    ov = OnnxClipEncoder(onnx.folder, threads=2)
    ort_only = OnnxClipEncoder(onnx.folder, threads=2, openvino=False)
    for size in (1, 3, 7, 21):
        reference = torch_encoder.encode_images(floats[:size])
        a, b = ov.encode_images(pixels[:size]), ort_only.encode_images(pixels[:size])
        assert a.shape == b.shape == (size, 384) and a.dtype == np.float32
        assert np.abs(a - b).max() < 1e-4
        assert np.abs(a - reference).max() < 1e-4
    assert (ov.image_runtime, ort_only.image_runtime) == ("openvino", "onnxruntime")
    assert ov._run_visual.__self__.streams == 2
    assert "visual" not in ov._sessions  # the check's ONNX Runtime session is not kept
    record = json.loads(fresh_record.read_text())
    assert record["checks"]["f32"]["ok"] and record["openvino"] == openvino_runtime.version()

    # checked once: the next encoder trusts the record and never builds an ONNX Runtime session
    again = OnnxClipEncoder(onnx.folder, threads=1)
    monkeypatch.setattr(again, "_make_session", lambda tower: pytest.fail(f"{tower} session built"))
    assert np.abs(again.encode_images(pixels[:2]) - ort_only.encode_images(pixels[:2])).max() < 1e-4
    assert again.image_runtime == "openvino"

    # a record of an older runner (other compiled model or input) is checked afresh
    fresh_record.write_text(json.dumps({**record, "runner": openvino_runtime.RUNNER - 1}))
    older = OnnxClipEncoder(onnx.folder, threads=1)
    calls = []
    real = older.run_visual_ort
    monkeypatch.setattr(older, "run_visual_ort", lambda batch: calls.append(len(batch)) or real(batch))
    older.encode_images(pixels[:1])
    assert calls == [openvino_runtime.PARITY_BATCH] and older.image_runtime == "openvino"
    assert json.loads(fresh_record.read_text())["runner"] == openvino_runtime.RUNNER


def test_openvino_switch_and_int8_stay_on_onnxruntime(onnx, torch_encoder, fresh_record, monkeypatch) -> None:
    pixels = _uint8(onnx)[:2]
    monkeypatch.setenv("PIXFIND_OPENVINO", "0")
    off = load_encoder(SPEC, _settings(backend="onnx"))
    off.encode_images(pixels)
    assert off.image_runtime == "onnxruntime" and not fresh_record.exists()
    monkeypatch.delenv("PIXFIND_OPENVINO")
    int8 = load_encoder(SPEC, _settings(backend="onnx"), int8=True)
    int8.encode_images(pixels)
    assert int8.image_runtime == "onnxruntime"


def test_openvino_mismatch_is_recorded_and_not_used(onnx, torch_encoder, fresh_record, monkeypatch, caplog) -> None:
    pytest.importorskip("openvino")
    monkeypatch.delenv("PIXFIND_OPENVINO", raising=False)
    pixels, floats = _uint8(onnx)[:2], _pixels(torch_encoder)[:2]
    first = OnnxClipEncoder(onnx.folder, threads=1)
    real = first.run_visual_ort
    monkeypatch.setattr(first, "run_visual_ort", lambda batch: real(batch)[:, ::-1].copy())  # a wrong answer
    with caplog.at_level("WARNING"):
        first.encode_images(pixels)
    assert first.image_runtime == "onnxruntime" and "differs from ONNX Runtime" in caplog.text
    assert json.loads(fresh_record.read_text())["checks"]["f32"]["ok"] is False

    # not retried for this OpenVINO version and export: no compile at all
    monkeypatch.setattr(openvino_runtime, "OpenVinoVisual", lambda *a, **k: pytest.fail("compiled again"))
    second = OnnxClipEncoder(onnx.folder, threads=1)
    assert np.abs(second.encode_images(pixels) - torch_encoder.encode_images(floats)).max() < 1e-4
    assert second.image_runtime == "onnxruntime"

    # a new export (other files) is checked afresh
    record = json.loads(fresh_record.read_text())
    fresh_record.write_text(json.dumps({**record, "model": [1, 2]}))
    monkeypatch.undo()
    _f32_cpu(monkeypatch)
    third = OnnxClipEncoder(onnx.folder, threads=1)
    third.encode_images(pixels)
    assert third.image_runtime == "openvino" and json.loads(fresh_record.read_text())["checks"]["f32"]["ok"] is True


def test_openvino_compile_failure_falls_back(onnx, torch_encoder, fresh_record, monkeypatch, caplog) -> None:
    pytest.importorskip("openvino")
    monkeypatch.delenv("PIXFIND_OPENVINO", raising=False)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated plugin failure\nsecond line")

    monkeypatch.setattr(openvino_runtime, "OpenVinoVisual", broken)
    pixels, floats = _uint8(onnx)[:2], _pixels(torch_encoder)[:2]
    encoder = OnnxClipEncoder(onnx.folder, threads=1)
    with caplog.at_level("WARNING"):
        vectors = encoder.encode_images(pixels)
    assert encoder.image_runtime == "onnxruntime" and "simulated plugin failure" in caplog.text
    assert np.abs(vectors - torch_encoder.encode_images(floats)).max() < 1e-4
    assert "compile" in json.loads(fresh_record.read_text())["checks"]["f32"]["reason"]


def test_cuda_asked_for_is_refused_on_the_torch_free_query_path(onnx, index_factory, lite_uri, make_images, tmp_path):  # type: ignore[no-untyped-def]
    """The exported text tower runs on the CPU whatever --device says: an explicit cuda without
    CUDA is refused there too (as indexing refuses it), not quietly run on the CPU."""
    from pixfind.api import ImageIndex
    from pixfind.errors import ModelLoadError

    photos = make_images(tmp_path / "photos", 2)
    with index_factory() as idx:
        idx.add(photos[0].parent)
    with ImageIndex(uri=lite_uri, device="cuda") as fresh:
        assert load_query_encoder(fresh.model_spec(), fresh.settings) is not None  # the torch-free path is there
        if torch.cuda.is_available():
            assert len(fresh.search("a dog")) == 2
        else:
            with pytest.raises(ModelLoadError, match="CUDA is not available"):
                fresh.search("a dog")
