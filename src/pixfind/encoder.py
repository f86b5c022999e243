"""Where images and queries become vectors: the open_clip model, loaded once, used in batches.

All vectors leave this module L2-normalised, as float32 numpy arrays, so the store's inner
product is the cosine, and callers never touch torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import ModelSpec, cache_dir, cpu_cores, inference_threads
from .errors import ModelLoadError
from .preprocess import clip_normalisation, resize_crop

if TYPE_CHECKING:
    from PIL import Image

#: Seed for ``pretrained=None``: random weights, the same in every process, so an index built
#: with them can be searched later. For offline testing only; the vectors mean nothing.
RANDOM_WEIGHTS_SEED = 0


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {requested!r} requested but CUDA is not available: use --device cpu")
    return requested


def configure_threads(threads: int | None = None) -> int:
    """Give torch's intra-op pool all cores unless told otherwise; returns the count used."""
    import torch

    count = threads or inference_threads()
    torch.set_num_threads(count)
    return count


class ClipEncoder:
    """An open_clip model with its preprocessing and tokenizer."""

    def __init__(self, spec: ModelSpec, device: str = "auto", normalise_on_device: bool | None = None) -> None:
        """``normalise_on_device``: hand the model uint8 pixels and normalise them where it runs
        (None: on a GPU, when the transform is the standard CLIP one)."""
        import torch

        self.spec = spec
        self.device = pick_device(device)
        self.model, self._transform, self._tokenizer = _load_open_clip(spec, self.device)
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
        return normalise_rows(features.float().cpu().numpy())

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
        return normalise_rows(features.float().cpu().numpy())


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


def normalise_rows(features: np.ndarray) -> np.ndarray:
    """Unit-length float32 rows: every vector pixfind stores or queries with."""
    features = features.astype(np.float32, copy=False)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return (features / np.maximum(norms, 1e-12)).astype(np.float32)


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
        import open_clip

        names = set(open_clip.list_models())
    return sorted(names)


def check_model_name(spec: ModelSpec) -> None:
    """Refuse an architecture open_clip does not know, before any work is done."""
    if spec.name.startswith("hf-hub:"):
        return  # resolved by open_clip from the hub when loaded
    names = known_models()
    if spec.name not in names:
        close = [m for m in names if m.lower().startswith(spec.name.lower()[:5])][:5]
        hint = ", ".join(close) if close else "ViT-B-32, ViT-B-16, ViT-L-14"
        raise ModelLoadError(f"unknown model {spec.name!r}: choose an open_clip architecture such as {hint}")


def _load_open_clip(spec: ModelSpec, device: str) -> tuple[Any, Any, Any]:
    import open_clip
    import torch

    check_model_name(spec)
    if spec.checkpoint:
        if not Path(spec.checkpoint).is_file():
            raise ModelLoadError(f"checkpoint file not found: {spec.checkpoint}")
        pretrained: str | None = spec.checkpoint
    else:
        pretrained = spec.pretrained
        if pretrained and pretrained not in open_clip.list_pretrained_tags_by_model(spec.name):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec.name)) or "none"
            raise ModelLoadError(
                f"no weights {pretrained!r} for {spec.name}: choose --pretrained from {tags}, or --checkpoint FILE"
            )
    weights_dir = cache_dir() / "weights"
    if pretrained and not spec.checkpoint:
        _fail_fast_when_offline(spec, weights_dir)
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
            raise ModelLoadError(
                f"cannot load checkpoint {spec.checkpoint} into {spec.name}: {_first_line(exc)}"
            ) from exc
        raise ModelLoadError(
            f"cannot get weights for {spec.describe()} ({_first_line(exc)}): connect to the "
            f"internet once, or pass --checkpoint FILE, or place them in {weights_dir}; "
            "for an offline test run set PIXFIND_PRETRAINED=none (random weights)"
        ) from exc
    tokenizer = open_clip.get_tokenizer(spec.name, cache_dir=str(weights_dir))
    return model, transform, tokenizer


_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _fail_fast_when_offline(spec: ModelSpec, weights_dir: Path) -> None:
    """Without a network, open_clip spends ~45 s in download retries before failing. When the
    weights are not cached and the hub cannot be reached in a few seconds, say so at once."""
    import open_clip

    config = open_clip.get_pretrained_cfg(spec.name, spec.pretrained or "")
    hub_id = (config.get("hf_hub") or "").rstrip("/")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in _WEIGHT_FILES:
            for folder in (str(weights_dir), None):
                if isinstance(try_to_load_from_cache(hub_id, filename, cache_dir=folder), str):
                    return
        host = "huggingface.co"
    else:
        url = config.get("url", "")
        if url and (weights_dir / os.path.basename(url)).exists():
            return
        host = url.split("/")[2] if url.count("/") >= 2 else ""
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") or not _reachable(host):
        raise ModelLoadError(
            f"weights for {spec.describe()} are not cached and {host or 'the model hub'} cannot be reached: "
            f"connect to the internet once, or pass --checkpoint FILE, or place them in {weights_dir}; "
            "for an offline test run set PIXFIND_PRETRAINED=none (random weights)"
        )


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
