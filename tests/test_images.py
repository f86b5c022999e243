from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import draw_photo
from PIL import Image

from pixfind.ingest.decode import ImageLoadError, has_image_extension, load_image, to_rgb


def test_extensions_are_case_insensitive() -> None:
    for name in ["a.jpg", "b.JPEG", "c.Png", "d.webp", "e.GIF", "f.bmp", "g.tif", "h.TIFF"]:
        assert has_image_extension(name)
    for name in ["a.txt", "jpg", ".jpg", "a.jpg.bak", "a.heic"]:
        assert not has_image_extension(name)


def test_modes_convert_to_rgb(tmp_path: Path) -> None:
    base = draw_photo(1, (64, 48))
    rgba = base.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: must come out white, not black
    assert to_rgb(rgba).getpixel((5, 5)) == (255, 255, 255)
    assert to_rgb(base.convert("L")).mode == "RGB"
    assert to_rgb(base.convert("CMYK")).mode == "RGB"
    assert to_rgb(base.convert("P")).mode == "RGB"
    assert to_rgb(base.convert("1")).mode == "RGB"
    la = base.convert("LA")
    assert to_rgb(la).mode == "RGB"


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = (np.linspace(0, 65535, 64 * 32).reshape(32, 64)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)  # Pillow picks I;16 for uint16
    loaded = np.asarray(load_image(path).image)
    assert loaded.shape == (32, 64, 3)
    assert loaded[0, 0, 0] == 0 and loaded[-1, -1, 0] == 255
    assert 100 < loaded[16, 0, 0] < 160  # the middle of the ramp stays mid-grey


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = draw_photo(2, (80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    loaded = load_image(path)
    assert loaded.image.size == (40, 80)
    assert (loaded.width, loaded.height) == (40, 80)


def test_draft_keeps_the_short_side_above_the_minimum(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    draw_photo(3, (2400, 1600)).save(path, quality=90)
    loaded = load_image(path, min_side=448)
    assert min(loaded.image.size) >= 448
    assert min(loaded.image.size) < 1600  # actually reduced
    assert (loaded.width, loaded.height) == (2400, 1600)  # the original size is reported
    png = tmp_path / "big.png"
    draw_photo(3, (2000, 1000)).save(png)
    assert min(load_image(png, min_side=448).image.size) >= 448


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [draw_photo(i, (40, 30)).convert("P") for i in range(3)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert load_image(path).image.size == (40, 30)


def _png_header_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.jpg", b"", "empty file"),
        ("text.jpg", b"this is not a picture at all", "not an image"),
        ("bomb.png", _png_header_claiming(100_000, 100_000), "too large"),
    ],
)
def test_bad_files_give_reasons(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageLoadError) as caught:
        load_image(path)
    assert reason in caught.value.reason


def test_truncated_jpeg(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    draw_photo(4, (300, 200)).save(good)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageLoadError) as caught:
        load_image(cut)
    assert "truncated" in caught.value.reason


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="vanished"):
        load_image(tmp_path / "nope.jpg")
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(folder)
