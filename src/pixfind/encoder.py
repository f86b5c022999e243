"""Where images and queries become vectors: the open_clip model, loaded once, used in batches.

All vectors leave this module L2-normalised, as float32 numpy arrays, so the store's inner
product is the cosine, and callers never touch torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import ModelSpec, cache_dir, cpu_cores, inference_threads
from .errors import ModelLoadError
from .preprocess import clip_normalisation, resize_crop
from .vectors import unit_rows

if TYPE_CHECKING:
    from PIL import Image

#: Seed for ``pretrained=None``: random weights, the same in every process, so an index built
#: with them can be searched later. For offline testing only; the vectors mean nothing.
RANDOM_WEIGHTS_SEED = 0


_DEVICES = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def check_device(requested: str) -> str:
    """``requested`` as a device this machine can run (lower case), else one ModelLoadError line.

    Indexing and every kind of search call this before choosing a model runtime, so an explicit
    ``cuda`` without CUDA is refused by both alike (a text query runs on the CPU either way, and
    once ran there silently). torch is imported only when an NVIDIA driver is present: without
    one, CUDA cannot be there."""
    device = requested.strip().lower()
    if not _DEVICES.fullmatch(device):
        raise ModelLoadError(f"unknown device {requested!r}: choose auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        _check_cuda(device)
    elif device == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ModelLoadError(
                "device mps (--device or PIXFIND_DEVICE): Metal is not available here; use auto or cpu"
            )
    return device


def _check_cuda(device: str) -> None:
    asked = f"device {device} (--device or PIXFIND_DEVICE)"
    fix = "use auto (the CPU when there is no GPU) or cpu"
    if not nvidia_driver_present():
        raise ModelLoadError(f"{asked}: CUDA is not available on this machine (no NVIDIA driver); {fix}")
    import torch

    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "torch cannot use the GPU"
        raise ModelLoadError(f"{asked}: CUDA is not available ({why}); {fix}")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ModelLoadError(f"{asked}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def nvidia_driver_present() -> bool:
    """An NVIDIA driver is loaded: without one CUDA is impossible, and torch (2+ s) need not be asked."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()


def pick_device(requested: str = "auto") -> str:
    device = check_device(requested)
    if device == "auto":
        if not nvidia_driver_present():
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def configure_threads(threads: int | None = None) -> int:
    """Give torch's intra-op pool all cores unless told otherwise; returns the count used."""
    import torch

    count = threads or inference_threads()
    torch.set_num_threads(count)
    return count


