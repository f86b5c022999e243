"""The GPU decode path (``--decode``), run on the CPU: torchvision's ``decode_jpeg`` takes the
device as a parameter, so routing, orientation, resizing, batching and fallbacks run here as they
do on a GPU (only nvJPEG itself needs one: benchmarks/gpu.py).

Oracles: open_clip's own reference encoding of the picture a file shows (tests/oracle.py), Pillow's
``ImageOps.exif_transpose`` for orientation, the test's own knowledge of each file it made, and
the CPU path's report for files that cannot be decoded (what a run said before this path).
"""

from __future__ import annotations

import calendar
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_MODEL, draw_photo
from docs_figures import find, number
from oracle import check_index
from PIL import Image, ImageOps

from pixfind.cli.app import main
from pixfind.config import ModelSpec
from pixfind.errors import PixfindError
from pixfind.ingest.gpu_decode import GpuDecoder, decoder_for, gpu_header, orient
from pixfind.ingest.runner import Indexer
from pixfind.pathkeys import key_of
from pixfind.render import summary_lines
from pixfind.store import Store

# -- files made for the tests ------------------------------------------------------------------


def jpeg_bytes(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def with_orientation(image: Image.Image, orientation: int, **options: object) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(image, exif=exif.tobytes(), **options)


def truncated(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def broken_huffman(data: bytes) -> bytes:
    """A JPEG whose Huffman table is garbage: header intact, every decoder fails on the data."""
    table = data.find(b"\xff\xc4")
    return data[: table + 10] + b"\xff" * 20 + data[table + 30 :]


def without_adobe_marker(data: bytes) -> bytes:
    """The JPEG with its Adobe APP14 segment cut out (Pillow writes one into every CMYK JPEG)."""
    start = data.index(b"\xff\xee")
    length = int.from_bytes(data[start + 2 : start + 4], "big")
    return data[:start] + data[start + 2 + length :]


def with_adobe_rgb_marker(data: bytes) -> bytes:
    """A 3-component JPEG marked as stored in RGB (Adobe APP14, transform 0), not YCbCr."""
    segment = b"Adobe" + (100).to_bytes(2, "big") + bytes(4) + bytes([0])
    return data[:2] + b"\xff\xee" + (len(segment) + 2).to_bytes(2, "big") + segment + data[2:]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


#: name -> (bytes, does the GPU decoder take it). 320x240 and 700x500 stay under the draft size.
def sample_files() -> dict[str, tuple[bytes, bool]]:
    photo, tall = draw_photo(1, (320, 240)), draw_photo(2, (500, 700))
    return {
        "baseline.jpg": (jpeg_bytes(photo), True),
        "progressive.jpg": (jpeg_bytes(draw_photo(3, (400, 300)), progressive=True), True),
        "grey.jpg": (jpeg_bytes(draw_photo(4, (300, 260)).convert("L")), True),
        "rotated6.jpg": (with_orientation(tall, 6), True),
        "rotated8.jpg": (with_orientation(draw_photo(5, (360, 250)), 8), True),
        "mirrored2.jpg": (with_orientation(draw_photo(6, (300, 240)), 2), True),
        "cmyk.jpg": (jpeg_bytes(draw_photo(7, (320, 240)).convert("CMYK")), False),
        "cmyk-no-adobe.jpg": (without_adobe_marker(jpeg_bytes(draw_photo(10, (320, 240)).convert("CMYK"))), False),
        "adobe-rgb.jpg": (with_adobe_rgb_marker(jpeg_bytes(draw_photo(11, (320, 240)))), False),
        "adobe-grey.jpg": (with_adobe_rgb_marker(jpeg_bytes(draw_photo(13, (320, 240)).convert("L"))), True),
        "picture.png": (png_bytes(draw_photo(8, (320, 240))), False),
        "truncated.jpg": (truncated(jpeg_bytes(draw_photo(9, (320, 240)))), False),
        # an end marker before the scan (as an EXIF thumbnail's is), none after it
        "truncated-after-thumbnail.jpg": (
            truncated(jpeg_bytes(draw_photo(12, (320, 240)), comment=b"\xff\xd9")),
            False,
        ),
        "not-an-image.jpg": (b"this is text, not a picture\n", False),
    }


def write_files(folder: Path, files: dict[str, bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(folder / name for name in files)


@pytest.fixture(scope="module")
def device_encoder():  # type: ignore[no-untyped-def]
    """ViT-S-32 with pixfind's random weights, taking uint8 pixels and normalising them itself,
    as the model does on a GPU (the CPU's default is the transform's float32 output)."""
    from pixfind.models.torch_clip import ClipEncoder, configure_threads

    configure_threads(2)
    return ClipEncoder(ModelSpec(SMALL_MODEL, None), "cpu", normalise_on_device=True)


def run_index(folder: Path, uri: str, encoder: object, decode: str, **options: object):  # type: ignore[no-untyped-def]
    with Store(uri) as store:
        indexer = Indexer(store, lambda: encoder, decode=decode, workers=2, batch_size=4, **options)  # type: ignore[arg-type]
        report = indexer.run([str(folder)])
        return report, indexer


# -- routing -----------------------------------------------------------------------------------


def test_each_file_goes_where_it_can_be_decoded() -> None:
    """Baseline, progressive, greyscale and EXIF-rotated JPEGs go to the GPU decoder; CMYK, PNG,
    truncated and non-image files stay on the CPU path, which decodes them or says why not."""
    for name, (data, on_gpu) in sample_files().items():
        assert (gpu_header(data) is not None) == on_gpu, name


def test_a_jpeg_above_the_pixel_limit_stays_on_the_cpu_path() -> None:
    data = jpeg_bytes(draw_photo(1, (1200, 900)))
    assert gpu_header(data, max_pixels=1200 * 900) is not None
    assert gpu_header(data, max_pixels=1200 * 900 - 1) is None


def test_the_documented_size_limit_sends_larger_jpegs_to_the_cpu() -> None:
    """README: "very large (> N MP) files always take the CPU path", with the default limit."""
    (limit,) = find("README.md", r"very large \(> (\d+) MP\) files always take the CPU path")
    width = 4000
    height = int(number(limit) * 1e6) // width
    at_limit, over = Image.new("RGB", (width, height), (90, 120, 30)), Image.new("RGB", (width, height + 1))
    assert gpu_header(jpeg_bytes(at_limit)) is not None
    assert gpu_header(jpeg_bytes(over)) is None


def test_a_trailer_after_the_end_marker_is_not_taken_for_truncation() -> None:
    """Bytes after a JPEG's end (camera trailers, the benchmark's unique copies) are harmless."""
    data = jpeg_bytes(draw_photo(1, (320, 240)))
    assert gpu_header(data + b"trailing bytes after the image") is not None


def test_the_header_gives_the_displayed_size() -> None:
    header = gpu_header(with_orientation(draw_photo(1, (500, 300)), 6))
    assert header is not None and header.orientation == 6
    assert header.displayed == (300, 500)


# -- orientation -------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_is_applied_as_pillow_applies_it(orientation: int) -> None:
    """Exactly Pillow's ``exif_transpose`` on the same decoded pixels (a lossless PNG in memory
    carrying the tag, so the comparison is of pixels, not of two decoders)."""
    rng = np.random.default_rng(orientation)
    stored = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, "PNG", exif=exif.tobytes())
    with Image.open(buffer) as tagged:
        expected = np.asarray(ImageOps.exif_transpose(tagged).convert("RGB")).transpose(2, 0, 1)
    tensor = torch.from_numpy(np.asarray(stored).transpose(2, 0, 1).copy())
    assert np.array_equal(orient(tensor, orientation).numpy(), expected)


# -- choosing the path ---------------------------------------------------------------------------


def test_auto_decodes_on_the_cpu_when_the_model_is_there(device_encoder, small_encoder) -> None:  # type: ignore[no-untyped-def]
    assert decoder_for(device_encoder, "auto") is None  # a CPU model: no GPU to decode on
    assert decoder_for(device_encoder, "cpu", device="cpu") is None
    assert isinstance(decoder_for(device_encoder, "gpu", device="cpu"), GpuDecoder)
    assert decoder_for(small_encoder, "auto", device="cpu") is None  # takes float32 pixels only


def test_decode_gpu_without_a_gpu_model_is_one_clear_refusal(device_encoder, small_encoder) -> None:  # type: ignore[no-untyped-def]
    for encoder in (device_encoder, small_encoder):
        with pytest.raises(PixfindError, match=r"^--decode gpu .*not a CUDA GPU; use --decode auto or cpu$"):
            decoder_for(encoder, "gpu")


def test_cli_refuses_decode_gpu_here_in_one_line(
    make_images, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No CUDA device on this machine: ``--decode gpu`` is refused before a model is loaded or
    anything stored, as ``--device cuda`` is; a bad value is named with the choices."""
    make_images(tmp_path / "photos", 2)
    uri = str(tmp_path / "cli.db")

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before --decode gpu was refused")

    monkeypatch.setattr("pixfind.models.load.load_encoder", no_model)
    for extra in (["--decode", "gpu"], ["--decode", "GPU", "--device", "cpu"]):
        code = main(["index", str(tmp_path / "photos"), "--uri", uri, *extra])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and "--decode gpu" in err and "use --decode auto or cpu" in err
    assert not Path(uri).exists()
    code = main(["index", str(tmp_path / "photos"), "--uri", uri, "--decode", "nvjpeg"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--decode must be one of auto, cpu, gpu, not 'nvjpeg'" in err
    monkeypatch.setenv("PIXFIND_DECODE", "fast")
    code = main(["index", str(tmp_path / "photos"), "--uri", uri])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "PIXFIND_DECODE must be one of" in err


# -- whole runs on the GPU path ----------------------------------------------------------------


def test_gpu_path_stores_the_reference_vector_of_every_file(device_encoder, tmp_path: Path) -> None:
    """Every decodable file stored with open_clip's reference vector for the picture it shows
    (EXIF orientation applied, greyscale as RGB), whichever path decoded it; the JPEGs the GPU
    takes were decoded there, the others on the CPU path; the broken ones reported as the CPU
    path reports them."""
    files = sample_files()
    paths = write_files(tmp_path / "photos", {name: data for name, (data, _) in files.items()})
    uri = str(tmp_path / "gpu.db")
    report, indexer = run_index(tmp_path / "photos", uri, device_encoder, "gpu", decode_device="cpu")
    broken = {"truncated.jpg", "truncated-after-thumbnail.jpg", "not-an-image.jpg"}
    good = [p for p in paths if p.name not in broken]
    check_index(uri, good, model=SMALL_MODEL)
    counts = indexer.gpu_decoder.counts
    assert counts.on_device == sum(on_gpu for _, on_gpu in files.values())
    assert counts.cpu_path == len(good) - counts.on_device
    assert counts.fallback == counts.failed == counts.batch_retries == 0
    # the summary says how many the device decoded, of what was embedded
    assert (report.decoded_on, report.decoded_on_device, report.embedded) == ("cpu", counts.on_device, len(good))
    said = f"decoded on cpu: {counts.on_device} of {len(good)} images (the others on the CPU: not JPEG"
    assert any(line.startswith(said) for line in summary_lines(report))

    cpu_report, _ = run_index(tmp_path / "photos", str(tmp_path / "cpu.db"), device_encoder, "cpu")
    assert cpu_report.decoded_on is None and not any("decoded on" in line for line in summary_lines(cpu_report))
    assert sorted(report.failed) == sorted(cpu_report.failed)
    assert {Path(path).name for path, _ in report.failed} == broken


class RefusingDecoder(GpuDecoder):
    """A GPU decoder that fails on some files as nvJPEG may (a whole batched call fails with
    one of them in it, and the file alone fails again); the rest is the real decoder."""

    refused = "refused-by-gpu"

    def _decode(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        if any(self.refused.encode() in bytes(t.numpy()) for t in data):
            raise RuntimeError("nvjpeg: the batch could not be decoded")
        return super()._decode(data)


def test_one_bad_file_in_a_batch_falls_back_to_the_cpu_alone(
    device_encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batched decode that fails is retried file by file: the good files are still decoded on
    the device, the refused one on the CPU path (stored with its reference vector), and a file
    that no decoder can read is reported with the CPU path's reason."""
    folder = tmp_path / "photos"
    files = {f"good_{i}.jpg": jpeg_bytes(draw_photo(20 + i, (320, 240))) for i in range(5)}
    refused = jpeg_bytes(draw_photo(40, (330, 250)))
    files["refused.jpg"] = refused + RefusingDecoder.refused.encode()  # after the end marker: harmless
    files["broken.jpg"] = broken_huffman(jpeg_bytes(draw_photo(41, (320, 240))))
    write_files(folder, files)
    monkeypatch.setattr(
        "pixfind.ingest.runner.decoder_for",
        lambda encoder, *a: RefusingDecoder("cpu", encoder.image_size, encoder.draft_side),
    )
    uri = str(tmp_path / "gpu.db")
    report, indexer = run_index(folder, uri, device_encoder, "gpu")
    check_index(uri, [folder / name for name in files if name != "broken.jpg"], model=SMALL_MODEL)
    counts = indexer.gpu_decoder.counts
    assert (counts.on_device, counts.fallback, counts.failed) == (5, 1, 1)
    assert counts.batch_retries == 2  # the two batches of 4 holding refused.jpg and broken.jpg
    cpu_report, _ = run_index(folder, str(tmp_path / "cpu.db"), device_encoder, "cpu")
    assert report.failed == cpu_report.failed and [Path(p).name for p, _ in report.failed] == ["broken.jpg"]


def test_large_jpegs_take_the_cpu_draft_path(device_encoder, tmp_path: Path) -> None:
    """Above the pixel limit a JPEG is decoded by the CPU path (reduced in size): its vector is
    still the reference's within the draft tolerance (check_index's bound for such files)."""
    folder = tmp_path / "photos"
    paths = write_files(
        folder,
        {"small.jpg": jpeg_bytes(draw_photo(1, (320, 240))), "large.jpg": jpeg_bytes(draw_photo(2, (1400, 1000)))},
    )
    uri = str(tmp_path / "gpu.db")
    _, indexer = run_index(folder, uri, device_encoder, "gpu", decode_device="cpu", gpu_max_pixels=1_000_000)
    check_index(uri, paths, model=SMALL_MODEL)
    assert (indexer.gpu_decoder.counts.on_device, indexer.gpu_decoder.counts.cpu_path) == (1, 1)


def test_gpu_path_records_what_a_photo_is_as_the_cpu_path_does(device_encoder, tmp_path: Path) -> None:
    """Date taken, camera, type and orientation (the filters' fields) come from the header the
    GPU path reads: the EXIF the test wrote (the oracle), and the CPU path's record, field by field."""
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = draw_photo(3, (240, 320))
    exif = photo.getexif()
    exif[0x010F], exif[0x0110] = "Canon", "Canon EOS 5D"
    exif.get_ifd(0x8769)[0x9003] = "2021:07:04 18:30:00"
    photo.save(folder / "dated.jpg", "JPEG", exif=exif)
    draw_photo(4, (320, 240)).save(folder / "plain.png")
    records = {}
    for decode in ("gpu", "cpu"):
        uri = str(tmp_path / f"{decode}.db")
        _, indexer = run_index(folder, uri, device_encoder, decode, decode_device="cpu")
        with Store(uri) as store:
            keys = {key_of(str(folder / name)): name for name in ("dated.jpg", "plain.png")}
            records[decode] = {keys[key]: row for key, row in store.records_of(list(keys)).items()}
    assert indexer.gpu_decoder is None  # the cpu run
    facts = ("taken", "taken_from", "camera", "camera_terms", "type", "orientation")
    dated = records["gpu"]["dated.jpg"]
    assert (dated["taken_from"], dated["camera"], dated["type"], dated["orientation"]) == (
        "exif",
        "Canon EOS 5D",
        "jpeg",
        "portrait",
    )
    assert dated["taken"] == calendar.timegm((2021, 7, 4, 18, 30, 0, 0, 0, 0))
    assert set(records["cpu"]) == set(records["gpu"]) == {"dated.jpg", "plain.png"}
    for key in records["cpu"]:
        assert {f: records["gpu"][key].get(f) for f in facts} == {f: records["cpu"][key].get(f) for f in facts}
