"""Parity: what pixfind stores equals open_clip's own embedding of the same picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from conftest import SMALL_MODEL, draw_photo
from PIL import Image, ImageOps

from pixfind.config import ModelSpec
from pixfind.errors import ModelLoadError
from pixfind.ingest.decode import load_image
from pixfind.models.tokenizer import trim_padding
from pixfind.models.torch_clip import ClipEncoder


def reference_image_vector(encoder: ClipEncoder, image: Image.Image) -> np.ndarray:
    """open_clip's documented path: encode_image(preprocess(img)), normalised."""
    with torch.inference_mode():
        features = encoder.model.encode_image(encoder._transform(image)[None])
    return torch.nn.functional.normalize(features, dim=-1)[0].numpy()


def pixfind_image_vector(encoder: ClipEncoder, path: Path, min_side: int | None = None) -> np.ndarray:
    loaded = load_image(path, min_side=min_side)
    return encoder.encode_images(encoder.preprocess(loaded.image)[None])[0]


def _write_cases(folder: Path) -> dict[str, tuple[Path, Image.Image]]:
    """Files in several formats, each with the picture open_clip should see."""
    photo = draw_photo(7, (300, 200))
    cases: dict[str, tuple[Path, Image.Image]] = {}
    jpeg = folder / "photo.jpg"
    photo.save(jpeg, quality=92)
    cases["jpeg"] = (jpeg, Image.open(jpeg).convert("RGB"))

    rgba = photo.convert("RGBA")
    alpha = Image.linear_gradient("L").resize(photo.size)
    rgba.putalpha(alpha)
    png = folder / "alpha.png"
    rgba.save(png)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    cases["png-alpha"] = (png, Image.alpha_composite(white, Image.open(png)).convert("RGB"))

    gif = folder / "palette.gif"
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(gif)
    cases["gif-palette"] = (gif, Image.open(gif).convert("RGB"))

    gray = folder / "gray.png"
    photo.convert("L").save(gray)
    cases["grayscale"] = (gray, Image.open(gray).convert("RGB"))

    rotated = folder / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 8
    photo.save(rotated, exif=exif, quality=92)
    cases["exif-rotated"] = (rotated, ImageOps.exif_transpose(Image.open(rotated)).convert("RGB"))
    return cases


def test_image_vectors_match_open_clip(small_encoder: ClipEncoder, tmp_path: Path) -> None:
    for name, (path, picture) in _write_cases(tmp_path).items():
        ours = pixfind_image_vector(small_encoder, path, min_side=None)
        reference = reference_image_vector(small_encoder, picture)
        assert np.abs(ours - reference).max() < 1e-5, name
        assert abs(np.linalg.norm(ours) - 1) < 1e-5


def test_text_vectors_match_open_clip_and_trimming_changes_nothing(small_encoder: ClipEncoder) -> None:
    texts = ["a white dog", "a photo of a cat sitting on a red sofa in the sun", "x", "日本の桜 🌸", "word " * 100]
    assert small_encoder.text_tower is not None  # ViT-S-32's text tower takes trimmed rows
    ours = small_encoder.encode_texts(texts)
    tokens = small_encoder.tokenize(texts)
    assert trim_padding(tokens.numpy()).shape[1] == 77  # the long text fills the context: nothing to trim
    with torch.inference_mode():
        full = torch.nn.functional.normalize(small_encoder.model.encode_text(tokens), dim=-1).numpy()
    assert np.abs(ours - full).max() < 1e-5
    short = small_encoder.encode_texts(["a white dog"])
    assert small_encoder.tokenize(["a white dog"]).shape[1] == 77
    assert trim_padding(small_encoder.tokenize(["a white dog"]).numpy()).shape[1] < 10
    cosine = float(short[0] @ full[0])
    assert cosine > 0.9999998


def test_random_weights_are_the_same_in_every_load(small_encoder: ClipEncoder) -> None:
    again = ClipEncoder(ModelSpec(SMALL_MODEL, None), "cpu")
    assert np.array_equal(again.encode_texts(["same"]), small_encoder.encode_texts(["same"]))