class ClipEncoder:
    """An open_clip model with its preprocessing and tokenizer."""

    def __init__(
        self,
        spec: ModelSpec,
        device: str = "auto",
        normalise_on_device: bool | None = None,
        status: Callable[[str], None] | None = None,
    ) -> None:
        """``normalise_on_device``: hand the model uint8 pixels and normalise them where it runs
        (None: on a GPU, when the transform is the standard CLIP one). ``status`` is told when
        weights are being downloaded."""
        import torch

        self.spec = spec
        self.device = pick_device(device)
        self.model, self._transform, self._tokenizer = _load_open_clip(spec, self.device, status)
        self.half = self.device.startswith("cuda")
        if self.half:
            self.model = self.model.half()
        self.model.eval()
        self._torch = torch
        size = getattr(self.model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self._device_norm = self._normalisation_tensors(normalise_on_device)
        self.dim = int(self.encode_texts(["a photo"]).shape[1])
        self._trim_text = can_trim_text(self.model)

    @property
    def draft_side(self) -> int:
        return draft_side_for(self.image_size)

    @property
    def image_precision(self) -> str:
        """What the model computes in: fp16 on CUDA, f32 on the CPU (torch ignores ``PIXFIND_PRECISION``)."""
        return "fp16" if self.half else "f32"

    @property
    def precision_reason(self) -> str:
        return f"torch on {self.device}"

    @property
    def fills_cpu(self) -> bool:
        """Inference keeps every core busy (on the CPU, a torch thread per core)."""
        return self.device == "cpu" and self._torch.get_num_threads() >= cpu_cores()

    def _normalisation_tensors(self, wanted: bool | None) -> tuple[Any, Any] | None:
        """(mean, std) on the model's device, shaped (1, 3, 1, 1), when pixels are normalised there."""
        if wanted is False or (wanted is None and not self.device.startswith("cuda")):
            return None
        found = clip_normalisation(self._transform, self.image_size)
        if found is None:
            return None  # another pipeline: the model's own transform, on the CPU
        torch = self._torch
        mean, std = (torch.tensor(v, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) for v in found)
        return mean, std

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """The model's transform as a CHW array: uint8 (resized and cropped; normalised in
        :meth:`encode_images`, on the device) when the model normalises on its device, else the
        transform's float32 output.

        On a GPU the decode threads are the bottleneck: the float32 half of the transform (torch
        ops run from many threads at once) cut their throughput, and four times the bytes then
        crossed to the GPU (measured in benchmarks/gpu.py)."""
        if self._device_norm is not None:
            return resize_crop(image, self.image_size)
        return self._transform(image).numpy()

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """Embed a batch of preprocessed images (N, 3, H, W) into unit vectors (N, dim): uint8
        pixels from :meth:`preprocess`, or float32 ones already normalised."""
        torch = self._torch
        batch = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
        with torch.inference_mode():
            if batch.dtype == torch.uint8:
                batch = self._normalise(batch)
            if self.half:
                batch = batch.half()
            features = self.model.encode_image(batch)
        return unit_rows(features.float().cpu().numpy())

    def _normalise(self, batch: Any) -> Any:
        if self._device_norm is None:
            raise ValueError("uint8 pixels given to a model that expects its transform's float32 output")
        mean, std = self._device_norm
        return (batch.float() / 255.0 - mean) / std

    def tokenize(self, texts: list[str]) -> Any:
        return self._tokenizer(texts)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Embed text queries into unit vectors (N, dim).

        CLIP's text tower pools at the end-of-text token and masks attention causally, so the
        padding after the longest real prompt cannot change the result: it is cut off, which
        makes a short query about 2x cheaper (equality is checked in the tests).
        """
        torch = self._torch
        tokens = self._tokenizer(texts).to(self.device)
        with torch.inference_mode():
            if getattr(self, "_trim_text", False):
                features = encode_text_trimmed(self.model, trim_padding(tokens))
            else:
                features = self.model.encode_text(tokens)
        return unit_rows(features.float().cpu().numpy())


def can_trim_text(model: Any) -> bool:
    """True for the classic CLIP text tower: causal mask, pooled at the EOT (argmax) token."""
    return (
        getattr(model, "text_pool_type", None) == "argmax"
        and getattr(model, "attn_mask", None) is not None
        and hasattr(model, "positional_embedding")
        and hasattr(model, "token_embedding")
    )


def encode_text_trimmed(model: Any, tokens: Any) -> Any:
    """open_clip's ``CLIP.encode_text`` on a shortened context (positions and mask sliced)."""
    import torch
    from open_clip.transformer import text_global_pool

    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, "argmax")
    projection = model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection


def trim_padding(tokens: Any) -> Any:
    """Drop trailing columns that are padding (id 0) in every row."""
    used = (tokens != 0).any(dim=0).nonzero()
    if len(used) == 0:
        return tokens
    return tokens[:, : int(used[-1]) + 1]


def draft_side_for(image_size: int) -> int:
    """Shortest side to decode images at. 1.5x the model's input keeps the embedding at cosine
    ≥ 0.998 to full decoding on real photos (docs/speed.md) and decodes 1.3x faster than 2x."""
    return 3 * image_size // 2


def known_models() -> list[str]:
    """open_clip's architectures, read from its config files: importing open_clip would import
    torch (seconds and ~700 MB) just to check a name."""
    import importlib.util

    found = importlib.util.find_spec("open_clip")
    folders = list(found.submodule_search_locations or []) if found else []
    names = {p.stem for folder in folders for p in (Path(folder) / "model_configs").glob("*.json")}
    if not names:  # an unusual install: ask open_clip itself
        names = set(import_open_clip().list_models())
    return sorted(names)


