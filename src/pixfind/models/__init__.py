"""The CLIP models: one :class:`~pixfind.models.base.Encoder` contract and its runtimes.

``load_encoder(spec, settings)`` gives the indexing encoder and ``load_query_encoder(spec,
settings)`` the torch-free query encoder (or None), both from :mod:`pixfind.models.load`, imported
on first use so that ``import pixfind`` stays instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Encoder

if TYPE_CHECKING:
    from .load import load_encoder, load_query_encoder

__all__ = ["Encoder", "load_encoder", "load_query_encoder"]


def __getattr__(name: str) -> Any:
    if name in ("load_encoder", "load_query_encoder"):
        from . import load

        return getattr(load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
