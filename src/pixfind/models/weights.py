"""Where a model's weights come from: open_clip's tags, a checkpoint file, or seeded random weights.

Every way this goes wrong (an unknown architecture, weights that cannot be fetched offline, a
checkpoint that is not the model's state dict, a torch/torchvision mismatch) becomes one
:class:`~pixfind.errors.ModelLoadError` line naming the fix. torch and open_clip are imported
only inside the calls that need them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ModelSpec, cache_dir
from ..errors import ModelLoadError
from .messages import first_sentence

#: Seed for ``pretrained=None``: random weights, the same in every process, so an index built
#: with them can be searched later. For offline testing only; the vectors mean nothing.
RANDOM_WEIGHTS_SEED = 0


def known_models() -> list[str]:
    """open_clip's architectures, read from its config files: importing open_clip would import
    torch (seconds, and much memory) just to check a name."""
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


def load_open_clip(spec: ModelSpec, device: str, status: Callable[[str], None] | None = None) -> tuple[Any, Any, Any]:
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
            problem = checkpoint_problem(Path(spec.checkpoint), spec.name) or first_sentence(exc)
            raise ModelLoadError(
                f"cannot load checkpoint {spec.checkpoint}: {problem}; "
                f"give {spec.name}'s state_dict, saved by torch.save or safetensors"
            ) from exc
        raise ModelLoadError(
            f"cannot get weights for {spec.describe()} ({first_sentence(exc)}): connect to the "
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
            f"cannot import open_clip ({first_sentence(exc)}): reinstall pixfind's dependencies (pip install -e .)"
        ) from exc
    except Exception as exc:  # torchvision's compiled operators failed to register
        try:
            versions = f"torch {version('torch')} and torchvision {version('torchvision')}"
        except Exception:
            versions = "torch and torchvision"
        raise ModelLoadError(
            f"{versions} do not work together ({first_sentence(exc)}): install both from one index, e.g. "
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
    """Without a network, open_clip spends most of a minute in download retries before failing.
    When the weights are not cached and the hub cannot be reached in a few seconds, say so at once.
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
