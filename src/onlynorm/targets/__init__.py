"""Targets: the networks onlynorm reconstructs — ReLU MLPs (:class:`MLPSpec`), CNNs and residual networks
(:class:`ConvNetSpec` of typed layers), models converted through ``torch.fx`` or from scikit-learn — and the one
entry point that turns any of them into a spec (:func:`as_target`) or reads one from a file (:func:`load_target`)."""

from .cnn import ConvNetSpec
from .convert import as_target, load_target
from .mlp import MLPSpec
from .residual import Residual
from .sklearn import spec_from_sklearn

__all__ = ["MLPSpec", "ConvNetSpec", "Residual", "as_target", "load_target", "spec_from_sklearn"]
