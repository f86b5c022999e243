"""The ``pixfind`` command line: one module per group of commands over one Typer app.

``app`` holds the shared options and the entry point (``main``, ``run``); ``indexing`` (index,
watch, remove), ``searching`` (search, info), ``serving`` (serve) and ``library`` (duplicates,
export) add their commands to it when imported here, in the order ``--help`` lists them.
"""

# isort: off
from . import indexing, searching, serving, library  # noqa: F401  (each registers its commands)

# isort: on
from .app import app, main, run
from .progress import RichProgress

__all__ = ["RichProgress", "app", "main", "run"]
