"""Constructions of the theory, one module each, behind one registry (:func:`get_construction`)."""

from . import (
    conv,  # noqa: F401  (registers "conv", chosen automatically for CNN targets)
    conv_deep,  # noqa: F401  (registers "conv_deep": method="deep" on CNN targets)
    deep,  # noqa: F401  (registers "deep")
    lowrank,  # noqa: F401  (registers "lowrank")
    sparse,  # noqa: F401  (registers "sparse")
    width,  # noqa: F401  (registers "width")
)
from .base import Construction, available_methods, get_construction, register

__all__ = ["Construction", "available_methods", "get_construction", "register"]
