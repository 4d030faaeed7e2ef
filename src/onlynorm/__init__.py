"""onlynorm — exact reconstruction of ReLU networks by tuning only BatchNorm's γ and β of a frozen random network.

>>> import onlynorm
>>> from torch import nn
>>> g = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
>>> f = onlynorm.reconstruct(g, method="width", seed=0)
>>> onlynorm.verify(f, g, samples=1000).passed
True
"""

from .api import random_normnet, reconstruct, solve_norms
from .capacity import CapacityReport, capacity
from .certify import CertifyResult
from .cnn import ConvNetSpec
from .constructions import available_methods
from .constructions.sparse import SparsePatternError
from .domain import Box, interval_bounds
from .errors import (
    FileFormatError,
    InvalidDomainError,
    InvalidNetworkError,
    InvalidOptionError,
    InvalidTargetError,
    MemoryBudgetError,
    NotCertifiableError,
    OnlyNormError,
    SingularSystemError,
    UnsupportedActivationError,
)
from .fit import FitReport, fit_norms, with_norms
from .normnet import NetSummary, NormLinear, NormNet
from .records import NetMeta, SolveInfo, SolveRecord
from .residual import Residual
from .sklearn_target import spec_from_sklearn
from .target import MLPSpec
from .train import TrainHistory, norm_parameters, train_norm_only
from .verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "reconstruct",
    "fit_norms",
    "with_norms",
    "FitReport",
    "random_normnet",
    "solve_norms",
    "verify",
    "VerifyReport",
    "capacity",
    "CapacityReport",
    "CertifyResult",
    "Box",
    "interval_bounds",
    "MLPSpec",
    "spec_from_sklearn",
    "ConvNetSpec",
    "Residual",
    "norm_parameters",
    "train_norm_only",
    "TrainHistory",
    "NormNet",
    "NormLinear",
    "NetSummary",
    "available_methods",
    "OnlyNormError",
    "InvalidTargetError",
    "UnsupportedActivationError",
    "InvalidDomainError",
    "InvalidNetworkError",
    "FileFormatError",
    "SingularSystemError",
    "MemoryBudgetError",
    "InvalidOptionError",
    "NotCertifiableError",
    "SparsePatternError",
    "NetMeta",
    "SolveInfo",
    "SolveRecord",
]
