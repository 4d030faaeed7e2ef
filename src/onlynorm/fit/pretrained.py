"""``with_norms(model)``: a pretrained torch MLP/CNN as a :class:`~onlynorm.NormNet` whose γ, β can be fitted.

Every ``Linear``/``Conv2d`` (weights *and* bias frozen) is followed by a BatchNorm — a new one at identity
(``γ = 1, β = 0``, running mean 0, variance 1, ``eps = 0``), or the model's own BatchNorm right after it, kept as
it is: its running statistics and ``eps`` are folded into an equivalent ``eps = 0`` form, ``var' = var + eps``,
so the network computes exactly what the model computes::

    BN(z) = γ (z − μ) / √(var + eps) + β  =  γ (z − μ) / √var' + β

ReLU, max/avg pooling and Flatten are copied; Dropout and Identity (identities at inference) are dropped.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
>>> net = with_norms(model)
>>> x = torch.randn(4, 3, dtype=torch.float64)
>>> bool(torch.equal(net(x), model(x))), len(net.norm_parameters())
(True, 4)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import InvalidNetworkError
from ..finite import all_finite
from ..nets.conv import FixedOp
from ..nets.normnet import NormNet
from ..nets.pretrained import PretrainedConv2d, PretrainedLinear, PretrainedStage, norm_stats
from ..nets.stage import Stage
from .transformer import with_layer_norms

__all__ = ["with_norms"]

METHOD = "pretrained"


def _copy_layer(stage: PretrainedStage, module: nn.Module) -> None:
    with torch.no_grad():
        stage.layer.weight.copy_(module.weight)
        if module.bias is not None:
            stage.layer.bias.copy_(module.bias)


def _adopt_batchnorm(stage: PretrainedStage, bn: _BatchNorm, where: str) -> None:
    if bn.running_mean is None or bn.running_var is None:
        raise InvalidNetworkError(
            f"{where}: expected a BatchNorm with running statistics "
            "(track_running_stats=True), found none; it cannot be used as a fixed affine map"
        )
    mean, var = norm_stats(stage.norm)
    with torch.no_grad():
        mean.copy_(bn.running_mean)
        var.copy_(bn.running_var + bn.eps)
        if bn.affine:
            stage.norm.weight.copy_(bn.weight)
            stage.norm.bias.copy_(bn.bias)


def with_norms(model: nn.Module, in_shape: tuple[int, int, int] | None = None, *, example_input: Any = None) -> NormNet:
    """A NormNet computing exactly what ``model`` (an ``nn.Sequential``, eval mode) computes, with one tunable
    BatchNorm after every ``Linear``/``Conv2d``. ``in_shape=(c, H, W)`` is required for a CNN.

    A transformer (``example_input=`` given) becomes a :class:`~onlynorm.nets.seqnet.SeqNet` whose only tunable
    parameters are its LayerNorms' ``γ, β`` (:func:`onlynorm.fit.transformer.with_layer_norms`).

    The model itself is not modified: its tensors are copied.
    """
    if example_input is not None:
        return with_layer_norms(model, example_input)
    if isinstance(model, nn.Linear):
        model = nn.Sequential(model)
    if not isinstance(model, nn.Sequential):
        raise InvalidNetworkError(
            f"with_norms: expected an nn.Sequential (or nn.Linear), found {type(model).__name__}"
            "; wrap your layers in nn.Sequential"
        )
    params = list(model.parameters())
    if not params:
        raise InvalidNetworkError("with_norms: expected a model with Linear/Conv2d layers, found no parameters")
    dtype, device = params[0].dtype, params[0].device
    if not all(all_finite(p) for p in params):
        raise InvalidNetworkError("with_norms: the model has NaN/Inf parameters; expected finite weights")
    mods = [m for m in model if not isinstance(m, (nn.Identity, nn.Dropout))]
    stages: list[Stage] = []
    dims: list[int] = []
    has_conv = any(isinstance(m, nn.Conv2d) for m in mods)
    if has_conv and in_shape is None:
        raise InvalidNetworkError("with_norms: a CNN needs in_shape=(c, H, W); the image size is not in the weights")
    i = 0
    while i < len(mods):
        m, where = mods[i], f"layer {i} ({type(mods[i]).__name__})"
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(m, nn.Linear):
            stage: Stage = PretrainedLinear(
                m.in_features, m.out_features, m.bias is not None, dtype=dtype, device=device
            )
            if not dims:
                dims.append(m.in_features)
            dims.append(m.out_features)
        elif isinstance(m, nn.Conv2d):
            if isinstance(m.padding, str) or m.padding_mode != "zeros":
                raise InvalidNetworkError(
                    f"with_norms: {where}: expected zero padding given as integers, found "
                    f"padding={m.padding!r}, mode={m.padding_mode!r}"
                )
            stage = PretrainedConv2d(
                m.in_channels,
                m.out_channels,
                m.kernel_size,
                m.stride,
                m.padding,
                m.dilation,
                m.groups,
                m.bias is not None,
                dtype=dtype,
                device=device,
            )
            dims.append(m.out_channels)
        elif isinstance(m, nn.ReLU):
            stage = FixedOp("relu")
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            if getattr(m, "ceil_mode", False) or getattr(m, "divisor_override", None) is not None:
                raise InvalidNetworkError(f"with_norms: {where}: ceil_mode/divisor_override pooling is not supported")
            pair = lambda v: [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]  # noqa: E731
            extra = {"count_include_pad": bool(m.count_include_pad)} if isinstance(m, nn.AvgPool2d) else {}
            stage = FixedOp(
                "maxpool" if isinstance(m, nn.MaxPool2d) else "avgpool",
                kernel=pair(m.kernel_size),
                stride=pair(m.stride or m.kernel_size),
                padding=pair(m.padding),
                **extra,
            )
        elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            stage = FixedOp("flatten")
        else:
            raise InvalidNetworkError(
                f"with_norms: {where} is not supported; expected Linear, Conv2d, BatchNorm1d/2d right after them, "
                "ReLU, MaxPool2d, AvgPool2d, Flatten(start_dim=1), Dropout or Identity"
            )
        if isinstance(stage, PretrainedStage):
            _copy_layer(stage, m)
            if isinstance(nxt, (nn.BatchNorm1d, nn.BatchNorm2d)):
                _adopt_batchnorm(stage, nxt, f"layer {i + 1} (BatchNorm)")
                i += 1
        stages.append(stage)
        i += 1
    meta: dict[str, Any] = {"method": METHOD, "target_parameters": sum(p.numel() for p in params)}
    if in_shape is not None:
        meta["in_shape"] = [int(v) for v in in_shape]
        meta["target_dims"] = [int(v) for v in in_shape] + dims
    else:
        meta["target_dims"] = dims
    return NormNet(stages, meta=meta)