def check_model_name(spec: ModelSpec) -> None:
    """Refuse an architecture open_clip does not know, or a checkpoint that is not a file, before
    any work is done."""
    if spec.checkpoint:
        check_checkpoint_path(spec.checkpoint)
    if spec.name.startswith("hf-hub:"):
        return  # resolved by open_clip from the hub when loaded
    names = known_models()
    if spec.name not in names:
        close = [m for m in names if m.lower().startswith(spec.name.lower()[:5])][:5]
        hint = ", ".join(close) if close else "ViT-B-32, ViT-B-16, ViT-L-14"
        raise ModelLoadError(f"unknown model {spec.name!r}: choose an open_clip architecture such as {hint}")


def _load_open_clip(spec: ModelSpec, device: str, status: Callable[[str], None] | None = None) -> tuple[Any, Any, Any]:
    open_clip = import_open_clip()
    import torch

    check_model_name(spec)
    if spec.checkpoint:
        check_checkpoint_path(spec.checkpoint)
        pretrained: str | None = spec.checkpoint
    else:
        pretrained = spec.pretrained
        if pretrained and pretrained not in open_clip.list_pretrained_tags_by_model(spec.name):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec.name)) or "none"
            raise ModelLoadError(
                f"no weights {pretrained!r} for {spec.name}: choose --pretrained from {tags}, or --checkpoint FILE"
            )
    weights_dir = cache_dir() / "weights"
    if pretrained and not spec.checkpoint and not _fail_fast_when_offline(spec, weights_dir) and status:
        status(f"downloading the weights of {spec.describe()}, once")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model, _, transform = _quietly(
                open_clip.create_model_and_transforms,
                spec.name,
                pretrained=pretrained,
                device=device,
                cache_dir=str(weights_dir),
            )
    except ModelLoadError:
        raise
    except Exception as exc:
        if spec.checkpoint:
            problem = checkpoint_problem(Path(spec.checkpoint), spec.name) or _first_sentence(exc)
            raise ModelLoadError(
                f"cannot load checkpoint {spec.checkpoint}: {problem}; "
                f"give {spec.name}'s state_dict, saved by torch.save or safetensors"
            ) from exc
        raise ModelLoadError(
            f"cannot get weights for {spec.describe()} ({_first_sentence(exc)}): connect to the "
            f"internet once, or pass --checkpoint FILE, or place them in {weights_dir}; "
            "for an offline test run set PIXFIND_PRETRAINED=none (random weights)"
        ) from exc
    tokenizer = open_clip.get_tokenizer(spec.name, cache_dir=str(weights_dir))
    return model, transform, tokenizer


def import_open_clip() -> Any:
    """open_clip (and with it torch and torchvision), or one line saying how the install is broken.

    The usual break is a CPU torch beside PyPI's torchvision, a CUDA build: importing it fails
    with "operator torchvision::nms does not exist" (or a missing libc10_cuda.so), which says
    nothing about the fix."""
    from importlib.metadata import version

    try:
        import open_clip
    except ImportError as exc:
        raise ModelLoadError(
            f"cannot import open_clip ({_first_sentence(exc)}): reinstall pixfind's dependencies (pip install -e .)"
        ) from exc
    except Exception as exc:  # torchvision's compiled operators failed to register
        try:
            versions = f"torch {version('torch')} and torchvision {version('torchvision')}"
        except Exception:
            versions = "torch and torchvision"
        raise ModelLoadError(
            f"{versions} do not work together ({_first_sentence(exc)}): install both from one index, e.g. "
            "pip install --force-reinstall torch torchvision --index-url https://download.pytorch.org/whl/cpu"
        ) from exc
    return open_clip


def check_checkpoint_path(checkpoint: str) -> None:
    """Refuse a checkpoint that is not a file at once (before any scan or model load); a folder
    downloaded from a model hub holds the file to give."""
    path = Path(checkpoint)
    if path.is_dir():
        inside = [path / name for name in _WEIGHT_FILES if (path / name).is_file()]
        hint = f": pass {inside[0]}" if inside else ": give the weights file"
        raise ModelLoadError(f"checkpoint {checkpoint} is a folder{hint}")
    if not path.is_file():
        raise ModelLoadError(f"checkpoint file not found: {checkpoint}")