def test_draft_decoding_stays_close_to_exact(small_encoder: ClipEncoder, tmp_path: Path) -> None:
    path = tmp_path / "large.jpg"
    draw_photo(11, (2400, 1800)).save(path, quality=90)
    exact = pixfind_image_vector(small_encoder, path, None)
    draft = pixfind_image_vector(small_encoder, path, small_encoder.draft_side)
    assert float(exact @ draft) >= 0.995


def test_checkpoint_files_load(small_encoder: ClipEncoder, tmp_path: Path) -> None:
    checkpoint = tmp_path / "weights.pt"
    torch.save(small_encoder.model.state_dict(), checkpoint)
    loaded = ClipEncoder(ModelSpec(SMALL_MODEL, None, str(checkpoint)), "cpu")
    assert np.allclose(loaded.encode_texts(["dog"]), small_encoder.encode_texts(["dog"]), atol=1e-6)


def test_clear_errors_for_bad_models(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown model"):
        ClipEncoder(ModelSpec("ViT-Nope-99", None), "cpu")
    with pytest.raises(ModelLoadError, match="no weights 'nonsense'"):
        ClipEncoder(ModelSpec(SMALL_MODEL, "nonsense"), "cpu")
    with pytest.raises(ModelLoadError, match="checkpoint file not found"):
        ClipEncoder(ModelSpec(SMALL_MODEL, None, str(tmp_path / "missing.pt")), "cpu")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match=r"cannot load checkpoint .*garbage\.pt"):
        ClipEncoder(ModelSpec(SMALL_MODEL, None, str(garbage)), "cpu")


def _bad_checkpoints(folder: Path, small_encoder: ClipEncoder) -> dict[str, tuple[Path, str]]:
    """Files a user may pass as --checkpoint by mistake, with what the error must say of each."""
    import pickle

    from safetensors.torch import save_file

    cases: dict[str, tuple[Path, str]] = {}
    notes = folder / "notes.txt"
    notes.write_text("my notes about the holiday photos\n")
    cases["text"] = (notes, "not a torch or safetensors weights file")
    empty = folder / "empty.pt"
    empty.write_bytes(b"")
    cases["empty"] = (empty, "is empty")
    listed = folder / "list.pt"
    torch.save([1, 2, 3], listed)
    cases["not a dict"] = (listed, "holds a list, not a state dict")
    objects = folder / "objects.pkl"
    objects.write_bytes(pickle.dumps({"when": Path("/x")}))
    cases["python objects"] = (objects, "Python objects")
    other_keys = folder / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, other_keys)
    expected = len(small_encoder.model.state_dict())
    cases["other keys"] = (other_keys, f"not an open_clip state dict for {SMALL_MODEL}: all {expected} of its weights")
    other_model = folder / "rn50.safetensors"
    save_file(open_clip.create_model("RN50", pretrained=None).state_dict(), other_model)
    cases["another architecture"] = (other_model, f"not an open_clip state dict for {SMALL_MODEL}")
    resized = folder / "resized.pt"
    weights = small_encoder.model.state_dict()
    weights["text_projection"] = torch.zeros(7, 7)
    torch.save(weights, resized)
    cases["another size"] = (resized, "'text_projection' is (7, 7) in the file, (384, 384) in the model")
    fake = folder / "fake.safetensors"
    fake.write_bytes(b"garbage, not safetensors")
    cases["fake safetensors"] = (fake, "not a safetensors file")
    cases["folder"] = (folder, "is a folder")
    return cases


def test_bad_checkpoints_say_what_the_file_is(small_encoder: ClipEncoder, tmp_path: Path) -> None:
    for case, (path, expected) in _bad_checkpoints(tmp_path, small_encoder).items():
        with pytest.raises(ModelLoadError) as caught:
            ClipEncoder(ModelSpec(SMALL_MODEL, None, str(path)), "cpu")
        message = str(caught.value)
        assert expected in message, (case, message)
        assert str(path) in message and "\n" not in message, (case, message)
        assert len(message.replace(str(path), "FILE")) < 300, (case, message)  # not torch's essay, cut
        assert "Re-running" not in message, (case, message)


def test_offline_download_failure_names_the_ways_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tags = open_clip.list_pretrained_tags_by_model("ViT-B-32")
    assert "openai" in tags
    with pytest.raises(ModelLoadError) as caught:
        ClipEncoder(ModelSpec("ViT-B-32", "openai"), "cpu")
    message = str(caught.value)
    assert "--checkpoint" in message and "PIXFIND_PRETRAINED=none" in message
    assert "\n" not in message


