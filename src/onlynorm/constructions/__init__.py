"""Constructions of the theory, one module each, behind one registry (:func:`get_construction`)."""

from .base import Construction, available_methods, get_construction, register
from . import width  # noqa: F401  (registers "width")
from . import lowrank  # noqa: F401  (registers "lowrank")
from . import sparse  # noqa: F401  (registers "sparse")
from . import deep  # noqa: F401  (registers "deep")
from . import conv  # noqa: F401  (registers "conv", chosen automatically for CNN targets)

__all__ = ["Construction", "available_methods", "get_construction", "register"]
