"""The torch modules stages are built from, and how a stage evaluates them: an identity BatchNorm in inference
form, frozen bias-free ``Linear``/``Conv2d``, typed module lists, the one BatchNorm evaluation every stage uses
(:func:`normalize`) and the context that evaluates a network in inference form without changing it
(:func:`inference_form`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "make_batchnorm",
    "frozen_module",
    "normalize",
    "paired_relu",
    "inference_scale_shift",
    "inference_form",
    "conv2d_config",
    "ModuleSeq",
    "RAISED_EPS",
]

#: set on a BatchNorm whose eps NormNet.train() raised from 0 for batch statistics (eval() gives it back its 0)
RAISED_EPS = "_onlynorm_raised_eps"


def make_batchnorm(
    num_features: int, *, dims: int = 1, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> _BatchNorm:
    """A BatchNorm at identity in inference form: ``γ = 1, β = 0``, running mean 0, running var 1, ``eps = 0``.

    ``eps = 0`` matters: with the default ``eps = 1e-5`` BatchNorm would scale by ``1/sqrt(1 + 1e-5)`` and perturb
    every ``γ`` by 5e-6 relative — far above the 1e-12 the constructions reach.
    """
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    bn = cls(num_features, eps=0.0, affine=True, track_running_stats=True, dtype=dtype, device=device)
    bn.eval()
    return bn


M = TypeVar("M", bound=nn.Module)


def frozen_module(cls: type[M], *args, dtype: torch.dtype, device=None, **kwargs) -> M:
    """A bias-free ``nn.Linear``/``nn.Conv2d`` with zero, frozen weights (``requires_grad=False``).

    ``skip_init``: torch's default init would draw from the global RNG; constructions fill the weights from their
    own seeded generator, so building a network never perturbs the user's random stream.
    """
    module = torch.nn.utils.skip_init(
        cls, *args, bias=False, dtype=dtype, device=device if device is not None else "cpu", **kwargs
    )
    weight = module.get_parameter("weight")
    with torch.no_grad():
        weight.zero_()
    weight.requires_grad_(False)
    return module


def normalize(norm: _BatchNorm, z: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """``BN(z)`` as a stage's forward evaluates it: the module itself with batch statistics (training mode), else
    the inference form ``z · s + t`` with ``s = γ/√(var + eps)``, ``t = β − mean · s`` — exactly ``γ z + β`` in the
    constructions' form (mean 0, var 1, eps 0). ``inplace`` (no autograd) reuses ``z``'s memory; the values are the
    same either way, so a stage computes one function in every grad mode."""
    form = inference_scale_shift(norm)
    if form is None:
        return norm(z)
    shape = (1, -1) + (1,) * (z.ndim - 2)
    scale, shift = form[0].reshape(shape), form[1].reshape(shape)
    return z.mul_(scale).add_(shift) if inplace else z * scale + shift


def paired_relu(v: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """``relu(v) − relu(−v)``: a sign-paired unit read out by ``[B, −B]``, which is **exactly** ``v`` in IEEE
    arithmetic — ``relu`` is exact, and ``x − 0 = x``, ``0 − (−x) = x`` are exact (NaN stays NaN; only the sign of
    a zero may differ, which no later sum or product can tell apart). So without autograd (``inplace``) the
    activation is returned as it is: the same values, without four passes over the widest tensor of a stream
    (~40 % of a tied ResNet-18 forward). With autograd the two ReLUs run, so gradients are those of the ReLU network.

    >>> v = torch.tensor([-2.0, 0.0, 3.5])
    >>> paired_relu(v, inplace=True) is v, torch.equal(paired_relu(v), v)
    (True, True)
    """
    if inplace:
        return v
    return torch.relu(v) - torch.relu(-v)


def inference_scale_shift(norm: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(s, t)`` with ``BN(z) = z · s + t`` per channel in inference form (what :func:`normalize` applies), or
    ``None`` when the module normalises by batch statistics. A stage evaluating a BatchNorm on slices of its
    channels (blocks streamed in chunks) applies slices of these — the same bits as :func:`normalize`."""
    if norm.training or norm.running_mean is None or norm.running_var is None:
        return None
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    return scale, norm.bias - norm.running_mean * scale


@contextmanager
def inference_form(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the duration of the block, then every submodule's own training flag and ``eps``
    exactly as they were: evaluating or exporting a network never changes it (not even its modes).

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    >>> with inference_form(net):
    ...     net[1].training
    False
    >>> net[1].training
    True
    """
    saved = [(m, m.training, getattr(m, "eps", None), getattr(m, RAISED_EPS, None)) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training, eps, raised in saved:
            m.training = training
            if eps is not None:
                m.eps = eps
            if raised is not None:
                setattr(m, RAISED_EPS, raised)


def conv2d_config(conv: nn.Conv2d) -> dict[str, Any]:
    """The JSON form of a ``Conv2d``'s shape and geometry (what a stage needs to rebuild it)."""
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": list(conv.padding),
        "dilation": list(conv.dilation),
    }


class ModuleSeq(nn.ModuleList, Generic[M]):
    """An ``nn.ModuleList`` whose items have one declared type (for readers and type checkers; same state dict)."""

    def __iter__(self) -> Iterator[M]:
        return super().__iter__()  # type: ignore[return-value]

    def __getitem__(self, idx: Any) -> Any:
        return super().__getitem__(idx)
