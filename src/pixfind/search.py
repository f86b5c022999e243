"""Where a query is embedded and looked up: text or example image → vector → nearest rows."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import PixfindError
from .ingest.decode import ImageLoadError, load_image
from .pathkeys import key_of
from .store import SearchHit, Store

if TYPE_CHECKING:
    from PIL import Image

    from .models.base import Encoder


@dataclass
class Hit:
    """One result: ``score`` is the cosine similarity (1.0 = identical direction)."""

    rank: int
    score: float
    path: str
    width: int
    height: int
    size: int = 0
    copies: int = 1
    """How many indexed files with exactly this content the hit stands for (itself included)."""
    copy_paths: tuple[str, ...] = ()
    """The other files of those copies, when results collapse copies (the default)."""
    taken: str | None = None
    """When the photo was taken (ISO, wall clock), from ``taken_from``: "exif" or "mtime"; None
    in rows indexed before pixfind recorded it (the next ``pixfind index`` adds it)."""
    taken_from: str | None = None
    camera: str | None = None
    """EXIF make and model (text from the file: print it through ``render.printable``)."""
    type: str | None = None
    """jpeg, png, webp, gif, bmp or tiff."""

    @classmethod
    def of(cls, found: SearchHit, rank: int = 0) -> Hit:
        """A hit from what the store returned."""
        from .filters import taken_text

        facts: dict[str, Any] = found.facts or {}
        camera, kind, source = facts.get("camera"), facts.get("type"), facts.get("taken_from")
        return cls(
            rank=rank,
            score=found.score,
            path=found.path,
            width=found.width,
            height=found.height,
            size=found.size,
            taken=taken_text(facts.get("taken")),
            taken_from=source if isinstance(source, str) else None,
            camera=camera if isinstance(camera, str) else None,
            type=kind if isinstance(kind, str) else None,
        )

    def to_dict(self) -> dict[str, object]:
        """The shape of ``pixfind search --json`` and of the web API."""
        data = asdict(self)
        data.pop("size")
        data["score"] = round(self.score, 6)
        data["copy_paths"] = list(self.copy_paths)
        return data


def resolve_under(under: str | None) -> str | None:
    """``--under`` as the absolute, symlink-free folder the stored paths start with."""
    if not under:
        return None
    return os.path.realpath(os.path.expanduser(under))


def image_vector(encoder: Encoder, image: str | Path | Image.Image) -> np.ndarray:
    if isinstance(image, (str, Path)):
        if Path(image).is_dir():
            raise PixfindError(
                f"query image {image} is a folder: give an image file (to search only inside a folder, use --under)"
            )
        if not Path(image).is_file():
            raise PixfindError(f"query image not found: {image}")
        try:
            pil = load_image(image, min_side=encoder.draft_side).image
        except ImageLoadError as exc:
            raise PixfindError(f"cannot read query image {image}: {exc.reason}") from exc
    else:
        from .ingest.decode import to_rgb

        pil = to_rgb(image)
    return encoder.encode_images(encoder.preprocess(pil)[None])[0]


def stored_vector(store: Store, path: str) -> np.ndarray:
    """The vector of an indexed file, for "more like this" without decoding it again."""
    keys = list(dict.fromkeys(key_of(p) for p in candidate_paths(path)))
    found = store.vectors_of(keys)
    for key in keys:
        if key in found:
            return np.asarray(found[key], dtype=np.float32)
    raise PixfindError(f"not in the index: {path}: index its folder first")


def candidate_paths(path: str) -> list[str]:
    """Ways an indexed file may be named: as given, absolute, and with links resolved."""
    expanded = os.path.expanduser(path)
    return [expanded, os.path.abspath(expanded), os.path.realpath(expanded)]
