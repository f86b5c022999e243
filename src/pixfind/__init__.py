"""pixfind: find pictures by describing them.

Heavy modules (torch, open_clip, pymilvus) load only when used, so ``import pixfind`` is instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__

__all__ = ["Filters", "Hit", "ImageIndex", "IndexReport", "PixfindError", "__version__"]

if TYPE_CHECKING:
    from .api import ImageIndex
    from .errors import PixfindError
    from .filters import Filters
    from .ingest.report import IndexReport
    from .search import Hit


def __getattr__(name: str) -> Any:
    if name == "ImageIndex":
        from .api import ImageIndex

        return ImageIndex
    if name == "Filters":
        from .filters import Filters

        return Filters
    if name == "Hit":
        from .search import Hit

        return Hit
    if name == "IndexReport":
        from .ingest.report import IndexReport

        return IndexReport
    if name == "PixfindError":
        from .errors import PixfindError

        return PixfindError
    raise AttributeError(name)
