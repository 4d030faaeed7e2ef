"""torch modules → typed target layers: which modules a CNN target may hold, BatchNorm folding, and the parse of a
plain ``nn.Sequential`` (models that need tracing go through :mod:`onlynorm.targets.fx`, which uses the same
converters)."""

from __future__ import annotations

from typing import TypeGuard

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import InvalidTargetError
from .layers import Conv, Flatten, Layer, Linear, Pool, ReLU, ResidualBlock, pair
from .residual import Residual

__all__ = [
    "SUPPORTED",
    "is_cnn_module",
    "is_plain_sequential",
    "needs_tracing",
    "fold_batchnorm",
    "conv_layer",
    "linear_layer",
    "pool_layer",
    "parse_sequential",
]

SUPPORTED = "Conv2d, BatchNorm1d/2d (folded), ReLU, MaxPool2d, AvgPool2d, Flatten, Linear, Residual"


def is_cnn_module(module: nn.Module) -> TypeGuard[nn.Sequential]:
    """True when a Sequential contains anything beyond Linear/ReLU/Dropout/Identity that we support."""
    if not isinstance(module, nn.Sequential):
        return False
    return any(
        isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, Residual, nn.BatchNorm1d, nn.BatchNorm2d))
        for m in module
    )


_PLAIN = (
    nn.Conv2d,
    nn.Linear,
    nn.ReLU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.Flatten,
    Residual,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.Identity,
    nn.Dropout,
)


#: torch layers only the torch.fx reader supports
_TRACED = (nn.AdaptiveAvgPool2d, nn.Dropout2d, nn.AlphaDropout)


def is_plain_sequential(module: nn.Module) -> TypeGuard[nn.Sequential]:
    """An ``nn.Sequential`` read layer by layer (:func:`parse_sequential`); anything else is traced by torch.fx."""
    return isinstance(module, nn.Sequential) and all(isinstance(m, _PLAIN) for m in module)


def needs_tracing(module: nn.Module) -> bool:
    """True for models read by ``torch.fx``: anything but an ``nn.Linear`` or an ``nn.Sequential`` of torch's own
    layers (a Sequential holding a custom block, or adaptive pooling, is traced; one holding an unsupported torch layer
    keeps the layer-by-layer message)."""
    if isinstance(module, nn.Linear) or is_plain_sequential(module):
        return False
    if not isinstance(module, nn.Sequential):
        return True
    return any(not type(m).__module__.startswith("torch.nn") or isinstance(m, _TRACED) for m in module)


def fold_batchnorm(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: _BatchNorm, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` of a Conv2d/Linear followed by an eval-mode BatchNorm (formula in the module docstring)."""
    if bn.training or bn.running_mean is None or bn.running_var is None:
        raise InvalidTargetError(
            f"{where}: BatchNorm must be in eval mode with running statistics to be folded; call model.eval() first"
        )
    scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    b = torch.zeros_like(bn.running_mean) if bias is None else bias
    w = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
    return w.detach(), ((b - bn.running_mean) * scale + shift).detach()


def conv_layer(m: nn.Conv2d, bn: _BatchNorm | None, where: str) -> Conv:
    """A typed :class:`Conv` from an ``nn.Conv2d`` (and the BatchNorm2d folded into it, if any)."""
    if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise InvalidTargetError(
            f"{where}: only groups=1, zero padding given as integers is supported; "
            f"found groups={m.groups}, padding={m.padding!r}, mode={m.padding_mode!r}"
        )
    w, b = m.weight.detach(), (None if m.bias is None else m.bias.detach())
    if bn is not None:
        w, b = fold_batchnorm(w, b, bn, where)
    return Conv(
        w, torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b, pair(m.stride), pair(m.padding), pair(m.dilation)
    )


def linear_layer(m: nn.Linear, bn: _BatchNorm | None, where: str) -> Linear:
    w, b = m.weight.detach(), (None if m.bias is None else m.bias.detach())
    if bn is not None:
        w, b = fold_batchnorm(w, b, bn, where)
    return Linear(w, torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b)


def pool_layer(m: nn.Module, where: str) -> Pool:
    if getattr(m, "ceil_mode", False) or (isinstance(m, nn.MaxPool2d) and pair(m.dilation) != (1, 1)):
        raise InvalidTargetError(f"{where}: ceil_mode/dilated pooling is not supported")
    if isinstance(m, nn.AvgPool2d) and m.divisor_override is not None:
        raise InvalidTargetError(f"{where}: divisor_override is not supported")
    return Pool(
        "max" if isinstance(m, nn.MaxPool2d) else "avg",
        pair(m.kernel_size),
        pair(m.stride or m.kernel_size),
        pair(m.padding),
        bool(getattr(m, "count_include_pad", True)),
    )


def parse_sequential(seq: nn.Sequential, prefix: str = "") -> tuple[Layer, ...]:
    """Typed layers of an ``nn.Sequential`` CNN (BatchNorm folded into the Conv2d/Linear before it)."""
    mods = list(seq)
    out: list[Layer] = []
    bn: _BatchNorm | None
    i = 0
    while i < len(mods):
        m, where = mods[i], f"layer {prefix}{i} ({type(mods[i]).__name__})"
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(m, nn.Conv2d):
            bn = nxt if isinstance(nxt, nn.BatchNorm2d) else None
            out.append(conv_layer(m, bn, where))
            i += bn is not None
        elif isinstance(m, nn.Linear):
            bn = nxt if isinstance(nxt, nn.BatchNorm1d) else None
            out.append(linear_layer(m, bn, where))
            i += bn is not None
        elif isinstance(m, nn.ReLU):
            out.append(ReLU())
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            out.append(pool_layer(m, where))
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise InvalidTargetError(f"{where}: only Flatten(start_dim=1) is supported")
            out.append(Flatten())
        elif isinstance(m, Residual):
            if not isinstance(m.block, nn.Sequential):
                raise InvalidTargetError(f"{where}: the block of a Residual must be an nn.Sequential")
            out.append(ResidualBlock(parse_sequential(m.block, f"{prefix}{i}.")))
        elif not isinstance(m, (nn.Identity, nn.Dropout)):
            raise InvalidTargetError(f"{where} is not supported in a CNN target; supported: {SUPPORTED}")
        i += 1
    return tuple(out)