def checkpoint_problem(path: Path, name: str) -> str | None:
    """What is wrong with a weights file open_clip could not load into ``name``, in a few words,
    found by reading it the way open_clip does (None when nothing is found). Called after a
    failure only: it builds the architecture once more to compare the weights' names and shapes."""
    import torch

    if path.stat().st_size == 0:
        return "the file is empty"
    if path.suffix == ".safetensors":  # open_clip reads these with safetensors, by suffix
        from safetensors.torch import load_file

        try:
            weights = load_file(str(path))
        except Exception:
            return "not a safetensors file"
    else:
        with path.open("rb") as fh:
            head = fh.read(64)
        if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save: zip, or a pickle
            return "not a torch or safetensors weights file" + _looks_like(head)
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:
            return (
                "it holds Python objects besides tensors, which pixfind does not load (a weights file "
                "could run code), or it is damaged"
            )
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict):
            return f"it holds a {type(loaded).__name__}, not a state dict"
        weights = {str(key).removeprefix("module."): value for key, value in loaded.items()}
    return _weights_mismatch(weights, name)


def _weights_mismatch(weights: dict[str, Any], name: str) -> str | None:
    open_clip = import_open_clip()

    expected = _quietly(open_clip.create_model, name, pretrained=None).state_dict()
    missing = [key for key in expected if key not in weights]
    foreign = [key for key in weights if key not in expected]
    if missing or foreign:
        parts = []
        if missing:
            share = (
                f"all {len(expected)} of its"
                if len(missing) == len(expected)
                else f"{len(missing)} of its {len(expected)}"
            )
            parts.append(f"{share} weights are missing (e.g. {missing[0]!r})")
        if foreign:
            verb = "is" if len(foreign) == 1 else "are"
            parts.append(f"{len(foreign)} {verb} not its own (e.g. {foreign[0]!r})")
        return f"not an open_clip state dict for {name}: " + ", ".join(parts)
    for key, tensor in expected.items():
        found = tuple(getattr(weights[key], "shape", ()))
        if found != tuple(tensor.shape):
            return (
                f"weights of another size: {key!r} is {found} in the file, {tuple(tensor.shape)} in the model "
                "(a checkpoint for another --model?)"
            )
    return None


def _looks_like(head: bytes) -> str:
    """`` (it is text: "...")`` for a text file, else nothing: what the user gave by mistake."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    if not text.isprintable() and not all(c.isprintable() or c in "\n\r\t" for c in text):
        return ""
    sample = " ".join(text.split())[:40]
    return f" (it is text: {sample!r})"


_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _fail_fast_when_offline(spec: ModelSpec, weights_dir: Path) -> bool:
    """Without a network, open_clip spends ~45 s in download retries before failing. When the
    weights are not cached and the hub cannot be reached in a few seconds, say so at once.
    Returns whether the weights are cached (False: they will be downloaded)."""
    open_clip = import_open_clip()

    config = open_clip.get_pretrained_cfg(spec.name, spec.pretrained or "")
    hub_id = (config.get("hf_hub") or "").rstrip("/")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in _WEIGHT_FILES:
            for folder in (str(weights_dir), None):
                if isinstance(try_to_load_from_cache(hub_id, filename, cache_dir=folder), str):
                    return True
        host = "huggingface.co"
    else:
        url = config.get("url", "")
        if url and (weights_dir / os.path.basename(url)).exists():
            return True
        host = url.split("/")[2] if url.count("/") >= 2 else ""
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") or not _reachable(host):
        raise ModelLoadError(
            f"weights for {spec.describe()} are not cached and {host or 'the model hub'} cannot be reached: "
            f"connect to the internet once, or pass --checkpoint FILE, or place them in {weights_dir}; "
            "for an offline test run set PIXFIND_PRETRAINED=none (random weights)"
        )
    return False


def _reachable(host: str, timeout: float = 3.0) -> bool:
    import socket

    if not host:
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _quietly(func: Any, *args: Any, **kwargs: Any) -> Any:
    """open_clip logs a warning for random weights; pixfind says so itself where it matters."""
    import logging

    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)
    try:
        return func(*args, **kwargs)
    finally:
        root.setLevel(previous)


def _first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type's name when it has none), shortened."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def _first_sentence(exc: BaseException, limit: int = 200) -> str:
    """The first sentence of an exception's first line, whole: torch's messages run for
    paragraphs, and a line cut at a fixed width ended mid-word ("Re-running `torch.")."""
    line = _first_line(exc, limit=10_000)
    end = line.find(". ")
    sentence = line[: end + 1] if end > 0 else line
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0] + " ..."
    return sentence
