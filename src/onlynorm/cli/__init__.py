"""The ``onlynorm`` command line: a thin typer app over the public API (:mod:`.app`), the ``fit`` command's data
loading (:mod:`.fit`)."""

from .app import app, main

__all__ = ["app", "main"]
