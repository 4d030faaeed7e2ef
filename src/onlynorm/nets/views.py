"""What a stage computes, read for proofs: typed *views* of its affine maps and ReLU placement.

A certificate must prove the function torch runs, so it never reaches into a stage's submodules itself: each stage
type returns a view (:meth:`~onlynorm.nets.stage.Stage.affine`) built by the readers below from the very modules
its ``forward`` calls. A reader models exactly the inference form the constructions use and **refuses**, with
:class:`~onlynorm.errors.NotCertifiableError` naming the module, any state it does not model:

* a module whose type is not exactly ``nn.Linear``/``nn.Conv2d``/``nn.BatchNorm1d``/``nn.BatchNorm2d`` (a
  subclass may override ``forward``), or whose ``forward`` was replaced on the instance;
* forward hooks or pre-hooks (they can change the output), on the module or registered globally;
* a bias on a frozen ``Linear``/``Conv2d``, a ``padding_mode`` other than ``"zeros"``, string padding;
* a BatchNorm in training mode, without running statistics or affine γ, β, or not in the exact form
  ``BN(z) = γ z + β`` (running mean 0, running variance 1, ``eps = 0``).

>>> import torch
>>> from torch import nn
>>> lin = nn.Linear(3, 2, bias=False).double()
>>> read_linear(lin, "stage 0").shape
torch.Size([2, 3])
>>> lin.register_forward_hook(lambda m, i, o: o * 2)  # doctest: +ELLIPSIS
<torch.utils.hooks.RemovableHandle object at ...>
>>> read_linear(lin, "stage 0")
Traceback (most recent call last):
...
onlynorm.errors.NotCertifiableError: stage 0: nn.Linear has forward hooks, which the certificate does not model; remove them (handle.remove()) before certifying
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules import module as _module_state
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import NotCertifiableError

__all__ = [
    "Geometry",
    "AffineView",
    "StreamView",
    "BranchView",
    "BranchStreamView",
    "hook_problem",
    "read_linear",
    "read_conv",
    "read_norm",
]

#: ``(stride, padding, dilation)`` of a convolution, each a pair of ints
Geometry = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

#: a plain 1×1 convolution
UNIT_GEOMETRY: Geometry = ((1, 1), (0, 0), (1, 1))


@dataclass(frozen=True)
class AffineView:
    """``y = relu?(γ ⊙ (A ⋆ x) + β)``: ``A`` a matrix ``(out, in)`` (``geometry`` None) or a conv kernel
    ``(out, in, kh, kw)`` applied with ``geometry``; ``γ, β`` per unit or channel."""

    weight: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    relu: bool
    geometry: Geometry | None = None


@dataclass(frozen=True)
class StreamView:
    """A convolutional stream (one target conv/Linear of the deep construction) as two affine maps:
    ``y = γ₂ ⊙ B ρ(γ₁ ⊙ (A ⋆ x) + β₁) + β₂`` with ``A`` the block-diagonal branch kernel ``(N, c_in, kh, kw)``,
    ``B`` the readout ``(c_out, N)`` and ``ρ = relu`` or, when ``paired``, ``ρ(v) = relu(v) − relu(−v) = v``.
    ``flat``: the stream realises a Linear layer (a 1×1 kernel on a 1×1 image)."""

    kernel: torch.Tensor
    gamma1: torch.Tensor
    beta1: torch.Tensor
    readout: torch.Tensor
    gamma2: torch.Tensor
    beta2: torch.Tensor
    paired: bool
    flat: bool
    geometry: Geometry


@dataclass(frozen=True)
class BranchView:
    """One branch of a residual stream: ``u = relu(γ ⊙ A x_J + β)`` read by the frozen readout ``B``."""

    branch: AffineView
    readout: torch.Tensor
    inputs: slice


@dataclass(frozen=True)
class BranchStreamView:
    """A residual stream ``y = relu?(γ ⊙ Σ_t B_t u_t + β)`` over its branches (the MLP deep construction)."""

    branches: tuple[BranchView, ...]
    gamma: torch.Tensor
    beta: torch.Tensor
    relu: bool


def hook_problem(module: nn.Module) -> str | None:
    """Why ``module``'s forward may differ from its class's (hooks, an instance-level ``forward``), or None."""
    cls = type(module)
    what = f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__name__
    if module._forward_hooks or getattr(module, "_forward_hooks_with_kwargs", None):
        return f"{what} has forward hooks"
    if module._forward_pre_hooks:
        return f"{what} has forward pre-hooks"
    if "forward" in vars(module):
        return f"{what} has its forward replaced on the instance"
    if _module_state._global_forward_hooks or _module_state._global_forward_pre_hooks:
        return "global module forward hooks are registered"
    return None


def _check_module(module: nn.Module, cls: type[nn.Module], where: str) -> None:
    if type(module) is not cls:
        raise NotCertifiableError(
            f"{where}: expected a plain nn.{cls.__name__}, found {type(module).__name__}; the certificate models "
            "torch's own modules only (a subclass may change forward)"
        )
    problem = hook_problem(module)
    if problem is not None:
        raise NotCertifiableError(
            f"{where}: {problem}, which the certificate does not model; remove them (handle.remove()) before certifying"
        )


def _detached(t: torch.Tensor) -> torch.Tensor:
    return t.detach()


def read_linear(linear: nn.Module, where: str) -> torch.Tensor:
    """The weight of a frozen bias-free ``nn.Linear`` (refusing any state the certificate does not model)."""
    _check_module(linear, nn.Linear, where)
    assert isinstance(linear, nn.Linear)
    if linear.bias is not None:
        raise NotCertifiableError(
            f"{where}: the frozen nn.Linear has a bias ({tuple(linear.bias.shape)}); the constructions' frozen maps "
            "are bias-free and the certificate does not model one — set it to None or rebuild the network"
        )
    return _detached(linear.weight)


def read_conv(conv: nn.Module, where: str, *, groups: int = 1) -> tuple[torch.Tensor, Geometry]:
    """The kernel and ``(stride, padding, dilation)`` of a frozen bias-free zero-padded ``nn.Conv2d``."""
    _check_module(conv, nn.Conv2d, where)
    assert isinstance(conv, nn.Conv2d)
    if conv.bias is not None:
        raise NotCertifiableError(
            f"{where}: the frozen nn.Conv2d has a bias; the certificate does not model one — set it to None"
        )
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise NotCertifiableError(
            f"{where}: expected zero padding given as integers, found padding={conv.padding!r}, "
            f"padding_mode={conv.padding_mode!r}; the certificate bounds zero padding only"
        )
    if conv.groups != groups:
        raise NotCertifiableError(f"{where}: expected groups={groups}, found groups={conv.groups}")
    s, p, d = conv.stride, conv.padding, conv.dilation
    geometry: Geometry = ((int(s[0]), int(s[1])), (int(p[0]), int(p[1])), (int(d[0]), int(d[1])))
    return _detached(conv.weight), geometry


def read_norm(norm: nn.Module, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(γ, β)`` of a BatchNorm in the exact inference form ``BN(z) = γ z + β`` (running mean 0, running
    variance 1, ``eps = 0``, eval mode); anything else is refused, naming what differs."""
    cls = nn.BatchNorm2d if isinstance(norm, nn.BatchNorm2d) else nn.BatchNorm1d
    _check_module(norm, cls, where)
    assert isinstance(norm, _BatchNorm)
    mean, var = norm.running_mean, norm.running_var
    if norm.training or not norm.track_running_stats or mean is None or var is None:
        raise NotCertifiableError(f"{where}: the BatchNorm normalises by batch statistics (training mode)")
    if not norm.affine or norm.weight is None or norm.bias is None:
        raise NotCertifiableError(f"{where}: the BatchNorm has no affine γ, β")
    if float(norm.eps) != 0.0:
        raise NotCertifiableError(
            f"{where}: BatchNorm eps is {norm.eps:g}, expected 0 — with eps the layer computes "
            "γ z / √(1 + eps) + β, which the certificate does not model; set eps = 0 or verify by sampling"
        )
    if bool((mean != 0).any()) or bool((var != 1).any()):
        raise NotCertifiableError(
            f"{where}: BatchNorm running statistics are not mean 0 / variance 1 (max |mean| "
            f"{float(mean.abs().max()):.3g}, max |var − 1| {float((var - 1).abs().max()):.3g})"
        )
    return _detached(norm.weight), _detached(norm.bias)
