"""Convolutional (and residual) targets: :class:`ConvNetSpec`, BatchNorm folding, interval bounds, safe files.

A CNN target is a ``nn.Sequential`` of ``Conv2d`` (any kernel, stride, padding, dilation; ``groups=1``; zero
padding), ``ReLU``, ``MaxPool2d``/``AvgPool2d``, ``Flatten``, ``Linear`` and :class:`~onlynorm.Residual` blocks.
Eval-mode ``BatchNorm1d/2d`` after a ``Conv2d``/``Linear`` is folded into it::

    W' = W · γ / √(var + eps),    b' = (b − mean) · γ / √(var + eps) + β

A state dict alone does not say the architecture of a CNN, so files store it as JSON in the safetensors metadata
(``{"kind": "cnn-target", "in_shape": [...], "layers": [...]}``) — never pickled modules.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
...                       nn.Linear(2 * 4 * 4, 3)).double().eval()
>>> spec = ConvNetSpec.from_module(model, in_shape=(1, 4, 4))
>>> [layer["type"] for layer in spec.layers]
['conv', 'relu', 'flatten', 'linear']
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import _io
from .domain import Box, affine_bounds
from .errors import FileFormatError, InvalidTargetError
from .residual import Residual

__all__ = ["ConvNetSpec", "is_cnn_module", "conv_interval"]

_SUPPORTED = "Conv2d, BatchNorm1d/2d (folded), ReLU, MaxPool2d, AvgPool2d, Flatten, Linear, Residual"


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def is_cnn_module(module: nn.Module) -> bool:
    """True when a Sequential contains anything beyond Linear/ReLU/Dropout/Identity that we support."""
    if not isinstance(module, nn.Sequential):
        return False
    return any(isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, Residual, nn.BatchNorm1d,
                              nn.BatchNorm2d)) for m in module)


def _fold(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm, where: str):
    if bn.training or bn.running_mean is None:
        raise InvalidTargetError(f"{where}: BatchNorm must be in eval mode with running statistics to be folded; "
                                 "call model.eval() first")
    scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    b = torch.zeros_like(bn.running_mean) if bias is None else bias
    w = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
    return w.detach(), ((b - bn.running_mean) * scale + shift).detach()


class ConvNetSpec:
    """Layers of a CNN target as plain records (tensors + hyper-parameters), with ``in_shape = (c, H, W)``."""

    def __init__(self, layers: list[dict[str, Any]], in_shape: tuple[int, int, int]):
        self.layers = layers
        self.in_shape = tuple(int(v) for v in in_shape)
        if len(self.in_shape) != 3 or min(self.in_shape) < 1:
            raise InvalidTargetError(f"in_shape: expected (channels, height, width), found {in_shape}")
        self._validate()

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_module(cls, module: nn.Module, in_shape: tuple[int, int, int] | None = None) -> ConvNetSpec:
        if not isinstance(module, nn.Sequential):
            raise InvalidTargetError(f"expected an nn.Sequential CNN, found {type(module).__name__}")
        if in_shape is None:
            raise InvalidTargetError("a CNN target needs in_shape=(c, H, W): the image size is not in the weights")
        return cls(cls._parse(module, ""), in_shape)

    @classmethod
    def _parse(cls, seq: nn.Sequential, prefix: str) -> list[dict]:
        mods = list(seq)
        out: list[dict] = []
        i = 0
        while i < len(mods):
            m, where = mods[i], f"layer {prefix}{i} ({type(mods[i]).__name__})"
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            if isinstance(m, nn.Conv2d):
                if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                    raise InvalidTargetError(f"{where}: only groups=1, zero padding given as integers is supported; "
                                             f"found groups={m.groups}, padding={m.padding!r}, mode={m.padding_mode!r}")
                w, b = m.weight.detach(), (None if m.bias is None else m.bias.detach())
                if isinstance(nxt, nn.BatchNorm2d):
                    w, b = _fold(w, b, nxt, where)
                    i += 1
                out.append({"type": "conv", "weight": w, "bias": torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b,
                            "stride": _pair(m.stride), "padding": _pair(m.padding), "dilation": _pair(m.dilation)})
            elif isinstance(m, nn.Linear):
                w, b = m.weight.detach(), (None if m.bias is None else m.bias.detach())
                if isinstance(nxt, nn.BatchNorm1d):
                    w, b = _fold(w, b, nxt, where)
                    i += 1
                out.append({"type": "linear", "weight": w,
                            "bias": torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b})
            elif isinstance(m, nn.ReLU):
                out.append({"type": "relu"})
            elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
                if getattr(m, "ceil_mode", False) or (isinstance(m, nn.MaxPool2d) and _pair(m.dilation) != [1, 1]):
                    raise InvalidTargetError(f"{where}: ceil_mode/dilated pooling is not supported")
                rec = {"type": "maxpool" if isinstance(m, nn.MaxPool2d) else "avgpool",
                       "kernel": _pair(m.kernel_size), "stride": _pair(m.stride or m.kernel_size),
                       "padding": _pair(m.padding)}
                if isinstance(m, nn.AvgPool2d):
                    rec["count_include_pad"] = bool(m.count_include_pad)
                    if m.divisor_override is not None:
                        raise InvalidTargetError(f"{where}: divisor_override is not supported")
                out.append(rec)
            elif isinstance(m, nn.Flatten):
                if m.start_dim != 1 or m.end_dim != -1:
                    raise InvalidTargetError(f"{where}: only Flatten(start_dim=1) is supported")
                out.append({"type": "flatten"})
            elif isinstance(m, Residual):
                if not isinstance(m.block, nn.Sequential):
                    raise InvalidTargetError(f"{where}: the block of a Residual must be an nn.Sequential")
                out.append({"type": "residual", "block": cls._parse(m.block, f"{prefix}{i}.")})
            elif isinstance(m, (nn.Identity, nn.Dropout)):
                pass
            else:
                raise InvalidTargetError(f"{where} is not supported in a CNN target; supported: {_SUPPORTED}")
            i += 1
        return out

    def _validate(self) -> None:
        shape = self.in_shape
        dtype = None
        for rec in _walk(self.layers):
            for key in ("weight", "bias"):
                if key in rec:
                    t = rec[key]
                    if not torch.isfinite(t).all():
                        raise InvalidTargetError(f"{rec['type']} layer: {key} has NaN/Inf values; expected finite")
                    dtype = dtype or t.dtype
        try:
            with torch.no_grad():
                out = self.forward(torch.zeros(1, *shape, dtype=dtype or torch.float64))
        except (RuntimeError, ValueError) as exc:
            raise InvalidTargetError(f"the CNN layers do not chain for input shape {shape}: "
                                     f"{str(exc).splitlines()[0]}") from None
        if out.ndim != 2:
            raise InvalidTargetError(f"expected the CNN to end with flat outputs (Flatten/Linear), found shape "
                                     f"{tuple(out.shape[1:])}")
        self.out_features = int(out.shape[1])

    # ------------------------------------------------------------------ facts
    @property
    def in_features(self) -> int:
        return self.in_shape[0] * self.in_shape[1] * self.in_shape[2]

    @property
    def dims(self) -> list[int]:
        """``[c, H, W, out channels of every parameterised layer...]``: a signature for mismatch checks."""
        return list(self.in_shape) + [rec["weight"].shape[0] for rec in _walk(self.layers) if "weight" in rec]

    @property
    def num_parameters(self) -> int:
        return sum(rec["weight"].numel() + rec["bias"].numel() for rec in _walk(self.layers) if "weight" in rec)

    @property
    def dtype(self) -> torch.dtype:
        return next(rec["weight"].dtype for rec in _walk(self.layers) if "weight" in rec)

    def to(self, dtype=None, device=None) -> ConvNetSpec:
        return ConvNetSpec(_map(self.layers, lambda t: t.to(dtype=dtype, device=device)), self.in_shape)

    # ------------------------------------------------------------------ evaluation
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            x = x.reshape(x.shape[0], *self.in_shape)
        return _run(self.layers, x)

    __call__ = forward

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        tensors: dict[str, torch.Tensor] = {}
        layers = _describe(self.layers, "", tensors)
        _io.write_tensors(path, tensors, metadata={"kind": "cnn-target", "in_shape": list(self.in_shape),
                                                   "layers": layers})

    @classmethod
    def from_document(cls, doc: dict, tensors: dict[str, torch.Tensor], source: str) -> ConvNetSpec:
        try:
            layers = _rebuild(doc["layers"], tensors)
            return cls(layers, tuple(doc["in_shape"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise FileFormatError(f"{source}: malformed CNN architecture description ({exc}); expected the "
                                  "metadata written by ConvNetSpec.save") from None

    def __repr__(self) -> str:
        return f"ConvNetSpec(in_shape={self.in_shape}, layers={[l['type'] for l in self.layers]})"


def _walk(layers):
    for rec in layers:
        yield rec
        if rec["type"] == "residual":
            yield from _walk(rec["block"])


def _map(layers, fn):
    out = []
    for rec in layers:
        new = dict(rec)
        for key in ("weight", "bias"):
            if key in new:
                new[key] = fn(new[key])
        if rec["type"] == "residual":
            new["block"] = _map(rec["block"], fn)
        out.append(new)
    return out


def _run(layers, x):
    for rec in layers:
        kind = rec["type"]
        if kind == "conv":
            x = F.conv2d(x, rec["weight"], rec["bias"], rec["stride"], rec["padding"], rec["dilation"])
        elif kind == "linear":
            x = F.linear(x, rec["weight"], rec["bias"])
        elif kind == "relu":
            x = torch.relu(x)
        elif kind == "maxpool":
            x = F.max_pool2d(x, rec["kernel"], rec["stride"], rec["padding"])
        elif kind == "avgpool":
            x = F.avg_pool2d(x, rec["kernel"], rec["stride"], rec["padding"],
                             count_include_pad=rec.get("count_include_pad", True))
        elif kind == "flatten":
            x = x.flatten(1)
        elif kind == "residual":
            x = torch.relu(x + _run(rec["block"], x))
    return x


def conv_interval(rec: dict, lo: torch.Tensor, hi: torch.Tensor, weight=None, use_bias: bool = True):
    """Exact per-position range of a conv (zero padding: padded values are exactly 0 in both bounds)."""
    w = rec["weight"] if weight is None else weight
    args = (rec["stride"], rec["padding"], rec["dilation"])
    zmin = F.conv2d(lo, w.clamp(min=0), None, *args) + F.conv2d(hi, w.clamp(max=0), None, *args)
    zmax = F.conv2d(hi, w.clamp(min=0), None, *args) + F.conv2d(lo, w.clamp(max=0), None, *args)
    b = rec.get("bias") if use_bias else None
    if b is not None:
        zmin, zmax = zmin + b.reshape(1, -1, 1, 1), zmax + b.reshape(1, -1, 1, 1)
    return zmin, zmax


def interval_step(rec: dict, lo: torch.Tensor, hi: torch.Tensor):
    """Sound bounds of one layer's output given bounds of its input (batched, shape ``(1, ...)``)."""
    kind = rec["type"]
    if kind == "conv":
        return conv_interval(rec, lo, hi)
    if kind == "linear":
        zmin, zmax = affine_bounds(rec["weight"], lo[0], hi[0], rec["bias"])
        return zmin[None], zmax[None]
    if kind == "relu":
        return lo.clamp(min=0), hi.clamp(min=0)
    if kind in ("maxpool", "avgpool"):   # monotone maps
        f = _run([rec], lo), _run([rec], hi)
        return f
    if kind == "flatten":
        return lo.flatten(1), hi.flatten(1)
    if kind == "residual":
        blo, bhi = lo, hi
        for sub in rec["block"]:
            blo, bhi = interval_step(sub, blo, bhi)
        return (lo + blo).clamp(min=0), (hi + bhi).clamp(min=0)
    raise InvalidTargetError(f"no interval rule for layer type {kind!r}")


