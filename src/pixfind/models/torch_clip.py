"""The torch runtime: the open_clip model itself, on the CPU, a CUDA GPU or Metal.

It is the reference every other runtime is checked against, the runtime on GPUs, and the
fallback where the ONNX export cannot be made. Vectors leave as float32 unit rows (numpy), so
callers never touch torch. torch is imported inside the calls, so importing this module is cheap.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import ModelSpec, cpu_cores
from ..errors import ModelLoadError
from ..vectors import unit_rows
from .pixels import clip_normalisation, draft_side_for, resize_crop
from .tokenizer import trim_padding
from .weights import load_open_clip

if TYPE_CHECKING:
    from PIL import Image


_DEVICES = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def check_device(requested: str) -> str:
    """``requested`` as a device this machine can run (lower case), else one ModelLoadError line.

    Indexing and every kind of search call this before choosing a model runtime, so an explicit
    ``cuda`` without CUDA is refused by both alike (a text query runs on the CPU either way).
    torch is imported only when an NVIDIA driver is present: without one, CUDA cannot be there."""
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
    """An NVIDIA driver is loaded: without one CUDA is impossible, and torch (slow to import) need not be asked."""
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
    """Give torch's intra-op pool ``threads`` (None: one per core); returns the count used."""
    import torch

    count = threads or cpu_cores()
    torch.set_num_threads(count)
    return count


class ClipEncoder:
    """An open_clip model with its preprocessing and tokenizer (implements :class:`~pixfind.models.base.Encoder`)."""

    image_runtime = None  # torch itself

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
        self.model, self._transform, self._tokenizer = load_open_clip(spec, self.device, status)
        self.half = self.device.startswith("cuda")
        if self.half:
            self.model = self.model.half()
        self.model.eval()
        self._torch = torch
        size = getattr(self.model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self._device_norm = self._normalisation_tensors(normalise_on_device)
        #: The text tower that takes queries without their padding (None: full rows only).
        self.text_tower = trimmed_text_tower(self.model)
        self.dim = int(self.encode_texts(["a photo"]).shape[1])

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
        return tuple(  # type: ignore[return-value]
            torch.tensor(v, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) for v in (found.mean, found.std)
        )

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """The model's transform as a CHW array: uint8 (resized and cropped; normalised in
        :meth:`encode_images`, on the device) when the model normalises on its device, else the
        transform's float32 output (the torch backend on the CPU, or a non-standard transform).

        On a GPU the decode threads are the bottleneck: the float32 half of the transform (torch
        ops run from many threads at once) cuts their throughput, and four times the bytes then
        cross to the GPU (benchmarks/gpu.py)."""
        if self._device_norm is not None:
            return resize_crop(image, self.image_size)
        return self._transform(image).numpy()

    @property
    def takes_device_pixels(self) -> bool:
        """:meth:`encode_images` also takes uint8 pixels as a torch tensor (the GPU decode path's,
        already on the device), normalising them where the model runs."""
        return self._device_norm is not None

    def encode_images(self, pixels: Any) -> np.ndarray:
        """Embed a batch of preprocessed images (N, 3, H, W) into unit vectors (N, dim): uint8
        pixels from :meth:`preprocess`, or float32 ones already normalised; or, when
        :attr:`takes_device_pixels`, a uint8 torch tensor (moved to the model's device if not there)."""
        torch = self._torch
        if isinstance(pixels, torch.Tensor):
            batch = pixels.to(self.device)
        else:
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
        """Embed text queries into unit vectors (N, dim), through :attr:`text_tower` without the
        padding after the longest prompt where the model allows it (a short query costs less)."""
        torch = self._torch
        tokens = self._tokenizer(texts)
        with torch.inference_mode():
            if self.text_tower is not None:
                trimmed = torch.from_numpy(trim_padding(tokens.numpy()))
                features = self.text_tower(trimmed.to(self.device))
            else:
                features = self.model.encode_text(tokens.to(self.device))
        return unit_rows(features.float().cpu().numpy())


def trimmed_text_tower(model: Any) -> Any | None:
    """The text tower as a module taking tokens (N, L) for any L up to the context length.

    open_clip's ``encode_text`` adds all 77 positional embeddings and the full 77x77 causal mask,
    so it only accepts full rows. With a causal mask and pooling at the end-of-text token
    (argmax: it has the highest id), positions after that token cannot change the output, so
    slicing both to L gives the same features. Attention is written out with shapes read from
    the input: ``nn.MultiheadAttention``'s own forward traces the sequence length as a constant.
    The one trimmed tower: torch queries run it, and the ONNX export traces it. None for any
    other kind of text tower (queries then keep their padding, and it is exported at full length).
    """
    import torch
    from open_clip.transformer import text_global_pool

    parts = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
    if parts is None or not all(
        hasattr(parts, a) for a in ("token_embedding", "positional_embedding", "ln_final", "transformer")
    ):
        return None
    pool = getattr(parts, "text_pool_type", getattr(parts, "pool_type", None))
    if pool != "argmax" or getattr(parts, "attn_mask", None) is None:
        return None
    if getattr(parts, "cls_emb", None) is not None or getattr(parts, "use_pad_mask", False):
        return None
    blocks = list(getattr(parts.transformer, "resblocks", []))
    if not blocks or not getattr(parts.transformer, "batch_first", True):
        return None
    for b in blocks:
        attn = getattr(b, "attn", None)
        if not (
            isinstance(attn, torch.nn.MultiheadAttention)
            and attn.batch_first
            and attn._qkv_same_embed_dim
            and not hasattr(b, "ln_1_kv")
            and all(hasattr(b, a) for a in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2"))
        ):
            return None

    def attention(attn: Any, x: Any, mask: Any) -> Any:
        batch, width, heads, head_dim = x.shape[0], attn.embed_dim, attn.num_heads, attn.head_dim
        qkv = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias)
        qkv = qkv.reshape(batch, -1, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = torch.matmul(q * (head_dim**-0.5), k.transpose(-2, -1)) + mask
        out = torch.matmul(scores.softmax(dim=-1), v)
        return attn.out_proj(out.transpose(1, 2).reshape(batch, -1, width))

    class TextTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.parts = parts

        def forward(self, tokens: Any) -> Any:
            p = self.parts
            length = tokens.shape[1]
            cast = p.transformer.get_cast_dtype()
            x = p.token_embedding(tokens).to(cast)
            x = x + p.positional_embedding[:length].to(cast)
            mask = p.attn_mask[:length, :length].to(cast)
            for block in p.transformer.resblocks:
                x = x + block.ls_1(attention(block.attn, block.ln_1(x), mask))
                x = x + block.ls_2(block.mlp(block.ln_2(x)))
            x = p.ln_final(x)
            x = text_global_pool(x, tokens, "argmax")
            proj = p.text_projection
            if proj is not None:
                x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
            return x

    return TextTower().eval()
