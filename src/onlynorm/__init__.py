"""onlynorm — exact reconstruction of ReLU networks by tuning only BatchNorm's γ and β of a frozen random network.

>>> import onlynorm
>>> from torch import nn
>>> g = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
>>> f = onlynorm.reconstruct(g, method="width", seed=0)
>>> onlynorm.verify(f, g, samples=1000).passed
True
"""

from ._version import __version__ as __version__
from .api import random_normnet, reconstruct, solve_norms
from .certify import CertifyResult
from .constructions import available_methods
from .constructions.capacity import CapacityReport, capacity
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
from .fit.gradient import TrainHistory, norm_parameters, train_norm_only
from .nets.linear import NormLinear
from .nets.normnet import NormNet
from .nets.records import NetMeta, SolveInfo, SolveRecord
from .nets.summary import NetSummary
from .targets.cnn import ConvNetSpec
from .targets.mlp import MLPSpec
from .targets.residual import Residual
from .targets.sklearn import spec_from_sklearn
from .verify import VerifyReport, verify

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
