"""Exceptions raised by onlynorm.

Every error the library raises on purpose derives from :class:`OnlyNormError`, so callers (and the CLI, which turns
them into a one-line message and exit code 2) can catch exactly the library's own refusals. Messages follow one
pattern: what was expected, what was found, and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "OnlyNormError",
    "InvalidTargetError",
    "UnsupportedActivationError",
    "UnsupportedModelError",
    "InvalidDomainError",
    "InvalidNetworkError",
    "FileFormatError",
    "SingularSystemError",
    "MemoryBudgetError",
    "InvalidOptionError",
    "NotCertifiableError",
    "MissingDependencyError",
]


class OnlyNormError(Exception):
    """Base class of every error onlynorm raises deliberately."""


class InvalidTargetError(OnlyNormError, ValueError):
    """The target network is not a finite ReLU MLP (or supported CNN) with chaining shapes."""


class InvalidOptionError(OnlyNormError, ValueError):
    """An argument or construction option has the wrong type or lies outside its range (see
    :func:`onlynorm.options.check_scalar`); the message names the option, what is accepted and what was found."""


class NotCertifiableError(OnlyNormError, ValueError):
    """A network cannot be certified as it is (for example BatchNorm statistics that are not the fixed
    inference form the constructions use)."""


class UnsupportedActivationError(InvalidTargetError):
    """The target uses an activation other than ReLU (e.g. a scikit-learn MLP with ``activation="tanh"``)."""


class UnsupportedModelError(InvalidTargetError):
    """A sequence model (transformer) uses something the construction does not express — active dropout,
    data-dependent control flow, a parameter used non-linearly, an unknown module or function; the message names
    the node or module."""


class InvalidDomainError(OnlyNormError, ValueError):
    """The input box is empty, non-finite, or has the wrong dimension."""


class InvalidNetworkError(OnlyNormError, ValueError):
    """A NormNet (or norm set) does not fit the target or the requested operation."""


class FileFormatError(OnlyNormError, ValueError):
    """A file is missing, truncated, not safetensors, or does not hold what was expected."""


class SingularSystemError(OnlyNormError, ArithmeticError):
    """A Khatri–Rao system has no exact solution (rank deficient), so the target is not expressible.

    Attributes carry the facts a caller needs to react: ``layer`` (0-based target layer), ``rank``, ``size`` and
    ``deficit`` (``size - rank``); constructions may add a ``suggestion`` in the message.
    """

    def __init__(self, message: str, *, layer: int | None = None, rank: int | None = None, size: int | None = None):
        super().__init__(message)
        self.layer = layer
        self.rank = rank
        self.size = size
        self.deficit = None if rank is None or size is None else size - rank


class MemoryBudgetError(OnlyNormError, MemoryError):
    """A construction would need more memory than allowed; raised *before* allocating."""

    def __init__(self, message: str, *, needed_bytes: int | None = None, limit_bytes: int | None = None):
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.limit_bytes = limit_bytes


class MissingDependencyError(OnlyNormError, ImportError):
    """An optional feature needs a package that is not installed (the message names the extra to install)."""