def box_tensors(spec: ConvNetSpec, box: Box, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The input box as ``(1, c, H, W)`` lower and upper bound images."""
    return (box.low.to(dtype).reshape(1, *spec.in_shape), box.high.to(dtype).reshape(1, *spec.in_shape))


def _describe(layers, prefix: str, tensors: dict) -> list[dict]:
    out = []
    for i, rec in enumerate(layers):
        d = {k: v for k, v in rec.items() if k not in ("weight", "bias", "block")}
        for key in ("weight", "bias"):
            if key in rec:
                name = f"{prefix}{i}.{key}"
                tensors[name] = rec[key]
                d[key] = name
        if rec["type"] == "residual":
            d["block"] = _describe(rec["block"], f"{prefix}{i}.block.", tensors)
        out.append(d)
    return out


def _rebuild(layers: list[dict], tensors: dict) -> list[dict]:
    allowed = {"conv", "linear", "relu", "maxpool", "avgpool", "flatten", "residual"}
    out = []
    for d in layers:
        if d.get("type") not in allowed:
            raise ValueError(f"unknown layer type {d.get('type')!r} (expected one of {sorted(allowed)})")
        rec = dict(d)
        for key in ("weight", "bias"):
            if key in d:
                if d[key] not in tensors:
                    raise ValueError(f"tensor {d[key]!r} is missing")
                rec[key] = tensors[d[key]]
        if d["type"] == "residual":
            rec["block"] = _rebuild(d["block"], tensors)
        out.append(rec)
    return out