@pytest.fixture(scope="module")
def device_normalising_encoder() -> ClipEncoder:
    """The GPU's preprocessing path (uint8 pixels, normalised where the model runs), on the CPU."""
    return ClipEncoder(ModelSpec(SMALL_MODEL, None), "cpu", normalise_on_device=True)


def test_pixels_normalised_on_the_device_give_open_clips_vectors(
    device_normalising_encoder: ClipEncoder, small_encoder: ClipEncoder, tmp_path: Path
) -> None:
    encoder = device_normalising_encoder
    for name, (path, picture) in _write_cases(tmp_path).items():
        pixels = encoder.preprocess(load_image(path).image)
        assert pixels.dtype == np.uint8 and pixels.shape == (3, encoder.image_size, encoder.image_size), name
        ours = encoder.encode_images(pixels[None])[0]
        reference = reference_image_vector(small_encoder, picture)
        assert np.abs(ours - reference).max() < 1e-5, name
    # the transform's float32 output is still accepted (and gives the same vector)
    picture = draw_photo(3, (517, 233))
    from_uint8 = encoder.encode_images(encoder.preprocess(picture)[None])
    from_float = encoder.encode_images(small_encoder.preprocess(picture)[None])
    assert np.abs(from_uint8 - from_float).max() < 1e-5


def test_uint8_pixels_need_a_model_that_normalises_them(small_encoder: ClipEncoder) -> None:
    assert small_encoder.preprocess(draw_photo(1, (64, 48))).dtype == np.float32  # CPU default
    with pytest.raises(ValueError, match="uint8"):
        small_encoder.encode_images(np.zeros((1, 3, 224, 224), dtype=np.uint8))


def test_only_the_standard_clip_transform_is_split(small_encoder: ClipEncoder) -> None:
    from torchvision import transforms as T

    from pixfind.models.pixels import clip_normalisation

    size = small_encoder.image_size
    found = clip_normalisation(small_encoder._transform, size)
    assert found is not None and len(found.mean) == 3 and len(found.std) == 3
    assert clip_normalisation(small_encoder._transform, size + 32) is None
    steps = small_encoder._transform.transforms
    squashed = T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), *steps[1:]])
    assert clip_normalisation(squashed, size) is None
    bilinear = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BILINEAR), *steps[1:]])
    assert clip_normalisation(bilinear, size) is None
    assert clip_normalisation(T.Compose([*steps, T.RandomHorizontalFlip()]), size) is None


def test_an_rgb_step_anywhere_is_allowed(small_encoder: ClipEncoder) -> None:
    """Older open_clip converts to RGB with a plain function, placed before or after the crop."""
    from torchvision import transforms as T

    from pixfind.models.pixels import clip_normalisation

    def _convert_to_rgb(image: Image.Image) -> Image.Image:
        return image.convert("RGB")

    size = small_encoder.image_size
    expected = clip_normalisation(small_encoder._transform, size)
    assert expected is not None
    resize, crop, *rest = [s for s in small_encoder._transform.transforms if type(s).__name__ != "MaybeConvertMode"]
    for steps in ([_convert_to_rgb, resize, crop, *rest], [resize, crop, _convert_to_rgb, *rest]):
        assert clip_normalisation(T.Compose(steps), size) == expected


def test_torch_and_torchvision_that_do_not_match_are_one_line(make_images, tmp_path: Path) -> None:
    """A CPU torch beside PyPI's (CUDA) torchvision fails inside open_clip's import with
    "operator torchvision::nms does not exist". Simulated by an open_clip that fails the same way,
    ahead of the real one on the path: the command names the fix instead of an internal error."""
    import os
    import subprocess
    import sys

    shim = tmp_path / "shim" / "open_clip"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    make_images(tmp_path / "photos", 1)
    src = str(Path(__file__).resolve().parent.parent / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shim"), src]), "PIXFIND_BACKEND": "torch"}
    result = subprocess.run(
        [sys.executable, "-m", "pixfind", "index", str(tmp_path / "photos"), "--uri", str(tmp_path / "i.db")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "internal error" not in result.stderr, result.stderr
    assert "do not work together (operator torchvision::nms does not exist)" in result.stderr
    assert "pip install --force-reinstall torch torchvision" in result.stderr
