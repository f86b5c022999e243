"""The package's version, in a module of its own: the web server and the build read it without
running the package's ``__init__`` (and whatever that may import one day)."""

__version__ = "0.1.0"
