"""User-facing errors.

Every failure a user can cause (bad flag, missing folder, unreachable server, wrong model) is raised
as a :class:`PixfindError` whose message is one line naming the problem and the fix. The CLI prints
that line and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


class PixfindError(Exception):
    """A problem the user can fix; ``str(err)`` is the whole message."""

    exit_code = 1


class StoreError(PixfindError):
    """The vector store cannot be reached, opened or written."""


class IndexLockedError(StoreError):
    """Another process is updating the same embedded index."""

    exit_code = 75  # EX_TEMPFAIL: try again later


class ModelMismatchError(PixfindError):
    """The collection was built with a different model than the one requested."""


class ModelLoadError(PixfindError):
    """The CLIP model or its weights cannot be loaded."""
