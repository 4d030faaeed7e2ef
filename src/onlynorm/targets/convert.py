"""Every form a target may take → a spec: :func:`as_target` (a spec, a torch model, a scikit-learn MLP) and
:func:`load_target` (a target file).

>>> from torch import nn
>>> as_target(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()).dims
[3, 4, 2]
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .. import _io
from ..errors import InvalidTargetError, UnsupportedActivationError
from .cnn import ConvNetSpec
from .mlp import MLPSpec
from .parse import is_cnn_module, needs_tracing, parse_sequential
from .sklearn import is_sklearn_mlp, spec_from_sklearn

__all__ = ["as_target", "load_target", "read_target", "RELU_ASSUMED"]


def as_target(target: MLPSpec | ConvNetSpec | nn.Module, in_shape: tuple[int, int, int] | None = None):
    """Accept an ``MLPSpec``, a ``ConvNetSpec``, an ``nn.Sequential``, or a fitted scikit-learn
    ``MLPClassifier``/``MLPRegressor`` with ``activation="relu"``.

    A Sequential of Linear/ReLU layers (eval-mode BatchNorm1d after a Linear is folded in) becomes an
    ``MLPSpec``; one with convolutions, pooling, Flatten or ``Residual`` blocks becomes a ``ConvNetSpec`` and
    needs ``in_shape=(c, H, W)``. Any other model (custom blocks, ResNets) is traced by ``torch.fx`` when
    ``in_shape`` is given (:mod:`onlynorm.targets.fx`). A scikit-learn MLP becomes the ``MLPSpec`` of its
    pre-output-activation map (see :mod:`onlynorm.targets.sklearn`).
    """
    if isinstance(target, (MLPSpec, ConvNetSpec)):
        return target
    if is_sklearn_mlp(target):
        return spec_from_sklearn(target)
    if isinstance(target, nn.Module):
        if in_shape is not None and needs_tracing(target):
            return ConvNetSpec.from_module(target, in_shape)  # any other model: traced by onlynorm.targets.fx
        if is_cnn_module(target):
            records = parse_sequential(target)
            if all(r.type in ("linear", "relu") for r in records):  # an MLP with folded BatchNorm1d
                seq = nn.Sequential(*[_linear(r) if r.type == "linear" else nn.ReLU() for r in records])
                return MLPSpec.from_module(seq)
            return ConvNetSpec.from_module(target, in_shape)
        return MLPSpec.from_module(target)
    raise InvalidTargetError(
        f"expected an MLPSpec, a ConvNetSpec, an nn.Sequential or a fitted scikit-learn MLPClassifier/MLPRegressor, "
        f"found {type(target).__name__}"
    )


def _linear(record) -> nn.Linear:
    w = record.weight
    lin = nn.Linear(w.shape[1], w.shape[0], dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(record.bias)
    return lin


def load_target(path: str | os.PathLike, *, activation: str | None = None):
    """Load a target file for the CLI: an MLP state_dict (safetensors or ``.pt``), or a CNN saved by
    ``ConvNetSpec.save`` (safetensors with its JSON architecture description). ``activation`` states what a bare
    state_dict's model used (it records only weights): ``"relu"``, or None to assume it; any other is refused."""
    return read_target(path, activation=activation)[0]


#: what the CLI says when it reads a bare state_dict: its weights carry no activation function
RELU_ASSUMED = (
    "note: {name} is a bare state_dict, which records no activation function; it is read as a ReLU MLP (ReLU after "
    "every Linear but the last). A Tanh/GELU/... model is NOT this network — save targets with "
    "onlynorm.MLPSpec.from_module(model).save(path), which refuses other activations"
)


def read_target(path: str | os.PathLike, *, activation: str | None = None):
    """``(target, relu_assumed)``: the target of :func:`load_target`, and whether the file is a bare state_dict
    (no onlynorm metadata) whose activation is *assumed* to be ReLU — a state_dict records only weights, so a Tanh
    model's state_dict reads as the ReLU network with the same weights. Files written by :meth:`MLPSpec.save`
    (which only accepts ReLU models) or ``ConvNetSpec.save`` record what they are; ``activation="relu"`` states it
    for a bare state_dict (nothing is assumed), any other activation is refused."""
    if activation is not None and str(activation).lower() != "relu":
        raise UnsupportedActivationError(
            f"activation: expected 'relu' (onlynorm reconstructs ReLU networks), found {activation!r}; a network with "
            "another activation is not a ReLU network of the same weights and cannot be reconstructed exactly"
        )
    tensors, meta = _io.read_tensors(path)
    if meta is not None and meta.get("kind") == "cnn-target":
        return ConvNetSpec.from_document(meta, tensors, source=str(path)), False
    assumed = activation is None and (meta is None or meta.get("kind") != "mlp-target")
    return MLPSpec.from_state_dict(tensors, source=str(path)), assumed
